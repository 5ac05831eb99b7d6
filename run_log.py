"""What a training loop logs and when, shared by rfcl.py, rlpd.py and their copies: read it to change the charts
besides the algorithm's own numbers, the log/eval/save schedule, the time split or the progress bar.
RunLog: the wall-clock split (simulation, update, eval, save), finished training episodes, the schedule, evals and
--target-success, tensorboard (and W&B with --track), summary.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import common
import run_files
import stop_signals
from common import fail, write_json


def check_wandb() -> None:
    """--track needs Weights & Biases, imported only then."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        fail("--track needs Weights & Biases: pip install wandb (or drop --track)")


def open_writer(run_dir: Path, config: dict, wandb_project: Optional[str] = None,
                resume_step: Optional[int] = None):
    """TensorBoard writer with `config` (the flags) as text. With a wandb_project (--track), W&B starts first: its
    TensorBoard sync patches the writer, so a writer made before wandb.init would send it nothing. On --resume at
    step N the writer continues the same directory and drops any event after N (written after the resume state,
    before the stop), so every tag has each step once."""
    if wandb_project is not None:
        import wandb

        wandb.init(project=wandb_project, name=run_dir.name, config=config, sync_tensorboard=True, save_code=True,
                   dir=str(run_dir), id=run_dir.name, resume="allow")
    if resume_step is not None:
        return SummaryWriter(str(run_dir), purge_step=resume_step + 1)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    return writer


def open_run(run_dir: Path, config: dict, resuming: bool, saved: Optional[dict], step: int, state_bytes: int,
             wandb_project: Optional[str], **schedule):
    """The run directory with args.json (run_files.make_run_dir), tensorboard, a RunLog (its other arguments in
    `schedule`; as `saved` holds it on --resume or --fork) and the stop request that from now on turns Ctrl-C,
    SIGTERM and SIGHUP into a save and a stop at the next iteration boundary: (run, stop)."""
    stop_signals.exit_if_signalled()
    run_files.make_run_dir(run_dir, config, resuming=resuming, state_bytes=state_bytes)
    print(f"run directory: {run_dir}", flush=True)
    run = RunLog(run_dir, open_writer(run_dir, config, wandb_project, step if resuming else None), **schedule)
    if saved:
        run.load_state_dict(saved, step)
    return run, stop_signals.StopRequest()


