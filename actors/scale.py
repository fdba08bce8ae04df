"""Resizing a running pool from outside the training job.

    python -m actors.scale reward 4 --address auto

A pool created with a ``control_name`` registers a named :class:`PoolControl` actor
(namespace ``solace``) that holds its desired size. This command connects to the
cluster, finds that actor by name and sets the size; the training driver applies it
at its next step (``RewardPool.sync_control``). Prints ``old -> new``.
"""

from __future__ import annotations

import argparse
import sys

import ray

NAMESPACE = "solace"
DEFAULT_CONTROL_NAME = "solace-reward-pool"
# Pool kinds and the control actor name each one registers by default.
POOLS = {"reward": DEFAULT_CONTROL_NAME}


class PoolControl:
    """Named actor holding a pool's desired size, settable from outside the job."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_size(self) -> int:
        return self.size

    def set_size(self, size: int) -> int:
        """Set the desired size; returns the previous one."""
        if int(size) != size or size < 0:
            raise ValueError(f"pool size must be an integer >= 0, got {size!r}")
        old, self.size = self.size, int(size)
        return old


def set_pool_size(name: str, size: int) -> int:
    """Set the desired size of the pool whose control actor is ``name``; returns the old size.

    Needs a connected Ray; raises ``LookupError`` if no such pool is running.
    """
    try:
        control = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise LookupError(
            f"no running pool found: no actor named {name!r} in namespace {NAMESPACE!r}. "
            "Is the training job running on this cluster, with its pool's control_name "
            "set to this name?"
        ) from None
    return ray.get(control.set_size.remote(size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", choices=sorted(POOLS), help="which pool to resize")
    parser.add_argument("size", type=int, help="desired number of actors (>= 0)")
    parser.add_argument("--address", default="auto",
                        help="Ray cluster address (default: auto, the local node's cluster)")
    parser.add_argument("--name", help="control actor name (default: the pool kind's default, "
                                       f"e.g. {DEFAULT_CONTROL_NAME!r})")
    args = parser.parse_args(argv)
    if args.size < 0:
        parser.error(f"size must be >= 0, got {args.size}")
    name = args.name or POOLS[args.pool]
    connected_here = not ray.is_initialized()  # e.g. called in-process by a driver or test
    if connected_here:
        try:
            ray.init(address=args.address, namespace=NAMESPACE, logging_level="ERROR")
        except ConnectionError as e:
            print(f"error: cannot reach a Ray cluster at {args.address!r}: {e}", file=sys.stderr)
            return 1
    try:
        old = set_pool_size(name, args.size)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if connected_here:
            ray.shutdown()
    print(f"{args.pool} pool {name!r}: {old} -> {args.size} (applied at the driver's next step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
