"""learner.tracking and learner.charts: what the trackers and the run's plots write.

Fast and without Ray: TensorBoard event files are read back with tensorboard's own
reader; W&B runs offline in a fresh interpreter whose network is a local listener that
counts every connection (it must count none) and whose stdin is closed (a login prompt
would fail the run instead of hanging it).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner import charts
from learner.config import Config
from learner.tracking import TENSORBOARD_DIR, WANDB_ID_FILE, Tracker, as_batch, scalars

REPO = Path(__file__).resolve().parents[1]


def config(**tracking) -> Config:
    return Config.model_validate({"tracking": tracking})


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0,
                                                                          "images": 0})
    acc.Reload()
    return acc


def test_scalars_keep_numbers_under_their_names_and_skip_the_rest():
    row = {"step": 3, "time": 1e9, "reward/self_confidence/mean": 0.5, "loss/total": np.float32(2),
           "system/queue_depth": 1, "reward/dropped": True, "note": "text", "none": None,
           "list": [1.0], "loss/kl": float("nan")}
    out = scalars(row)
    assert set(out) == {"reward/self_confidence/mean", "loss/total", "system/queue_depth",
                        "reward/dropped", "loss/kl"}
    assert out["loss/total"] == 2.0 and out["reward/dropped"] == 1.0


def test_tensorboard_holds_the_scalars_images_and_config_text(tmp_path):
    with Tracker(tmp_path, config()) as tracker:
        for step in range(3):
            tracker.log(step, {"step": step, "reward/self_confidence/mean": 0.1 * step,
                               "loss/total": 1.0 - step, "note": "skipped"})
        tracker.log_images(2, "samples", np.full((2, 8, 8, 3), 200, np.uint8))
        tracker.log_images(2, "grid", Image.new("RGB", (6, 4), "red"))
        tracker.log_text("config", "seed: 0\ntrain:\n  steps: 3")
    acc = events(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"reward/self_confidence/mean", "loss/total"}
    sc = acc.Scalars("reward/self_confidence/mean")
    assert [e.step for e in sc] == [0, 1, 2]
    assert [e.value for e in sc] == pytest.approx([0.0, 0.1, 0.2])
    assert [e.value for e in acc.Scalars("loss/total")] == pytest.approx([1.0, 0.0, -1.0])
    assert set(tags["images"]) == {"samples", "grid"}
    (image,) = acc.Images("grid")
    assert (image.step, image.width, image.height) == (2, 6, 4)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "seed: 0\ntrain:\n  steps: 3" in text


def test_a_resumed_tracker_purges_the_steps_it_logs_again(tmp_path):
    with Tracker(tmp_path, config()) as first:  # the killed run got to step 4
        for step in range(5):
            first.log(step, {"loss/total": float(step)})
    with Tracker(tmp_path, config(), start_step=3) as resumed:  # its checkpoint: 3 steps
        for step in range(3, 6):
            resumed.log(step, {"loss/total": 10.0 + step})
    losses = events(tmp_path).Scalars("loss/total")
    assert [(e.step, e.value) for e in losses] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0),
                                                   (4, 14.0), (5, 15.0)]


def test_disabled_trackers_write_nothing(tmp_path):
    with Tracker(tmp_path, config(tensorboard=False, wandb=False)) as tracker:
        tracker.log(0, {"loss/total": 1.0})
        tracker.log_images(0, "samples", np.zeros((1, 4, 4, 3), np.uint8))
        tracker.log_text("config", "seed: 0")
    assert list(tmp_path.iterdir()) == []
    # (that a disabled W&B is not even imported: checked in the fresh interpreter below)


def test_images_must_be_uint8_rgb_batches():
    assert as_batch(np.zeros((4, 5, 3), np.uint8)).shape == (1, 4, 5, 3)
    assert as_batch(Image.new("L", (5, 4))).shape == (1, 4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        as_batch(np.zeros((1, 4, 4, 3), np.float32))


class Listener:
    """A local TCP server that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(300))
                except OSError as e:
                    self.requests.append(repr(e).encode())