class RunLog:
    """What both training loops keep besides the algorithm: the wall-clock split (simulation, updates, eval, save),
    the stats of finished training episodes, the log/eval/save schedule (every log_freq, eval_freq, save_freq env
    steps), the eval settings, --target-success, tensorboard and the progress bar."""

    def __init__(self, run_dir: Path, writer, total_timesteps: int, log_freq: int, eval_freq: int, save_freq: int,
                 eval_horizon: int, eval_episodes: int, video: bool, target_success: Optional[float],
                 target_evals: int):
        self.run_dir, self.writer, self.total = run_dir, writer, total_timesteps
        self.freq = {"log": log_freq, "eval": eval_freq, "save": save_freq}
        self.eval_horizon, self.eval_episodes, self.video = eval_horizon, eval_episodes, video
        self.target_success, self.target_evals = target_success, target_evals
        self.seconds = {"simulation": 0.0, "update": 0.0, "eval": 0.0, "save": 0.0}
        self.last = {"log": 0, "eval": 0, "save": 0}  # env step of the last of each
        self.episodes = {"return": [], "success_at_end": [], "success_once": []}
        self.last_success = float("nan")
        self.evals = []  # (step, eval success_at_end) of every eval, for --target-success
        # where it ran: a resumed run may continue on another machine
        self.machines = [f"{os.cpu_count()} CPU cores, JAX on {jax.devices()[0].device_kind}"]
        self.t_start = time.time()
        self.pbar = tqdm(total=total_timesteps, unit="step", dynamic_ncols=True, smoothing=0.05)

    def state_dict(self) -> dict:
        """The schedule, the time split, wall-clock so far and the finished episodes not yet logged (--resume)."""
        return {"last": dict(self.last), "seconds": dict(self.seconds), "episodes": self.episodes,
                "last_success": self.last_success, "evals": self.evals, "machines": self.machines,
                "elapsed": time.time() - self.t_start}

    def load_state_dict(self, d: dict, step: int) -> None:
        self.last = {k: int(v) for k, v in d["last"].items()}
        self.seconds = {k: float(v) for k, v in d["seconds"].items()}
        self.episodes = {k: [float(x) for x in v] for k, v in d["episodes"].items()}
        self.last_success = float(d["last_success"])
        # both absent from states written before --target-success
        self.evals = [[int(t), float(v)] for t, v in d.get("evals", [])]
        self.machines = list(dict.fromkeys([*d.get("machines", []), *self.machines]))
        self.t_start = time.time() - float(d["elapsed"])  # SPS and the time split continue over the whole run
        self.pbar.reset(total=self.total)
        self.pbar.update(step)

    @contextlib.contextmanager
    def timed(self, part: str):
        t0 = time.time()
        yield
        self.seconds[part] += time.time() - t0

    def progress(self, step: int) -> None:
        """Move the progress bar to env step `step`."""
        self.pbar.update(step - self.pbar.n)

    def episode_ended(self, ret: float, success_at_end: bool, success_once: bool) -> None:
        for k, v in (("return", ret), ("success_at_end", success_at_end), ("success_once", success_once)):
            self.episodes[k].append(float(v))

    def due(self, what: str, step: int) -> bool:
        """Whether a log, eval or save is due at `step`: its frequency has passed since the last one (eval also at the
        last step). Asking changes nothing: log(), evaluate() and saved() record that they happened."""
        return step - self.last[what] >= self.freq[what] or (what == "eval" and step >= self.total)

    def save_point(self, step: int, stopping: bool, done: bool, force: bool, checkpoint: Callable[[str], None],
                   write_resume_state: Callable[[], None]) -> bool:
        """Checkpoints every save_freq env steps and at a stop signal (checkpoint("step_<step>.ckpt")) and at the
        end (checkpoint("final.ckpt")); then, at those and wherever `force` (e.g. RFCL's stage switch), a save point:
        tensorboard flushed, then write_resume_state() writes the state a --resume continues from. Returns whether
        it made a save point: the script then starts a new episode in every env, as a resumed run does (a resume
        state holds no simulator state), so that the run that goes on and a resumed one go on identically."""
        saving = self.due("save", step)
        if saving:
            self.last["save"] = step
        if saving or stopping:
            checkpoint(f"step_{step:08d}.ckpt")
        if done and not stopping:
            checkpoint("final.ckpt")
        if not (saving or force or done):
            return False
        self.writer.flush()  # tensorboard holds every step up to here before the state that resumes after it
        with self.timed("save"):
            write_resume_state()
        return True

    def log(self, step: int, scalars: dict, **postfix) -> None:
        """Write `scalars` plus SPS, the time split and the episodes finished since the last log."""
        self.last["log"] = step
        elapsed = time.time() - self.t_start
        s = self.seconds
        out = {"charts/SPS": step / elapsed, "time/simulation_frac": s["simulation"] / elapsed,
               "time/update_frac": s["update"] / elapsed, "time/eval_frac": s["eval"] / elapsed,
               "time/save_frac": s["save"] / elapsed,
               "time/other_frac": 1 - sum(s.values()) / elapsed, **scalars}
        if self.episodes["return"]:
            out.update({"charts/episodic_return": np.mean(self.episodes["return"]),
                        "charts/success_at_end": np.mean(self.episodes["success_at_end"]),
                        "charts/success_once": np.mean(self.episodes["success_once"])})
            self.episodes = {k: [] for k in self.episodes}
        for k, v in out.items():
            self.writer.add_scalar(k, float(v), step)
        self.pbar.set_postfix(SPS=f"{out['charts/SPS']:.0f}", eval=f"{self.last_success:.2f}", **postfix)

    def evaluate(self, envs, act_fn, step: int) -> dict:
        """Eval episodes (common.evaluate) with a video, logged at `step`."""
        self.last["eval"] = step
        with self.timed("eval"):
            video = str(self.run_dir / "videos" / f"eval_{step:08d}.mp4") if self.video else None
            metrics = common.evaluate(envs, act_fn, self.eval_horizon, self.eval_episodes, video)
        self.last_success = metrics["eval/success_at_end"]
        self.evals.append([step, self.last_success])
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        tqdm.write(f"step {step}: eval success_at_end {self.last_success:.3f} success_once "
                   f"{metrics['eval/success_once']:.3f} ({metrics['eval/episodes']} episodes)")
        if self.target_reached:
            tqdm.write(f"step {step}: eval success_at_end >= {self.target_success} in the last "
                       f"{self.target_evals} evals (--target-success): the run ends here")
        return metrics

    @property
    def target_reached(self) -> bool:
        """--target-success: the last --target-evals evals all reached it (judged with the flags as they are now,
        so a resumed run may change them)."""
        last = [v for _, v in self.evals[-self.target_evals:]]
        return (self.target_success is not None and len(last) == self.target_evals
                and min(last) >= self.target_success)

    def finish(self, step: int, stop: Optional[stop_signals.StopRequest] = None, **extra) -> dict:
        """runs/<exp-name>/summary.json, also printed; after a stop signal, one line on what was saved."""
        self.pbar.close()
        if stop:  # the signals stay with `stop` until the last line is out: the save point is complete by now
            stop.lost = f"the resume state is saved (--resume {self.run_dir} continues); summary.json may not be"
        summary = {"global_step": step, "stopped_by": stop.name if stop else None,
                   "target_reached": self.target_reached, **extra,
                   "eval_success_at_end": None if np.isnan(self.last_success) else self.last_success,
                   "wall_clock_s": time.time() - self.t_start, "machines": self.machines,
                   **{f"time_{k}_s": v for k, v in self.seconds.items()}}
        write_json(self.run_dir / "summary.json", summary)
        print(json.dumps(summary))
        self.writer.close()
        if stop:
            print(f"stopped by {stop.name} at env step {step}; continue with: python {Path(sys.argv[0]).name} "
                  f"--resume {self.run_dir}", file=sys.stderr)
        if stop is not None:
            stop.restore()
        return summary
