"""Stopping a run on request: SIGTERM (``ray job stop``, KubeRay, a preempted node) and
SIGINT (Ctrl-C).

The first signal only sets a flag. The driver loop looks at it where stopping loses
nothing: while it waits for a step's rollouts and scores (the step is abandoned, its
samples were never trained on) and after a step is logged. Either way it writes a
checkpoint of the steps done and exits with status ``128 + signal`` (143 for SIGTERM,
130 for SIGINT), so ``--resume`` continues exactly where it stopped. An update in
flight is never interrupted: the learner's state would be half a step.

Two bounds keep a stop prompt: if the run has not exited ``train.stop_timeout_s`` after
the first signal (an evaluation or an update that takes long), it exits without the
step in flight, its last checkpoint standing; a second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path


class StopSignals:
    """Catches SIGTERM and SIGINT for the duration of a ``with`` block.

    ``requested`` is the first signal's number (None: no stop asked). Outside the main
    thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __call__(self) -> bool:
        return self.requested is not None

    @property
    def exit_status(self) -> int:
        return 128 + (self.requested or 0)

    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else "no signal"

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:  # the second signal: no more waiting
            print(f"\n{signal.Signals(signum).name} again: exiting now, without the step in "
                  "flight; the last checkpoint stands", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the step in flight (at most "
              f"{self.timeout_s:g} s, train.stop_timeout_s); a checkpoint of the steps done "
              "follows. Send it again to exit at once.", file=sys.stderr, flush=True)
        self._timer = threading.Timer(self.timeout_s, self._overdue)
        self._timer.daemon = True
        self._timer.start()

    def _overdue(self) -> None:
        print(f"stop: not done after train.stop_timeout_s = {self.timeout_s:g} s; exiting "
              "without the step in flight, the last checkpoint stands",
              file=sys.stderr, flush=True)
        os._exit(self.exit_status)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        # The handlers go; a watchdog started by a signal stays until :meth:`closed`, so
        # that shutting the actors down cannot hang the stop either.
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def closed(self) -> None:
        """The run has shut its actors down: the stop is complete, the watchdog goes."""
        if self._timer is not None:
            self._timer.cancel()


class RunStopped(Exception):
    """The run stopped on a signal after checkpointing ``steps`` steps; ``status`` is the
    process exit status (128 + the signal's number)."""

    def __init__(self, signum: int | None, steps: int, checkpoint: Path | None,
                 run_dir: Path) -> None:
        self.status = 128 + (signum or 0)
        self.steps, self.checkpoint = steps, checkpoint
        name = signal.Signals(signum).name if signum else "stop"
        super().__init__(
            f"stopped by {name} after {steps} steps: checkpoint {checkpoint}; continue with "
            f"`python -m learner.main --resume {run_dir}`")
