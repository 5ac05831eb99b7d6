"""Learning curves: run (or reuse) several seeds of rfcl.py / rlpd.py, then plot and tabulate eval success.

    python benchmarks/learning.py --algo rfcl --env-id PickCube-v1 --num-demos 5 --seeds 1 2 3 --total-timesteps 200000
    python benchmarks/learning.py --runs runs/a runs/b --label rfcl-fast       # existing runs, nothing is trained
    python benchmarks/learning.py --compare "rfcl=runs/a" "rlpd=runs/b" --name pickcube   # configs in one figure
    python benchmarks/learning.py --compare "old=benchmarks/results/tasks_cpu.json#StackCube-v1 rfcl:5" "new=runs/c"

Writes <out>/<name>.png (eval success_at_end vs env steps and vs wall-clock, mean and min-max over seeds),
<out>/<name>.md (env steps and wall-clock to first reach 0.5 and 0.9 of both eval/success_at_end and
eval/success_once, final values, SPS) and <out>/<name>.json (the same, plus every run's eval curves, so the
figures can be redrawn without the runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.9)
TAG = "eval/success_at_end"
ONCE = "eval/success_once"  # ManiSkill's learning-from-demos baselines report this one


@dataclass
class Args:
    algo: str = "rfcl"
    """script to run for the seeds that have no run yet: rfcl, rlpd, or a copy of either beside them (its file name
    without .py)"""
    env_id: str = "PickCube-v1"
    num_demos: int = 5
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    total_timesteps: int = 200_000
    runs: list[str] = field(default_factory=list)
    """existing run directories to read instead of (or besides) training; reused, never retrained"""
    label: Optional[str] = None
    """legend label (default: <algo>)"""
    extra: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """a further flag or value for the script, once per token, e.g. --extra=--preset --extra=sample-efficient"""
    compare: list[str] = field(default_factory=list)
    """draw several configs in one figure instead: LABEL=RUN[,RUN...] per config, e.g.
    --compare "rfcl=runs/a,runs/b" "rlpd=runs/c"; writes <out>/<name>.png and .md, trains nothing. A RUN may also
    be REPORT.json#KEY, the curves kept in a report of this script or benchmarks/suite.py (for runs whose folders
    are gone), e.g. "first=benchmarks/results/tasks_cpu.json#StackCube-v1 rfcl:5" (so labels to be read back this
    way hold no comma)"""
    tag: str = TAG
    """with --compare: the tensorboard tag to draw, e.g. curriculum/start_step_frac_mean (the success table is
    written only for the default tag)"""
    out: str = "benchmarks/results"
    name: Optional[str] = None
    """output file stem (default: <algo>_<env-id>)"""


# ---- reading logs --------------------------------------------------------------------------------------
def read_run(run_dir, tag: str = TAG) -> dict:
    """One tag of one run (eval success_at_end by default): steps, values ("success"), wall-clock seconds of
    training at each of them, and the last SPS. The seconds come from charts/SPS (env steps / the run's own clock,
    which a resumed run continues, leaving out the time it was stopped), interpolated between log steps; a run
    without SPS events falls back to the seconds since its first event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if tag not in tags:
        raise ValueError(f"{run_dir} has no {tag} events; is it an rfcl.py/rlpd.py run that logged it at least once?")
    events = acc.Scalars(tag)
    t0 = min(e.wall_time for t in tags for e in acc.Scalars(t)[:1])
    sps_events = acc.Scalars("charts/SPS") if "charts/SPS" in tags else []
    sps = [e.value for e in sps_events]
    steps = np.array([e.step for e in events])
    if sps_events:
        log_steps = np.array([e.step for e in sps_events], float)
        wall_s = np.interp(steps, np.r_[0.0, log_steps], np.r_[0.0, log_steps / np.maximum(sps, 1e-9)])
    else:
        wall_s = np.array([e.wall_time - t0 for e in events])
    curve = {"run": str(run_dir), "steps": steps, "success": np.array([e.value for e in events]),
             "wall_s": wall_s, "sps": float(sps[-1]) if sps else float("nan")}
    if tag == TAG and ONCE in tags:  # logged at the same steps as success_at_end
        curve["once"] = np.array([e.value for e in acc.Scalars(ONCE)])
    return curve


