"""Did two runs learn the same thing? Compares every tensorboard tag of two run directories, value by value.

    python benchmarks/compare_runs.py runs/before runs/after

Use it after a change that must not change what a run learns (a refactor, a speed-up): the same command with the
same seed on CPU physics repeats exactly, so every tag must be equal but wall-clock ones (charts/SPS, time/*).
Prints a line per tag and exits 1 if any differs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro


@dataclass
class Args:
    a: tyro.conf.Positional[str]
    """a run directory (runs/<exp-name>)"""
    b: tyro.conf.Positional[str]
    """the run directory to compare it with"""
    skip: list[str] = field(default_factory=lambda: ["charts/SPS", "time/"])
    """tags (or tag prefixes) that measure wall-clock, compared for their steps only"""


def scalars(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run_dir).is_dir():
        sys.exit(f"error: {run_dir} is not a run directory")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def compare(a: Args) -> list[str]:
    """The tags that differ, each with what differs; prints one line per tag."""
    sa, sb = scalars(a.a), scalars(a.b)
    bad = []
    for tag in sorted(set(sa) | set(sb)):
        x, y = sa.get(tag), sb.get(tag)
        wall_clock = any(tag.startswith(s) for s in a.skip)
        if x is None or y is None:
            why = f"only in {a.a if y is None else a.b}"
        elif [s for s, _ in x] != [s for s, _ in y]:
            why = f"logged at other steps ({len(x)} and {len(y)} points)"
        elif not wall_clock and x != y:
            step = next(s for (s, v), (_, w) in zip(x, y) if v != w)
            why = f"values differ from step {step}"
        else:
            print(f"same  {tag} ({len(x)} points{', steps only' if wall_clock else ''})")
            continue
        print(f"DIFF  {tag}: {why}")
        bad.append(f"{tag}: {why}")
    print(f"{len(bad)} of {len(set(sa) | set(sb))} tags differ")
    return bad


if __name__ == "__main__":
    sys.exit(1 if compare(tyro.cli(Args, description=__doc__)) else 0)
