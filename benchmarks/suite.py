"""Run a grid of learning runs (configs x env ids x seeds), here or on a Slurm cluster, then draw one figure with a
panel per task and write one table.

    python benchmarks/suite.py --configs rfcl:5 rlpd:100 --env-ids PushCube-v1 StackCube-v1 --seeds 1 2 \\
        --budgets PushCube-v1=300000 StackCube-v1=1000000 --target-success 0.9 --parallel 2
    python benchmarks/suite.py ... --executor slurm --slurm-partition gpu --slurm-time-min 240
    python benchmarks/suite.py ... --executor none          # only the figure and table, from the runs there are

A config is ALGO:NUM_DEMOS, ALGO the name of a script beside rfcl.py (rfcl, rlpd, or your copy of either). Each run lives in runs/<prefix>_<algo>_<env>_d<demos>_s<seed>/. A run that finished
(its budget spent or its --target-success reached) is reused, never rerun; one with a resume state continues with
--resume; any other starts fresh.
Executors:
  * local:          --parallel runs at a time on this machine (plain subprocesses).
  * slurm:          one Slurm job per run through submitit. Shortly before the job's time limit submitit asks the run
                    to checkpoint: the script gets SIGTERM, saves its resume state and exits, and the job is
                    requeued; the requeued job runs the same line, which now resumes.
  * submitit-local: submitit's local executor (same code path as slurm, no cluster; the tests use it).
Writes <out>/<name>.png (eval success_at_end vs env steps, a panel per task, a line per config, mean and min-max
over seeds, each seed's own curve thin; with --paper the published points too), <out>/<name>.md (for every run: env
steps and wall-clock of training to 0.5 and 0.9 of success_at_end and success_once, RFCL's stage-1 end, the last
eval, how the run ended or that it runs now, env steps/s, the machine; with --paper a second table with the
published numbers beside each task's seeds) and <out>/<name>.json (the same with the curves). A run whose folder is
not under --root (it ran on another machine, or its disk was wiped) keeps the row and curve it had in the previous
<out>/<name>.json, and says so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import learning  # noqa: E402


@dataclass
class Args:
    configs: list[str] = field(default_factory=lambda: ["rfcl:5", "rlpd:100"])
    """ALGO:NUM_DEMOS per config (ALGO: rfcl, rlpd or a copy of either, the script's file name without .py)"""
    env_ids: list[str] = field(default_factory=lambda: ["PickCube-v1"])
    seeds: list[int] = field(default_factory=lambda: [1])
    total_timesteps: int = 1_000_000
    """budget of every run, unless --budgets names its env id"""
    budgets: list[str] = field(default_factory=list)
    """per-task budgets, ENV_ID=STEPS"""
    target_success: Optional[float] = None
    """end a run early, as finished, once its eval success_at_end stays at or above this (the scripts'
    --target-success, 3 evals in a row by default)"""
    extra: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """a further flag or value for every run, once per token: --extra=--no-capture-video --extra=--control-mode
    --extra=pd_ee_delta_pose"""
    prefix: str = "suite"
    """run names: runs/<prefix>_<algo>_<env>_d<demos>_s<seed>"""
    executor: Literal["local", "slurm", "submitit-local", "none"] = "local"
    parallel: int = 1
    """local: runs at a time"""
    slurm_partition: Optional[str] = None
    slurm_time_min: int = 240
    """Slurm: minutes per job; longer runs are requeued and resumed"""
    slurm_cpus: int = 16
    slurm_gpus: int = 1
    root: str = "."
    """folder whose runs/ holds the runs (the scripts run there, as from a shell in it)"""
    log_dir: str = "runs/suite_logs"
    """submitit's and the runs' logs, under --root"""
    name: str = "suite"
    """output file stem"""
    machine: str = "-"
    """the table's machine for runs whose summary.json does not record one (made before it did)"""
    paper: Optional[str] = None
    """published numbers to compare with, e.g. benchmarks/paper_rfcl.json: marked on each of its tasks' panels, and
    set beside the runs in a second table (success at 1M and 2M env steps, steps to 0.9, stage-1 end)"""
    out: str = "benchmarks/results"


@dataclass
class RunSpec:
    algo: str
    env_id: str
    num_demos: int
    seed: int
    total: int
    extra: list

    @property
    def name(self) -> str:
        return f"{self.env_id.removesuffix('-v1')}_{self.algo}_d{self.num_demos}_s{self.seed}"

    def finished(self, run_dir: Path) -> bool:
        try:
            s = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        return s.get("stopped_by") is None and (s.get("global_step", 0) >= self.total or bool(s.get("target_reached")))

    def command(self, run_dir: Path) -> list[str]:
        """The one line a job runs, first time or requeued: resume if there is a resume state, else start."""
        script = str(ROOT / f"{self.algo}.py")
        if (run_dir / "resume.state").exists():
            return [sys.executable, script, "--resume", str(run_dir), "--total-timesteps", str(self.total)]
        return [sys.executable, script, "--env-id", self.env_id, "--num-demos", str(self.num_demos), "--seed",
                str(self.seed), "--total-timesteps", str(self.total), "--exp-name", run_dir.name, *self.extra]


class Job:
    """One run as a callable (what submitit pickles and calls in the job). On submitit's checkpoint request it
    stops the run with SIGTERM (the script saves its resume state) and hands back itself to be requeued."""

    def __init__(self, spec: RunSpec, run_dir: Path, log: Path):
        self.spec, self.run_dir, self.log, self.proc = spec, run_dir, log, None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "proc"} | {"proc": None}

    def __call__(self) -> int:
        if self.spec.finished(self.run_dir):
            return 0
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            cmd = self.spec.command(self.run_dir)
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            self.proc = subprocess.Popen(cmd, cwd=self.run_dir.parent.parent, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            rc = self.proc.wait()
        if rc != 0:
            raise RuntimeError(f"{self.spec.name} exited {rc}; see {self.log}")
        return rc

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # as Slurm does: the run and its env workers; the run saves
            self.proc.wait(timeout=600)
        return submitit.helpers.DelayedSubmission(Job(self.spec, self.run_dir, self.log))


def grid(a: Args) -> list[RunSpec]:
    """The runs of the grid; every value that no run could use is one line before any run starts."""
    for flag, value in (("total-timesteps", a.total_timesteps), ("parallel", a.parallel),
                        ("slurm-time-min", a.slurm_time_min), ("slurm-cpus", a.slurm_cpus)):
        if value < 1:
            raise SystemExit(f"error: --{flag} must be >= 1, got {value}")
    if a.target_success is not None and not 0 <= a.target_success <= 1:
        raise SystemExit(f"error: --target-success is an eval success rate in [0, 1], got {a.target_success}")
    if Path(a.prefix).name != a.prefix or a.prefix in ("", ".", ".."):
        raise SystemExit(f"error: --prefix is part of a folder name under runs/, got {a.prefix!r}")
    if not a.seeds or min(a.seeds) < 0:
        raise SystemExit(f"error: --seeds takes one or more seeds >= 0, got {a.seeds}")
    budgets = {}
    for b in a.budgets:
        env, _, steps = b.partition("=")
        if not env or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"error: --budgets takes ENV_ID=STEPS (e.g. StackCube-v1=2000000), got {b!r}")
        budgets[env] = int(steps)
    extra = [*a.extra, *(["--target-success", str(a.target_success)] if a.target_success is not None else [])]
    specs = []
    for c in a.configs:
        algo, _, n = c.partition(":")
        if not (ROOT / f"{algo}.py").is_file() or not n.isdigit():
            raise SystemExit(f"error: --configs takes ALGO:NUM_DEMOS, ALGO a script beside rfcl.py without its .py "
                             f"(rfcl, rlpd, or a copy of either), got {c!r}")
        for env in a.env_ids:
            for seed in a.seeds:
                specs.append(RunSpec(algo, env, int(n), seed, budgets.get(env, a.total_timesteps), list(extra)))
    return specs