def first_reach(steps, values, wall_s, threshold: float):
    """(env steps, wall-clock s) at the first eval with value >= threshold, or (None, None)."""
    # events store float32: 45/50 reads back as 0.89999998, which must count as reaching 0.9
    hit = np.flatnonzero(np.asarray(values) >= threshold - 1e-6)
    if len(hit) == 0:
        return None, None
    return int(steps[hit[0]]), float(wall_s[hit[0]])


def summarise(curves: list[dict]) -> dict:
    rows = []
    for c in curves:
        row = {"run": c["run"], "final_success": float(c["success"][-1]), "final_step": int(c["steps"][-1]),
               "wall_clock_s": float(c["wall_s"][-1]), "sps": c["sps"]}
        for th in THRESHOLDS:
            row[f"steps_to_{th}"], row[f"wall_s_to_{th}"] = first_reach(c["steps"], c["success"], c["wall_s"], th)
        if "once" in c:
            row["final_success_once"] = float(c["once"][-1])
            for th in THRESHOLDS:
                row[f"once_steps_to_{th}"], row[f"once_wall_s_to_{th}"] = first_reach(c["steps"], c["once"],
                                                                                    c["wall_s"], th)
        rows.append(row)
    return {"runs": rows, "mean_final_success": float(np.mean([r["final_success"] for r in rows])),
            "seeds_reaching_0.9": sum(r["steps_to_0.9"] is not None for r in rows), "num_runs": len(rows)}


def markdown(summary: dict, label: str) -> str:
    """Steps to 0.5 / 0.9 and the final value of success_at_end (and of success_once, where the runs logged it)."""
    fmt = lambda v, f="{:,}": "not reached" if v is None else f.format(v)  # noqa: E731
    once = all("final_success_once" in r for r in summary["runs"])
    head = "| run | steps to 0.5 | steps to 0.9 | wall-clock to 0.9 | final success |"
    if once:
        head += " success_once: steps to 0.5 | to 0.9 | final |"
    lines = [f"### {label}", "", "success_at_end unless marked success_once", "", head + " env steps/s |",
             "|" + " --- |" * head.count("|")]
    for r in summary["runs"]:
        line = (f"| {Path(r['run']).name} | {fmt(r['steps_to_0.5'])} | {fmt(r['steps_to_0.9'])} | "
                f"{fmt(r['wall_s_to_0.9'], '{:.0f} s')} | {r['final_success']:.2f} at {r['final_step']:,} |")
        if once:
            line += (f" {fmt(r['once_steps_to_0.5'])} | {fmt(r['once_steps_to_0.9'])} | "
                     f"{r['final_success_once']:.2f} |")
        lines.append(line + f" {r['sps']:.0f} |")
    return "\n".join(lines) + "\n"


def curves_json(curves: list[dict]) -> list[dict]:
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in c.items()} for c in curves]


def curves_from_json(curves: list[dict]) -> list[dict]:
    """The inverse of curves_json: lists back to arrays."""
    return [{k: np.asarray(v) if isinstance(v, list) else v for k, v in c.items()} for c in curves]


# ---- plotting --------------------------------------------------------------------------------------------
def band(ax, curves: list[dict], label: str, key: str = "steps", scale: float = 1.0) -> None:
    """One config on one axis: the mean success over its runs (interpolated on a common x up to the shortest run)
    with a min-max band; x is `key` ("steps" or "wall_s") times `scale`."""
    grid = np.linspace(0, min(c[key][-1] for c in curves), 100)
    ys = np.array([np.interp(grid, c[key], c["success"]) for c in curves])
    (line,) = ax.plot(grid * scale, ys.mean(0), label=label)
    ax.fill_between(grid * scale, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)


