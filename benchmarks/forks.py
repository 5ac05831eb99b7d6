"""Stage 2 side by side: an RFCL run and the runs forked from its stage-switch state, per window after the switch.

    python benchmarks/forks.py runs/s2exp_PegInsertionSide_rfcl_d5_s1 runs/s2exp_peg_utd2 --name peg_stage2_forks

The first run is the parent (it went on past its switch unchanged: the control); every other run must be a fork of
its `stage2_start.state` (rfcl.py --fork), so all of them start stage 2 from the same networks, buffers and curricula.
For each run: its critic and actor updates per env step (from args.json), and per --window env steps after the
switch the training episodes' success (the mean of charts/success_once and charts/success_at_end over the window's
logs) and the window's last eval (eval/success_at_end, eval/success_once). Writes <out>/<name>.md (the table),
<out>/<name>.png (training success_once and eval success_at_end against env steps after the switch, a curve per
run) and <out>/<name>.json (the same numbers and every curve, so the figure can be redrawn without the runs).
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import compare_runs  # noqa: E402
import run_files  # noqa: E402
from common import fail, write_atomic  # noqa: E402

TRAIN_TAGS = ("charts/success_once", "charts/success_at_end")
EVAL_TAGS = ("eval/success_at_end", "eval/success_once")


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """the parent run directory, then its forks"""
    window: int = 50_000
    """env steps per table row, counted from the switch"""
    out: str = "benchmarks/results"
    name: str = "stage2_forks"
    """output file stem"""


def scalars(run_dir: Path) -> dict:
    """Every scalar tag of a run (all its event files: a resumed run writes one more) as (steps, values) arrays."""
    out = {}
    for tag, events in compare_runs.scalars(str(run_dir)).items():
        events = sorted(dict(events).items())  # a resumed run logs again the steps after its last save point
        out[tag] = (np.array([s for s, _ in events]), np.array([v for _, v in events]))
    return out


def fork_record(run_dir: Path):
    """The fork record a run keeps of its parent (summary.json once finished, else its resume state; before its first
    save point, made from the state its args.json names), or None."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("forked_from")
    if (run_dir / run_files.RESUME_FILE).is_file():
        return run_files.read_resume_header(run_dir / run_files.RESUME_FILE).get("fork")
    config = json.loads((run_dir / "args.json").read_text())
    if not config.get("fork"):
        return None
    # --fork as given: absolute, or relative to where the fork was started, which holds runs/<exp-name>
    state = Path(config["fork"]) if Path(config["fork"]).is_file() else run_dir.parent.parent / config["fork"]
    return run_files.fork_record(state, run_files.read_resume_header(state), config) if state.is_file() else None


def update_ratios(run_dir: Path) -> tuple[float, float]:
    """(critic updates, actor updates) per env step, from the run's flags."""
    a = json.loads((run_dir / "args.json").read_text())
    per_call = a["num_envs"] * a["steps_per_env"]
    return a["grad_updates_per_step"] / per_call, a["grad_updates_per_step"] / per_call / a["actor_update_freq"]