def run_dir(a: Args, s: RunSpec) -> Path:
    return Path(a.root).resolve() / "runs" / f"{a.prefix}_{s.name}"


def run_grid(a: Args, specs: list[RunSpec]) -> list[str]:
    """Runs what is not finished; returns one line per run that did not end well (the others go on)."""
    root = Path(a.root).resolve()
    jobs = [Job(s, run_dir(a, s), root / a.log_dir / f"{a.prefix}_{s.name}.log") for s in specs]
    todo = [j for j in jobs if not j.spec.finished(j.run_dir)]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished (reused)", flush=True)
    if not todo or a.executor == "none":
        return []
    failed = []

    def outcome(j: Job, error: Optional[BaseException]) -> None:
        if error is None:
            print(f"done: {j.run_dir.name}", flush=True)
            return
        resumable = " (it has a resume state: the same command continues it)" if (
            j.run_dir / "resume.state").exists() else ""
        failed.append(f"{j.run_dir.name}: {str(error).strip().splitlines()[-1]}{resumable}")
        print(f"not finished: {failed[-1]}", flush=True)

    def attempt(call) -> Optional[BaseException]:
        try:
            call()
        except Exception as e:  # noqa: BLE001 -- a run's failure is reported in one line; the others go on
            return e
        return None

    if a.executor == "local":
        with ThreadPoolExecutor(max_workers=a.parallel) as pool:
            for j, error in zip(todo, pool.map(attempt, todo)):
                outcome(j, error)
        return failed
    import submitit

    # the jobs unpickle Job from this module: let them import it (Slurm passes the environment on)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    if a.executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(root / a.log_dir / "submitit"), cluster="slurm")
        ex.update_parameters(timeout_min=a.slurm_time_min, cpus_per_task=a.slurm_cpus, gpus_per_node=a.slurm_gpus,
                             slurm_partition=a.slurm_partition, slurm_signal_delay_s=180)
    else:
        ex = submitit.LocalExecutor(folder=str(root / a.log_dir / "submitit"))
        ex.update_parameters(timeout_min=a.slurm_time_min)
    with ex.batch():
        futures = [ex.submit(j) for j in todo]
    print(f"submitted {len(futures)} jobs: {', '.join(f.job_id for f in futures)}", flush=True)
    for j, f in zip(todo, futures):
        outcome(j, attempt(f.result))
    return failed