WANDB_RUN = """
import sys
import numpy as np
from pathlib import Path
from learner.config import Config
from learner.tracking import Tracker
off = Config.model_validate({"tracking": {"wandb": False, "tensorboard": False}})
Tracker(Path(RUN_DIR), off).close()
print("wandb imported while off:", "wandb" in sys.modules)
cfg = Config.model_validate({"tracking": {"wandb": True, "tensorboard": False,
                                          "wandb_tags": ["test"]}})
for start in (0, 2):  # a run, then its resume
    with Tracker(Path(RUN_DIR), cfg, start_step=start) as t:
        t.log_text("config", "seed: 0")
        for step in range(start, start + 3):
            t.log(step, {"reward/self_confidence/mean": 0.1 * step, "step": step})
        t.log_images(start + 2, "samples", np.zeros((2, 8, 8, 3), np.uint8))
print("done")
"""


def test_wandb_offline_writes_under_the_run_dir_without_network_or_login(tmp_path):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    net = Listener()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # Everything W&B could reach goes to the listener: its server URL and any proxied host.
    env |= {"HOME": str(home), "WANDB_BASE_URL": net.url, "HTTP_PROXY": net.url,
            "HTTPS_PROXY": net.url, "http_proxy": net.url, "https_proxy": net.url,
            "NO_PROXY": "", "no_proxy": "", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", f"RUN_DIR = {str(run_dir)!r}\n" + WANDB_RUN],
                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["wandb imported while off: False", "done"]
    assert net.requests == []
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # One run id for the run and its resume. W&B names a run's folder by its start second and
    # id, and adds "-1" when two runs of one id start within the same second.
    assert len(runs) == 2
    assert all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)
    assert list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert "login" not in (out.stdout + out.stderr).lower()


def write_metrics(run_dir: Path, steps: int = 12) -> None:
    rows = [{"step": s, "time": 1e9 + s, "reward/self_confidence/mean": 0.01 * s,
             "reward/self_confidence/std": 0.1, "reward/shapes/mean": 0.5,
             "reward/shapes/std": 0.2, "reward/dropped": 0, "loss/total": 1.0 / (s + 1),
             "loss/kl": 1e-3 * s, "loss/grad_norm": 0.5, "rollout/samples_per_s": 20.0}
            for s in range(steps)]
    rows.insert(5, dict(rows[5], **{"loss/total": 99.0}))  # a repeated step: the last counts
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_training_draws_every_curve_of_metrics_jsonl(tmp_path):
    assert charts.plot_training(tmp_path) is None  # no metrics yet: no plot
    write_metrics(tmp_path)
    rows = charts.read_metrics(tmp_path)
    assert len(rows) == 12 and rows[5]["loss/total"] == pytest.approx(1 / 6)
    titles = [title for title, _ in charts.training_panels(rows)]
    assert titles[:2] == ["reward: self_confidence (mean ± std over the step's samples)",
                          "reward: shapes (mean ± std over the step's samples)"]
    assert titles[2:] == ["loss/total", "KL to the reference", "gradient norm (before clipping)",
                          "rollout samples per second"]
    path = charts.plot_training(tmp_path)
    assert path == tmp_path / "training.png"
    assert Image.open(path).size == (2 * charts.PANEL[0], 3 * charts.PANEL[1])


def test_line_charts_keep_their_size_and_draw_sparse_series(tmp_path):
    sparse = [0.1, np.nan, np.nan, 0.4]  # an evaluation every few versions
    path = charts.line_charts(tmp_path / "eval.png", [("eval", [("test", sparse)]),
                                                      ("one", [("x", [1.0])])] * 2,
                              columns=1, smooth=1)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (4 * charts.PANEL[1], charts.PANEL[0], 3)
    assert (image != 255).any(axis=-1).mean() > 0.01  # something is drawn
