"""Cleans up a local Ray instance after its driver dies without shutting it down.

A driver killed by SIGKILL (the OOM killer, ``kill -9``) cannot call ``ray.shutdown``.
The instance's GCS and raylet notice and exit, but Ray's ``DashboardAgent`` and
``RuntimeEnvAgent`` are re-parented to init and live on, holding memory and ports. So a
driver that starts a local instance also starts this watcher:

    python learner/reaper.py DRIVER_PID

It notes the driver's descendants every second while the driver lives (Ray's processes
and the actors' workers, started at any time) and, once the driver is gone, kills those
that are still running. A process is only killed if it is the one that was seen (same pid
and creation time), never a newcomer that reused a pid. The watcher runs in its own
session, so a signal to the driver's process group does not take it along.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil


def watch(driver: int, interval_s: float = 1.0) -> list[int]:
    """Block until ``driver`` exits, then kill its descendants left over; returns their pids."""
    seen: dict[int, float] = {}
    try:
        root = psutil.Process(driver)
        while root.status() != psutil.STATUS_ZOMBIE:
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    seen[child.pid] = child.create_time()
            time.sleep(interval_s)
    except psutil.NoSuchProcess:
        pass
    killed = []
    for pid, created in seen.items():
        if pid == os.getpid():
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.kill()
                killed.append(pid)
    return killed


def start(driver: int | None = None) -> subprocess.Popen:
    """Start the watcher of ``driver`` (default: this process) in its own session."""
    return subprocess.Popen(
        [sys.executable, __file__, str(driver or os.getpid())],  # needs only psutil
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