def stage1_end(run_dir: Path) -> Optional[int]:
    """RFCL's stage-1 end step, from tensorboard (summary.json is written only when a run ends)."""
    try:
        return int(learning.read_run(run_dir, "curriculum/stage1_end_step")["steps"][0])
    except ValueError:  # rlpd, or stage 1 not over
        return None


def running_here(run_dir: Path) -> bool:
    """Is the process that runs/<exp-name>/.lock names (its latest holder: "pid N on HOST since T") running on this machine now,
    with this run's name on its command line (so not another process that got the pid since)?"""
    try:
        pid, host = re.match(r"pid (\d+) on (\S+) since", (run_dir / ".lock").read_text()).groups()
        return host == socket.gethostname() and run_dir.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, AttributeError):  # no lock file, another format, or no such process
        return False


def run_status(run_dir: Path, machine: str = "-") -> dict:
    """How the run ended (budget, target reached, stopped and resumable) or that it is running now, and where it ran
    (`machine` where its summary does not say)."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = None
    if running_here(run_dir):  # its summary.json, if any, is from an earlier stop
        return {"ended": "running now", "machine": " + ".join((s or {}).get("machines", [])) or machine}
    if s is None:
        return {"ended": "running, or killed", "machine": machine}
    resumable = ", resumable" if (run_dir / "resume.state").exists() else ""
    ended = ("target reached" if s.get("target_reached") else
             f"stopped ({s['stopped_by']}){resumable}" if s.get("stopped_by") else "budget")
    return {"ended": ended, "machine": " + ".join(s.get("machines", [])) or machine}


def previous_report(path: Path) -> dict:
    """Run folder name -> (curve, row) from an earlier <name>.json; {} when there is none."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    curves = {Path(c["run"]).name: c for group in d.get("curves", {}).values()
              for c in learning.curves_from_json(group)}
    return {Path(r["run"]).name: (curves[Path(r["run"]).name], r) for r in d.get("rows", [])
            if Path(r["run"]).name in curves}


def read_paper(path: Optional[str]) -> dict:
    """--paper's file: {"label", "source", "configs": the suite configs its numbers are for (add your copy's, e.g.
    "my_rfcl:5"), "tasks": {ENV_ID: {"reach_0.9", "at_1M", "at_2M", "stage1_end"}}}."""
    if path is None:
        return {"tasks": {}, "configs": []}
    try:
        paper = json.loads(Path(path).read_text())
        missing = [key for key in ("label", "source", "configs", "tasks") if key not in paper]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        for env, numbers in paper["tasks"].items():
            if set(numbers) != set(PAPER_KEYS):
                raise ValueError(f"{env} has {sorted(numbers)}, not {list(PAPER_KEYS)}")
        return paper
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: --paper {path}: not a readable file of published numbers ({e}); see "
                         f"benchmarks/paper_rfcl.json for the format") from None


PAPER_KEYS = ("reach_0.9", "at_1M", "at_2M", "stage1_end")