def window_rows(tags: dict, switch: int, window: int) -> list[dict]:
    """Per window [switch + k * window, switch + (k + 1) * window): training success (mean over the logs in it) and
    the last eval in it. Windows run up to the run's last logged step (the last one may end there: its "to"); a window
    without logs is left out."""
    if TRAIN_TAGS[0] not in tags:
        return []
    last = int(max(steps.max() for steps, _ in tags.values()))
    rows = []
    for k in range(max(0, -(-(last - switch) // window))):
        lo, hi = switch + k * window, switch + (k + 1) * window
        logged = tags[TRAIN_TAGS[0]][0]
        row = {"from": lo - switch, "to": min(hi, last) - switch, "logs": int(((logged > lo) & (logged <= hi)).sum())}
        for tag in TRAIN_TAGS:
            steps, values = tags.get(tag, (np.zeros(0), np.zeros(0)))
            inside = values[(steps > lo) & (steps <= hi)]
            row[tag] = float(inside.mean()) if len(inside) else None
        for tag in EVAL_TAGS:
            steps, values = tags.get(tag, (np.zeros(0), np.zeros(0)))
            inside = np.flatnonzero((steps > lo) & (steps <= hi))
            row[tag] = float(values[inside[-1]]) if len(inside) else None
            row[tag + "@"] = int(steps[inside[-1]] - switch) if len(inside) else None
        if row["logs"]:
            rows.append(row)
    return rows


def collect(run_dirs: list[Path], window: int) -> dict:
    parent = run_dirs[0]
    for d in run_dirs:
        if not (d / "args.json").is_file():
            fail(f"{d} is not a run directory (no args.json)")
    parent_tags = scalars(parent)
    if "curriculum/stage1_end_step" not in parent_tags:
        fail(f"{parent} has not switched to stage 2 (no curriculum/stage1_end_step in its tensorboard): give the "
             f"parent run first, once its stage2_start.state exists")
    switch = int(parent_tags["curriculum/stage1_end_step"][0][0])
    parent_name = json.loads((parent / "args.json").read_text())["exp_name"]
    runs = []
    for d in run_dirs:
        tags = parent_tags if d == parent else scalars(d)
        record = None if d == parent else fork_record(d)
        if d != parent and (record is None or record["parent"] != parent_name or record["global_step"] != switch):
            where = "is not a fork" if record is None else (f"was forked from {record['parent']} at env step "
                                                            f"{record['global_step']:,}")
            fail(f"{d} {where}, not from {parent_name}'s stage switch at env step {switch:,}: fork it from "
                 f"{parent}/stage2_start.state")
        critic, actor = update_ratios(d)
        steps, values = tags.get(TRAIN_TAGS[0], (np.zeros(0), np.zeros(0)))
        after = steps > switch
        e_steps, e_values = tags.get(EVAL_TAGS[0], (np.zeros(0), np.zeros(0)))
        e_after = e_steps > switch
        runs.append({"run": str(d), "parent": d == parent, "critic_updates_per_step": critic,
                     "actor_updates_per_step": actor, "changed": record and record["changed"],
                     "windows": window_rows(tags, switch, window),
                     "train_success_once": [[int(s - switch), float(v)] for s, v in zip(steps[after], values[after])],
                     "eval_success_at_end": [[int(s - switch), float(v)]
                                             for s, v in zip(e_steps[e_after], e_values[e_after])]})
    return {"parent": str(parent), "switch_step": switch, "window": window, "runs": runs}


def label(r: dict) -> str:
    return f"{r['critic_updates_per_step']:g} critic updates / env step" + (" (parent: control)" if r["parent"] else "")


def markdown(report: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"Stage switch of {Path(report['parent']).name} at env step {report['switch_step']:,}; env steps below "
             f"are counted from it. Training success: mean over the window's logs (each the episodes finished since "
             f"the one before); eval: the window's last eval (at env step).", "",
             "| run | critic / actor updates per env step | env steps after the switch | training success_once | "
             "training success_at_end | eval success_at_end (at) | eval success_once |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for w in r["windows"]:
            at = "" if w["eval/success_at_end@"] is None else f" ({w['eval/success_at_end@']:,})"
            lines.append(f"| {Path(r['run']).name} | {r['critic_updates_per_step']:g} / {r['actor_updates_per_step']:g} "
                         f"| {w['from']:,}-{w['to']:,} | {fmt(w['charts/success_once'])} | "
                         f"{fmt(w['charts/success_at_end'])} | {fmt(w['eval/success_at_end'])}{at} | "
                         f"{fmt(w['eval/success_once'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["runs"]:
        train = np.array(r["train_success_once"]).reshape(-1, 2)
        if len(train):  # a rolling mean over 10 logs: each log holds only the few episodes since the one before
            k = min(10, len(train))
            axes[0].plot(train[k - 1:, 0], np.convolve(train[:, 1], np.ones(k) / k, "valid"), label=label(r))
        ev = np.array(r["eval_success_at_end"]).reshape(-1, 2)
        axes[1].plot(ev[:, 0], ev[:, 1], marker=".", label=label(r))
    for ax, title in zip(axes, ("training episodes: success_once (mean of 10 logs)", "eval: success_at_end")):
        ax.set(title=title, xlabel=f"env steps after the stage switch (at {report['switch_step']:,})", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def main(args: Args) -> dict:
    if not args.runs:
        fail("give the parent run directory, then its forks")
    report = collect([Path(r) for r in args.runs], args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{args.name}.json", json.dumps(report, indent=1).encode())
    write_atomic(out / f"{args.name}.md", markdown(report).encode())
    plot(report, out / f"{args.name}.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
