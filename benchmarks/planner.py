"""ManiSkill's motion planners as demo sources: per task, the planner's success rate, seconds per demo and demo
lengths, and how many planner demos survive conversion to the training controller.

    python benchmarks/planner.py                                   # the eight tasks below, 100 demos each
    python benchmarks/planner.py --env-ids PushCube-v1 --num-demos 20
    python benchmarks/planner.py --env-ids PegInsertionSide-v1 --seeds 200 --sim-config ms2

Each task's demos are generated with demo_making.generate_demos, exactly what rfcl.py / rlpd.py do when no demos are
cached, into ManiSkill's demo folder (so later runs use them). Writes <out>/planner.{json,md}; a task's row is
merged into an existing file, so tasks can be run one at a time.

With --seeds N it instead plans exactly seeds 0..N-1 once each (no conversion, nothing cached) and reports the
planner's success rate and seconds per attempt under the physics of --sim-config (rfcl.py's flag; default: the
task's own), into <out>/planner_seeds.{json,md}: how a physics setting moves the planner, on the same seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import demo_making  # noqa: E402
import vector_env  # noqa: E402

TASKS = ["PushCube-v1", "PullCube-v1", "StackCube-v1", "LiftPegUpright-v1", "PullCubeTool-v1", "PlaceSphere-v1",
         "PegInsertionSide-v1", "PlugCharger-v1"]


@dataclass
class Args:
    env_ids: list[str] = field(default_factory=lambda: list(TASKS))
    """tasks to generate demos for"""
    num_demos: int = 100
    """converted demos wanted per task (the planner makes 10% more, at least 2 more)"""
    obs_mode: str = "state"
    """observation mode of the converted demos"""
    control_mode: str = "pd_joint_delta_pos"
    """controller the demos are converted to"""
    out: str = "benchmarks/results"
    """folder of planner.json / planner.md"""
    seeds: Optional[int] = None
    """plan exactly seeds 0..N-1 once each and report the success rate (planner_seeds.{json,md})"""
    sim_config: Optional[str] = None
    """with --seeds: the physics to plan under (ms2 or a JSON object, as rfcl.py's --sim-config)"""


def table(rows: dict) -> str:
    lines = ["| task | demos asked | planner success | s per demo | demo length: mean (min-max) | converted | status |",
             "|---|---|---|---|---|---|---|"]
    for env_id, r in rows.items():
        if "error" in r and "attempts" not in r:
            lines.append(f"| {env_id} | {r.get('asked', '-')} | - | - | - | - | {r['error']} |")
            continue
        lens = np.array(r["lengths"]) if r["lengths"] else np.zeros(1)
        lines.append(f"| {env_id} | {r.get('asked', 100)} | {r['successes']}/{r['attempts']} ({r['success_rate']:.0%}) | "
                     f"{r['seconds_per_success']:.1f} | {lens.mean():.0f} ({lens.min()}-{lens.max()}) | "
                     f"{r.get('converted', '-')} | {r.get('error', 'ok')} |")
    return "\n".join(lines)


def seeds_table(rows: dict) -> str:
    lines = ["| task | physics | seeds | planner success | s per attempt |", "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['env_id']} | {r['physics']} | 0-{r['attempts'] - 1} | {r['successes']}/{r['attempts']} "
                     f"({r['success_rate']:.1%}) | {r['seconds_per_attempt']:.2f} |")
    return "\n".join(lines)


def plan_seeds(args: Args) -> None:
    """--seeds N: each task's planner on seeds 0..N-1 under --sim-config, in a subprocess as generate_demos runs it."""
    physics = vector_env.sim_config(args.sim_config)
    out = Path(args.out)
    path = out / "planner_seeds.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    for env_id in args.env_ids:
        with tempfile.TemporaryDirectory() as tmp:
            stats = Path(tmp) / "stats.json"
            subprocess.run([sys.executable, str(ROOT / "demo_making.py"), "plan-demos", env_id, str(args.seeds),
                            str(args.seeds), str(Path(tmp) / "plans"), str(stats), json.dumps(physics)], check=True)
            r = json.loads(stats.read_text())
        r.pop("lengths")
        r["physics"] = args.sim_config or "default"
        rows[f"{env_id} {r['physics']} {args.seeds}"] = r
        common.write_json(path, rows)
        md = (f"# ManiSkill motion planners under other physics\n\n`python benchmarks/planner.py --seeds N "
              f"--sim-config ...` on a {os.cpu_count()}-core CPU: seeds 0..N-1, one attempt each; physics `ms2` is "
              f"{json.dumps(vector_env.SIM_CONFIGS['ms2'])}.\n\n{seeds_table(rows)}\n")
        common.write_atomic(out / "planner_seeds.md", md.encode())
        print(seeds_table({env_id: r}), flush=True)


def main(args: Args) -> None:
    out = Path(args.out)
    try:  # before minutes of planning, not after them
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        sys.exit(f"error: cannot write --out {out} ({e.strerror or e}); pass a writable folder")
    if args.seeds is not None:
        return plan_seeds(args)
    path = out / "planner.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    for env_id in args.env_ids:
        t0 = time.time()
        try:
            h5 = demo_making.generate_demos(env_id, args.obs_mode, args.control_mode, args.num_demos)
            stats = json.loads(h5.with_name(h5.name.split(".")[0] + ".planner.json").read_text())
            stats["converted"] = len(json.loads(h5.with_suffix(".json").read_text())["episodes"])
            stats["file"] = str(h5)
        except common.DemoError as e:
            found = sorted((common.demo_dir() / env_id / "motionplanning").glob("*.planner.json"),
                           key=lambda p: p.stat().st_mtime)
            stats = {**(json.loads(found[-1].read_text()) if found and found[-1].stat().st_mtime > t0 else {}),
                     "error": str(e)}
        stats["wall_s"], stats["asked"] = time.time() - t0, args.num_demos
        rows[env_id] = stats
        common.write_json(path, rows)
        md = (f"# ManiSkill motion planners as demo sources\n\n`python benchmarks/planner.py` on a "
              f"{os.cpu_count()}-core CPU ({args.control_mode}, {args.obs_mode}); the planner makes 10% more demos than "
              f"asked (at least 2 more); seconds include failed attempts.\n\n{table(rows)}\n")
        common.write_atomic(out / "planner.md", md.encode())
        print(table({env_id: stats}), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
