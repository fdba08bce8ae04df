"""One call site for the experiment trackers: TensorBoard and Weights & Biases.

The driver already writes ``metrics.jsonl`` and serves Prometheus; a :class:`Tracker`
sends the same per-step metrics, under the same names (the metrics.jsonl keys verbatim,
e.g. ``reward/self_confidence/mean``), to every tracker that ``cfg.tracking`` turns on:

- TensorBoard (on by default): event files under ``<run dir>/tensorboard/``.
- W&B (``tracking.wandb``): files under ``<run dir>/wandb/``. ``offline`` (the default)
  needs no account and sends nothing over the network (``wandb sync`` uploads later);
  ``online`` streams to the server.

Resuming at step k (``start_step=k``) hides what a killed run logged at steps >= k, which
the resumed run logs again: TensorBoard purges them (``purge_step``); W&B continues the
same run (its id is kept in ``<run dir>/wandb_id.txt``) and skips steps it already holds,
which W&B would refuse anyway (its steps only go up).

A tracker that is off is never imported, so W&B costs nothing unless it is asked for.
"""

from __future__ import annotations

import html
import logging
import os
import secrets
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from learner.config import Config, TrackingConfig

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the run dir
WANDB_ID_FILE = "wandb_id.txt"  # under the run dir: the W&B run a resumed run continues
NOT_METRICS = ("step", "time")  # x-axis and wall clock: every tracker records both itself

# W&B reads these when it is imported and when its settings singleton is built; they are
# set before either, so that no part of it (telemetry included) reaches for the network.
OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row, as floats (strings, None, lists: skipped).

    NaN stays: a NaN loss is worth seeing in the tracker, not hiding.
    """
    return {k: float(v) for k, v in metrics.items()
            if k not in NOT_METRICS and isinstance(v, Real | np.number)}


def as_batch(images: np.ndarray | Image.Image) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` from a PIL image or one/a batch of HWC arrays."""
    if isinstance(images, Image.Image):
        images = np.asarray(images.convert("RGB"))
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3] or a PIL image, got "
                         f"{batch.dtype} {list(batch.shape)}")
    return batch


class Tracker:
    """The run's trackers, fed together: ``log`` each step, ``close`` at the end.

    ``start_step``: the first step this process logs (a resumed run's checkpoint step);
    what an earlier process logged from there on is dropped, since it is logged again.
    """

    def __init__(self, run_dir: Path, cfg: Config, start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.cfg: TrackingConfig = cfg.tracking
        self.start_step = start_step
        self.tb, self.wandb_run = None, None
        try:
            self.tb = self._open_tensorboard() if self.cfg.tensorboard else None
            self.wandb_run = self._open_wandb(cfg) if self.cfg.wandb else None
        except BaseException:  # e.g. online W&B without a login: no writer left open
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------

    def _open_tensorboard(self):
        """A writer that, on resume, purges the events at steps >= ``start_step``."""
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                             purge_step=self.start_step or None, flush_secs=30)

    def _open_wandb(self, cfg: Config):
        """The run's W&B run: created once, continued (same id) by every resume."""
        if self.cfg.wandb_mode == "offline":
            os.environ.update(OFFLINE_ENV)
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            mode=self.cfg.wandb_mode, dir=str(self.run_dir), id=self._wandb_id(),
            resume="allow", project=self.cfg.wandb_project, entity=self.cfg.wandb_entity,
            name=self.cfg.wandb_name or self.run_dir.name, group=self.cfg.wandb_group,
            tags=list(self.cfg.wandb_tags), config=cfg.model_dump(mode="json"),
            # console off: the driver's terminal (tqdm, Ray's log lines) stays untouched
            settings=wandb.Settings(silent=self.cfg.wandb_mode == "offline", console="off"),
        )
        # An online run resumed past a step it already holds: those steps are skipped.
        self._wandb_next = max(self.start_step, int(run.step or 0))
        return run

    def _wandb_id(self) -> str:
        """The id kept in the run dir, or a new one written there."""
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B's own ids: 8 lowercase letters and digits
        path.write_text(run_id + "\n")
        return run_id

    # -- logging ------------------------------------------------------------------------

    def _wandb_takes(self, step: int) -> bool:
        """W&B steps only go up; a step the resumed run already holds is not sent again."""
        return self.wandb_run is not None and step >= self._wandb_next

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """The step's numeric metrics, under their metrics.jsonl names."""
        values = scalars(metrics)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, global_step=step)
            self.tb.flush()  # a step takes seconds: the view stays live, a kill loses nothing
        if self._wandb_takes(step):
            self.wandb_run.log(values, step=step)

    def log_images(self, step: int, tag: str, images: np.ndarray | Image.Image) -> None:
        """A batch of uint8 ``[B, H, W, 3]`` images (or one PIL image) under ``tag``."""
        batch = as_batch(images)
        if self.tb is not None:
            self.tb.add_images(tag, batch, global_step=step, dataformats="NHWC")
            self.tb.flush()
        if self._wandb_takes(step):
            import wandb

            self.wandb_run.log({tag: [wandb.Image(im) for im in batch]}, step=step)

    def log_text(self, tag: str, text: str) -> None:
        """Text shown as it is (the resolved config YAML, once at the start)."""
        if self.tb is not None:  # TensorBoard renders markdown: a code block keeps the lines
            self.tb.add_text(tag, f"```\n{text}\n```", global_step=self.start_step)
            self.tb.flush()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")},
                               commit=False)

    def close(self) -> None:
        """Flush and close every tracker; safe to call twice."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

