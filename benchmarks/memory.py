"""Does a long run's memory grow? Samples the resident memory of a process and of every process under it (the env
workers) until it ends, then prints first, largest and last per process.

    python benchmarks/memory.py PID --every 60 --out benchmarks/results/memory_peg.json

PID is the training script's (rfcl.py, rlpd.py); Linux only (/proc). Each sample is written to --out as it is taken,
so the figures up to the last sample survive if this stops early.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro


@dataclass
class Args:
    pid: tyro.conf.Positional[int]
    """the process to watch, with its descendants"""
    every: float = 60.0
    """seconds between samples"""
    duration: Optional[float] = None
    """stop after this many seconds (default: when the process ends)"""
    out: Optional[str] = None
    """write the samples here as json (rewritten atomically at every sample)"""


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def rss_mib(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def summary(samples: list[dict]) -> str:
    procs = sorted({p for s in samples for p in s["rss_mib"]}, key=int)
    lines = ["| process | samples | first MiB | max MiB | last MiB |", "|-|-|-|-|-|"]
    for p in procs:
        series = [s["rss_mib"][p] for s in samples if p in s["rss_mib"]]
        lines.append(f"| {p} | {len(series)} | {series[0]:.0f} | {max(series):.0f} | {series[-1]:.0f} |")
    return "\n".join(lines)


def main(a: Args) -> list[dict]:
    if not Path(f"/proc/{a.pid}").exists():
        sys.exit(f"error: no process {a.pid}")
    samples, t0 = [], time.time()
    while Path(f"/proc/{a.pid}").exists() and (a.duration is None or time.time() - t0 < a.duration):
        rss = {str(p): m for p in tree(a.pid) if (m := rss_mib(p)) is not None}
        samples.append({"t": round(time.time() - t0, 1), "rss_mib": rss})
        if a.out:
            tmp = Path(a.out).with_name(f".{Path(a.out).name}.tmp")
            tmp.write_text(json.dumps({"pid": a.pid, "every": a.every, "samples": samples}))
            tmp.replace(a.out)
        time.sleep(a.every)
    print(summary(samples))
    return samples


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