def mark_paper(ax, paper: dict, env: str, xmax: int) -> None:
    """The published points within the panel's budget, as black stars, and its stage-1 end as a dotted line."""
    p = paper["tasks"][env]
    points = [(x, y) for x, y in ((p["reach_0.9"], 0.9), (1_000_000, p["at_1M"]), (2_000_000, p["at_2M"]))
              if x is not None and y is not None and x <= xmax]
    if points:
        ax.plot(*zip(*points), "k*", ms=8, label=f"{paper['label']} (read from its figure)")
    if p["stage1_end"] is not None and p["stage1_end"] <= xmax:
        ax.axvline(p["stage1_end"], color="k", lw=0.8, ls=":", label=f"{paper['label']}: stage-1 end")


def success_at(curve: dict, step: int):
    """Eval success_at_end of a run at `step` env steps: its last eval at or before it, once the run has got there
    (within 2%, the last eval before a budget's end); else None."""
    steps = np.asarray(curve["steps"])
    if steps[-1] < 0.98 * step:
        return None
    return float(np.asarray(curve["success"])[steps <= step][-1])


def paper_rows(rows: list[dict], curves_out: dict, paper: dict) -> list[dict]:
    """Per task of the paper's and config: each seed's numbers beside the paper's."""
    out = []
    for key, curves in curves_out.items():
        env, config = key.split(" ", 1)
        if env not in paper["tasks"] or config not in paper["configs"]:
            continue
        runs = [r for r in rows if (r["task"], r["config"]) == (env, config)]
        seeds = []
        for c, r in zip(curves, runs):
            seeds.append({"run": Path(r["run"]).name, "steps_to_0.9": r["steps_to_0.9"],
                          "at_1M": success_at(c, 1_000_000), "at_2M": success_at(c, 2_000_000),
                          "stage1_end": r["stage1_end_step"], "last": (r["final_success"], r["final_step"]),
                          "ended": r["ended"]})
        out.append({"task": env, "config": config, "seeds": seeds, "paper": paper["tasks"][env]})
    return out


def paper_markdown(beside: list[dict], paper: dict) -> str:
    """Each task's seeds (one value per seed, in seed order) beside the paper's numbers."""
    def k(steps):
        return f"{steps / 1e6:.2f}M" if steps >= 1_000_000 else f"{steps / 1000:.0f}k"

    def at(s, key):
        if s[key] is not None:
            return f"{s[key]:.2f}"
        if s["ended"] == "target reached":  # a run that met --target-success stopped there
            return f"target met at {k(s['last'][1])}"
        return f"{'ended' if s['ended'] == 'budget' else 'not yet'}: {s['last'][0]:.2f} at {k(s['last'][1])}"

    def reach(s):
        return k(s["steps_to_0.9"]) if s["steps_to_0.9"] is not None else "not reached"

    def stage1(s):
        return k(s["stage1_end"]) if s["stage1_end"] is not None else "not reached"

    def median(values):
        v = [x for x in values if x is not None]
        return f"; median {k(int(np.median(v)))}" if len(v) > 1 and len(v) == len(values) else ""

    def paper_value(v, steps=False):
        return "not within 2M" if v is None else f"~{k(v)}" if steps else f"~{v:.2f}"

    lines = [f"Beside {paper['label']}: {paper['source']}", "",
             "| task | config | seeds | eval success_at_end 0.9 at | paper | at 1M | paper | at 2M | paper | "
             "stage 1 ends | paper |", "|" + " --- |" * 11]
    for b in beside:
        s, p = b["seeds"], b["paper"]
        lines.append(
            f"| {b['task']} | {b['config']} | {len(s)} | {', '.join(map(reach, s))}"
            f"{median([x['steps_to_0.9'] for x in s])} | {paper_value(p['reach_0.9'], True)} | "
            f"{', '.join(at(x, 'at_1M') for x in s)} | {paper_value(p['at_1M'])} | "
            f"{', '.join(at(x, 'at_2M') for x in s)} | {paper_value(p['at_2M'])} | "
            f"{', '.join(map(stage1, s))}{median([x['stage1_end'] for x in s])} | "
            f"{paper_value(p['stage1_end'], True)} |")
    return "\n".join(lines) + "\n"