def plot(groups: dict[str, list[dict]], path, tag: str = TAG) -> None:
    """Two panels, one line per group: mean over its runs with a min-max band, vs env steps and vs hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for label, curves in groups.items():
        for ax, key, scale in ((axes[0], "steps", 1.0), (axes[1], "wall_s", 1 / 3600)):
            runs = f"{len(curves)} run" + ("s" if len(curves) > 1 else "")
            band(ax, curves, f"{label} ({runs})", key, scale)
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall-clock (hours)")
    for ax in axes:
        ax.set_ylabel(tag.replace("eval/", "eval "))
        ax.set_ylim(-0.02, 1.02)
        if tag == TAG:
            ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    # below the panels, so that no curve is hidden behind it
    # as many columns as fit the figure's width (about 150 characters of legend text)
    longest = max(len(label) for label in groups) + 12
    ncol = max(1, min(len(groups), 3, 150 // longest))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(groups) - 1) // ncol), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------
def parse_compare(specs: list[str]) -> dict[str, list[str]]:
    groups = {}
    for spec in specs:
        label, sep, runs = spec.partition("=")
        if not sep or not label or not runs:
            raise SystemExit(f"error: --compare takes LABEL=RUN[,RUN...], got {spec!r}")
        groups[label] = runs.split(",")  # as typed: a Path would normalise the KEY of REPORT.json#KEY
    return groups


def kept_curves(source: str, tag: str) -> list[dict]:
    """REPORT.json#KEY: the curves a report kept under KEY (suite.py: "curves"[KEY]; --compare: [KEY]["curves"];
    a single-config report: its own curves, KEY its label)."""
    path, _, key = source.partition("#")
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --compare {source!r}: cannot read {path} as a report ({e})") from None
    kept = {}  # key -> (curves, the tag they are of)
    if isinstance(d, dict) and isinstance(d.get("curves"), dict):  # the suite keeps eval success_at_end
        kept = {k: (group, TAG) for k, group in d["curves"].items()}
    elif isinstance(d, dict) and isinstance(d.get("curves"), list):
        kept = {d.get("label"): (d["curves"], TAG)}
    elif isinstance(d, dict):
        kept = {k: (v["curves"], v.get("tag", TAG)) for k, v in d.items() if isinstance(v, dict) and "curves" in v}
    if key not in kept:
        raise SystemExit(f"error: --compare {source!r}: {path} keeps no curves under {key!r}; it has: "
                         + (", ".join(repr(k) for k in sorted(kept, key=str)) or "none"))
    group, kept_tag = kept[key]
    if kept_tag != tag:
        raise SystemExit(f"error: --compare {source!r}: {path} kept {kept_tag}, not --tag {tag}")
    return curves_from_json(group)


def read_source(source: str, tag: str) -> list[dict]:
    """One --compare RUN: a run folder (one curve) or REPORT.json#KEY (the curves kept there)."""
    if source.partition("#")[0].endswith(".json") and "#" in source:
        return kept_curves(source, tag)
    return [read_run(source, tag)]


def main(args: Args) -> None:
    if args.compare:
        groups = {label: [c for r in runs for c in read_source(r, args.tag)]
                  for label, runs in parse_compare(args.compare).items()}
        out, name = Path(args.out), args.name or "compare"
        out.mkdir(parents=True, exist_ok=True)
        plot(groups, out / f"{name}.png", args.tag)
        if args.tag == TAG:
            md = "\n\n".join(markdown(summarise(curves), label) for label, curves in groups.items())
            (out / f"{name}.md").write_text(md + "\n")
            print(md)
        (out / f"{name}.json").write_text(json.dumps({label: {"tag": args.tag, "curves": curves_json(curves)}
                                                      for label, curves in groups.items()}, indent=1))
        print(f"wrote {out / name}.png/.json" + ("/.md" if args.tag == TAG else ""))
        return
    if not (ROOT / f"{args.algo}.py").is_file():
        raise SystemExit(f"error: --algo {args.algo}: no {args.algo}.py beside rfcl.py; pass rfcl, rlpd or a copy's name")
    label = args.label or args.algo
    name = args.name or f"{args.algo}_{args.env_id}"
    run_dirs = [Path(r) for r in args.runs]
    if not args.runs:
        for seed in args.seeds:
            run = ROOT / "runs" / f"bench_{name}_s{seed}"
            if not run.exists():  # a finished or interrupted run is reused, never retrained or overwritten
                subprocess.run([sys.executable, str(ROOT / f"{args.algo}.py"), "--env-id", args.env_id,
                                "--num-demos", str(args.num_demos), "--seed", str(seed), "--total-timesteps",
                                str(args.total_timesteps), "--exp-name", run.name, *args.extra], cwd=ROOT, check=True)
            run_dirs.append(run)
    curves = [read_run(r) for r in run_dirs]
    summary = summarise(curves)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot({label: curves}, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps({"label": label, **summary, "curves": curves_json(curves)}, indent=1))
    (out / f"{name}.md").write_text(markdown(summary, label))
    print(markdown(summary, label))
    print(f"wrote {out / name}.png/.json/.md")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
