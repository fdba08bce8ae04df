"""Where ShapesEval's shape prototypes come from, and its speed and accuracy.

    python -m shapes.benchmark                # images/s and strict accuracy
    python -m shapes.benchmark --prototypes   # re-measure PROTOTYPES, CLASS_STD
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from shapes.detect import find_components
from shapes.evaluate import ShapesScores, grade, summarize
from shapes.world import (
    CLASSES,
    Distortion,
    counting,
    make_splits,
    perturb,
    render,
    render_scene,
)


def measure_prototypes(n_scenes: int = 250, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Where PROTOTYPES and CLASS_STD come from: per class, the features of the shapes in
    `n_scenes` four-object renders, each clean, perturbed, bent by a default `Distortion`,
    and bent and perturbed -> (class means [4,F], class stds [4,F])."""
    rng = np.random.default_rng(seed)
    means, stds = [], []
    for cls in CLASSES:
        clean = np.stack([render(counting(cls, 4), rng) for _ in range(n_scenes)])
        bent = np.stack([render_scene(counting(cls, 4), rng, distortion=Distortion())[0]
                         for _ in range(n_scenes)])
        images = np.concatenate([clean, bent])
        images = np.concatenate([images, np.stack([perturb(im, rng) for im in images])])
        features = find_components(images).features
        means.append(features.mean(axis=0))
        stds.append(features.std(axis=0))
    return np.stack(means), np.stack(stds)


def benchmark(repeats: int = 5, batch: int = 64, seed: int = 0) -> None:
    """Print images/s and strict accuracy on renders of the test split: clean,
    perturbed, perturbed at 2x and 3x the documented jitter and noise, and bent by a
    default `Distortion` (then objects may touch, which no detector can separate)."""
    metadata = make_splits()["test"] * repeats
    rng = np.random.default_rng(seed)
    clean = np.stack([render(m, rng) for m in metadata])
    levels = [("clean", 0.0), ("perturbed", 1.0), ("perturbed x2", 2.0), ("perturbed x3", 3.0),
              ("bent", -1.0)]
    for name, strength in levels:
        if strength < 0:
            images = np.stack([render_scene(m, rng, distortion=Distortion())[0] for m in metadata])
        elif strength == 0:
            images = clean
        else:
            images = np.stack([perturb(im, rng, strength) for im in clean])
        start = time.perf_counter()
        parts = [grade(images[i:i + batch], metadata[i:i + batch])
                 for i in range(0, len(images), batch)]
        seconds = time.perf_counter() - start
        scores = ShapesScores(np.concatenate([p.strict for p in parts]),
                              np.concatenate([p.partial for p in parts]),
                              [d for p in parts for d in p.details])
        summary = summarize(scores, metadata)
        print(f"{name:>13}: {len(images) / seconds:7.0f} images/s (batches of {batch}), "
              f"strict {scores.strict.mean():.4f}, overall {summary['overall']:.4f}, "
              f"partial {summary['partial']:.4f}")


def main() -> None:
    """CLI: benchmark by default; --prototypes prints freshly measured constants."""
    parser = argparse.ArgumentParser(description="ShapesEval speed and accuracy on test renders")
    parser.add_argument("--repeats", type=int, default=5, help="images per test prompt")
    parser.add_argument("--batch", type=int, default=64, help="images per grade() call")
    parser.add_argument("--prototypes", action="store_true", help="re-measure the prototypes")
    args = parser.parse_args()
    if args.prototypes:
        means, stds = measure_prototypes()
        print("PROTOTYPES =", np.round(means.astype(float), 3).tolist())
        print("CLASS_STD =", np.round(stds.astype(float), 3).tolist())
    else:
        benchmark(args.repeats, args.batch)


if __name__ == "__main__":
    main()