def report(a: Args, specs: list[RunSpec]) -> dict:
    """One figure (a panel per task, a line per config) and one table over all runs that have eval events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(a.out)
    previous = previous_report(out / f"{a.name}.json")
    paper = read_paper(a.paper)
    envs = list(dict.fromkeys(s.env_id for s in specs))
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.6), dpi=100, squeeze=False)
    rows, curves_out = [], {}
    for ax, env in zip(axes[0], envs):
        for config in a.configs:
            algo, _, n = config.partition(":")
            runs = [run_dir(a, s) for s in specs
                    if (s.env_id, s.algo, s.num_demos) == (env, algo, int(n))]
            curves, kept = [], {}
            for r in runs:
                if list(r.glob("events.out.tfevents.*")):
                    try:
                        curves.append(learning.read_run(r))
                    except ValueError:  # not started, or no eval yet
                        print(f"{r.name}: no eval yet, left out", flush=True)
                elif r.name in previous:
                    curve, kept[r.name] = previous[r.name]
                    curves.append(curve)
                    print(f"{r.name}: not under {r.parent}; row and curve kept from {out / a.name}.json", flush=True)
            if not curves:
                continue
            curves_out[f"{env} {config}"] = learning.curves_json(curves)
            for c, row in zip(curves, learning.summarise(curves)["runs"]):
                name = Path(c["run"]).name
                if name in kept:  # its resume state went with its folder
                    old = kept[name]
                    where = {"stage1_end_step": old["stage1_end_step"], "machine": old["machine"],
                             "ended": old["ended"].replace(", resumable", "")}
                else:
                    where = {"stage1_end_step": stage1_end(Path(c["run"])), **run_status(Path(c["run"]), a.machine)}
                rows.append({"task": env, "config": config, **row, **where})
            seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
            learning.band(ax, curves, f"{algo.upper()}, {n} demos ({seeds})")
            if len(curves) > 1:  # how much of one curve is luck
                for c in curves:
                    ax.plot(c["steps"], c["success"], color=ax.get_lines()[-1].get_color(), lw=0.6, alpha=0.6)
        if not ax.get_lines():  # the panel stays, empty over the task's budget, so the grid's shape is visible
            ax.set_xlim(0, max(s.total for s in specs if s.env_id == env))
            ax.text(0.5, 0.5, "no eval yet", transform=ax.transAxes, ha="center", color="gray")
        if env in paper["tasks"]:
            mark_paper(ax, paper, env, max(s.total for s in specs if s.env_id == env))
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(0.9, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        if ax.get_legend_handles_labels()[0]:
            # below the panel: inside it, a legend hides whatever curve lies under it (a run at 0 all along)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    axes[0][0].set_ylabel("eval success_at_end")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{a.name}.png", bbox_inches="tight")  # the legends below the panels too
    plt.close(fig)
    def reach(r, prefix, th):
        steps, wall = r[f"{prefix}steps_to_{th}"], r[f"{prefix}wall_s_to_{th}"]
        return "not reached" if steps is None else f"{steps:,} ({wall:.0f} s)"

    lines = ["| task | config | run | stage 1 ends | success_at_end: 0.5 | 0.9 | success_once: 0.5 | 0.9 | "
             "last eval: at_end / once | ended | env steps/s | machine |", "|" + " --- |" * 12]
    for r in rows:
        stage1 = "-" if r["config"].startswith("rlpd") else (
            "not reached" if r["stage1_end_step"] is None else f"{r['stage1_end_step']:,}")
        lines.append(f"| {r['task']} | {r['config']} | {Path(r['run']).name} | {stage1} | {reach(r, '', 0.5)} | "
                     f"{reach(r, '', 0.9)} | {reach(r, 'once_', 0.5)} | {reach(r, 'once_', 0.9)} | "
                     f"{r['final_success']:.2f} / {r.get('final_success_once', float('nan')):.2f} at "
                     f"{r['final_step']:,} | {r['ended']} | {r['sps']:.0f} | {r['machine']} |")
    md = "\n".join(lines) + "\n"
    beside = paper_rows(rows, curves_out, paper)
    if beside:
        md += "\n" + paper_markdown(beside, paper)
    for path, text in ((out / f"{a.name}.md", md),
                       (out / f"{a.name}.json", json.dumps({"rows": rows, "curves": curves_out, "paper": beside},
                                                          indent=1))):
        tmp = path.with_name(path.name + ".tmp")  # the old json is the record of runs whose folders are gone
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md + f"wrote {out / a.name}.png/.md/.json", flush=True)
    return {"rows": rows}


def main(a: Args) -> dict:
    specs = grid(a)
    read_paper(a.paper)  # a bad file is refused before any run starts
    t0 = time.time()
    failed = run_grid(a, specs)
    print(f"grid done in {time.time() - t0:.0f} s", flush=True)
    result = report(a, specs)
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(specs)} runs did not finish:\n  " + "\n  ".join(failed))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
