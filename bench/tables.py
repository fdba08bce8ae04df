"""The issue's targets (#7) and how the report writes figures: spreads, tables, verdicts.

Spreads are written ``median [min–max]`` over the repetitions named.
"""

from __future__ import annotations

import statistics

TARGETS = {"sampler": 0.90, "self-confidence": 0.90, "e2e": 1.3, "overhead": 0.05}


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = ".2f") -> str:
    """``median [min–max]``; a single value alone."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{med(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, above: bool = True) -> str:
    ok = value >= target if above else value < target
    return "met" if ok else "**missed**"


def median_run(runs: list[dict]) -> dict:
    """The run with the median rate (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["rate"])[(len(runs) - 1) // 2]
