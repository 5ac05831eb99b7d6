"""Shared plumbing for rfcl.py, rlpd.py and collect_demos.py. Nothing algorithmic lives here.

What is here is the part of a run that both algorithms must do the same way, so that their numbers compare:
  * run set-up:    presets, input checks, the runs/<exp-name>/ directory, tensorboard (+ W&B), atomic files.
  * demos:         get_demos() finds a ManiSkill trajectory file for (env id, obs mode, control mode) or makes one
                   (download if the network allows, else ManiSkill's motion planners, offline), cached;
                   load_demos() reads and validates it into flat transition arrays + per-trajectory env states.
  * environments:  CPU (one process per env) and GPU-batched ManiSkill envs behind one reset/step interface,
                   with resets to a demo's state; eval-episode rollouts; mp4 videos.
  * checkpoints:   one self-describing file per checkpoint, written atomically, read back with one-line errors.
Every user-facing failure is one line saying what was wrong and how to fix it (fail(), DemoError).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import multiprocessing.util  # registers multiprocessing's exit handler, before _kill_env_workers
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import gymnasium as gym
import h5py
import jax
import mani_skill.envs  # noqa: F401 - registers ManiSkill's envs with gymnasium
import numpy as np
import torch
import tyro
from flax import serialization
from gymnasium.vector import AutoresetMode
from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

KNOWN_ALGORITHMS = ("rfcl", "rlpd")


# ----------------------------------------------------------------------------------------------
# Run set-up
# ----------------------------------------------------------------------------------------------
def fail(msg: str):
    """One-line error for the user, no traceback."""
    sys.exit(f"error: {msg}")


def parse_args(args_cls, presets: dict, description: str, argv=None, task_defaults: Optional[dict] = None,
               algorithm: Optional[str] = None):
    """Defaults in layers, each overriding the one before: the Args class; the env's registered horizon
    (max_episode_steps); the script's per-task table (task_defaults[env_id]); the values `--preset X` sets;
    every flag given on the command line. Prints the per-task values it applied; args.json records the result.
    With --resume DIR the run's args.json is the source of truth instead (resume_args)."""
    argv = sys.argv[1:] if argv is None else argv
    preset = next(iter(presets))
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    default = presets.get(preset, presets[next(iter(presets))])  # tyro rejects an unknown name itself
    given = {a[2:].split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}
    if "resume" in given:
        return resume_args(args_cls, argv, given, description, algorithm)
    args = tyro.cli(args_cls, default=default, args=argv, description=description)
    base = dataclasses.asdict(args_cls())
    set_by_preset = {k for k, v in dataclasses.asdict(default).items() if v != base[k]}
    layer = dict(task_defaults or {}).get(args.env_id, {})
    if hasattr(args, "max_episode_steps") and args.env_id in gym.registry:
        layer = {"max_episode_steps": gym.spec(args.env_id).max_episode_steps, **layer}
    applied = {}
    for name, value in layer.items():
        if name.replace("_", "-") in given or name in set_by_preset or value is None:
            continue
        if getattr(args, name) != value:
            applied[name] = value
        setattr(args, name, value)
    if applied:
        print(f"[{args.env_id}] per-task defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in
              applied.items()) + " (a flag on the command line overrides each)", flush=True)
    return args


RESUME_FILE = "resume.state"
RESUME_FORMAT, RESUME_VERSION = "rfcl-jax resume state", 1
# flags that change when and what is logged, saved or how long the run goes, never what it learns
RESUME_FLAGS = ("total-timesteps", "target-success", "target-evals", "eval-freq", "save-freq", "capture-video",
                "no-capture-video", "num-eval-episodes")


def resume_args(args_cls, argv, given: set, description: str, algorithm: Optional[str]):
    """--resume DIR: the run's args.json, plus only the RESUME_FLAGS given on the command line."""
    for flag in sorted(given - {"resume", *RESUME_FLAGS}):
        fail(f"--{flag} cannot be given with --resume: the run's args.json fixes it; only "
             f"{', '.join('--' + f for f in RESUME_FLAGS)} may change")
    i = next(i for i, a in enumerate(argv) if a.replace("_", "-").split("=", 1)[0] == "--resume")
    run_dir = Path(argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else ""))
    if not run_dir.is_dir():
        fail(f"--resume {run_dir}: no such run directory; pass runs/<exp-name> of the run to continue")
    header = read_resume_header(run_dir / RESUME_FILE, algorithm)
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        base = args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    except Exception as e:  # noqa: BLE001 - missing, unreadable or from another version of the script
        fail(f"{run_dir / 'args.json'} is missing or does not match this script's flags ({type(e).__name__}: {e})")
    args = tyro.cli(args_cls, default=base, args=argv, description=description)
    args.resume = str(run_dir)
    for k, v in header["args"].items():
        if k not in ("resume", *(f.replace("-", "_") for f in RESUME_FLAGS)) and json.dumps(v) != json.dumps(
                getattr(args, k, None), default=list):
            fail(f"{run_dir / 'args.json'} says --{k.replace('_', '-')} {getattr(args, k, None)} but the run's resume "
                 f"state was written with {v}; restore args.json (nothing was changed)")
    if args.total_timesteps <= header["global_step"]:
        fail(f"{run_dir} is already at env step {header['global_step']}; give a larger --total-timesteps to "
             f"train it further")
    return args


def read_resume_header(path: Path, algorithm: Optional[str]) -> dict:
    """The first line of a resume state: what it is, who wrote it, at which step, with which flags."""
    if not path.is_file():
        fail(f"{path.parent} holds no resume state ({path.name}); it is written every --save-freq steps, at the "
             f"stage switch, at the end and on SIGINT/SIGTERM. --checkpoint {path.parent}/checkpoints/<file>.ckpt "
             f"starts a new run from saved networks")
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
        header["format"], header["version"], header["algorithm"], header["global_step"], header["args"]  # noqa: B018
    except Exception:  # noqa: BLE001
        fail(f"{path} is not a readable resume state (corrupted or another format)")
    if header["format"] != RESUME_FORMAT:
        fail(f"{path} is not a resume state of these scripts (format {header['format']!r})")
    if header["version"] != RESUME_VERSION:
        fail(f"{path} was written by resume-state version {header['version']}; this script reads version "
             f"{RESUME_VERSION}: resume it with the version of the code that wrote it")
    if algorithm is not None and header["algorithm"] != algorithm:
        fail(f"{path.parent} is a {header['algorithm']} run; resume it with {header['algorithm']}.py")
    return header


def save_resume_state(path: Path, algorithm: str, args, global_step: int, stage: int, payload: dict) -> float:
    """Everything a run needs to continue exactly: a one-line JSON header, then the msgpack payload (learner state,
    optimizer states, buffers, curricula, generators, schedule). Written atomically: the previous state stays until
    this one is complete on disk. Returns the seconds it took."""
    t0 = time.time()
    body = serialization.msgpack_serialize(payload)
    header = {"format": RESUME_FORMAT, "version": RESUME_VERSION, "algorithm": algorithm, "global_step": global_step,
              "stage": stage, "args": dataclasses.asdict(args), "payload_bytes": len(body),
              "payload_crc32": zlib.crc32(body)}
    write_atomic(path, [json.dumps(header).encode() + b"\n", body])
    return time.time() - t0


def load_resume_state(path: Path, algorithm: str) -> tuple[dict, dict]:
    """(header, payload) of a resume state, checked whole: a truncated or corrupted file is a one-line error."""
    header = read_resume_header(path, algorithm)
    with open(path, "rb") as f:
        f.readline()
        body = f.read()
    if len(body) != header["payload_bytes"] or zlib.crc32(body) != header["payload_crc32"]:
        fail(f"{path} is truncated or corrupted ({len(body)} of {header['payload_bytes']} payload bytes, or a "
             f"checksum mismatch); the run cannot continue exactly from it. --checkpoint "
             f"{path.parent}/checkpoints/<file>.ckpt starts a new run from saved networks")
    return header, serialization.msgpack_restore(body)


# ManiSkill tasks that build a different object per env: on CPU (1 env per process) they rebuild it at every seeded
# reset; a GPU-batched env fixes each env's object at creation
PER_ENV_OBJECT_TASKS = ("PickSingleYCB", "OpenCabinetDrawer", "RotateSingleObjectInHand")


def check_inputs(args, algorithm: str) -> tuple[Optional[dict], Path]:
    """The checks rfcl.py and rlpd.py share, before anything is built or written. Returns the --checkpoint
    (or None) and the run directory to create once the envs and demos are found to match."""
    if args.env_id not in gym.registry:
        try:
            gym.spec(args.env_id)
        except gym.error.Error as e:  # gymnasium's message says "Did you mean" where it can
            fail(f"unknown env id {args.env_id!r}: {e}")
    if getattr(args, "max_episode_steps", 0) is None:
        fail(f"{args.env_id} registers no max_episode_steps; give the episode horizon with --max-episode-steps")
    for name in ("total_timesteps", "num_envs", "num_eval_envs", "num_eval_episodes", "steps_per_env",
                 "grad_updates_per_step", "eval_freq", "save_freq", "log_freq", "buffer_size", "batch_size",
                 "max_episode_steps", "actor_update_freq", "num_qs", "target_evals"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.target_success is not None and not 0 <= args.target_success <= 1:
        fail(f"--target-success is an eval success rate in [0, 1], got {args.target_success}")
    if args.batch_size % 2:
        fail("--batch-size must be even (half online, half offline)")
    if not 1 <= args.num_min_qs <= args.num_qs:
        fail(f"--num-min-qs must be in 1..--num-qs ({args.num_qs}), got {args.num_min_qs}")
    if args.evaluate and not args.checkpoint:
        fail("--evaluate needs --checkpoint PATH")
    if (algorithm == "rfcl" and args.sim_backend == "gpu" and args.num_envs > 1
            and args.env_id.rsplit("-", 1)[0] in PER_ENV_OBJECT_TASKS):
        fail(f"{args.env_id} gives each GPU env its own object, chosen once when the envs are built, while RFCL resets "
             f"envs to demo states recorded with the demo's object: use --sim-backend cpu (or --num-envs 1) for it")
    if args.sim_backend == "gpu":
        check_gpu_simulation()
    if args.track:
        try:
            import wandb  # noqa: F401 - optional, only with --track
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb (or drop --track)")
    ckpt = load_checkpoint(args.checkpoint, algorithm, args) if args.checkpoint else None
    return ckpt, Path(args.resume) if getattr(args, "resume", None) else run_dir_for(args, algorithm)


def check_gpu_simulation() -> None:
    """--sim-backend gpu needs CUDA for torch and for jax (observations pass between them by DLPack), and SAPIEN's
    PhysX GPU library, which SAPIEN downloads from GitHub the first time GPU physics starts."""
    if not torch.cuda.is_available():
        fail("GPU simulation needs CUDA; use --sim-backend cpu")
    # JAX would take 75% of the GPU at start-up and leave PhysX, torch and the renderer the rest
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if jax.default_backend() != "gpu":
        fail("GPU simulation needs a CUDA build of jax (pip install \"jax[cuda12]==0.6.2\"); or use --sim-backend cpu")
    import sapien

    try:
        sapien.physx.enable_gpu()  # a no-op once loaded
    except Exception as e:  # noqa: BLE001 - a failed download or load, reported as one line
        where = Path.home() / ".sapien" / "physx" / sapien.physx.version()
        fail(f"SAPIEN's PhysX GPU library could not be downloaded or loaded ({type(e).__name__}); on a machine "
             f"without access to GitHub, unzip linux-so.zip of release {sapien.physx.version()} of "
             f"sapien-sim/physx-precompiled into {where} (it holds libPhysXGpu_64.so), or use --sim-backend cpu")


def run_dir_for(args, algorithm: str) -> Path:
    """runs/<exp-name>: a plain name, refused if it exists. Created by make_run_dir once the inputs are
    validated, so a rejected command leaves nothing behind that would block its corrected rerun."""
    if args.exp_name is None:
        args.exp_name = f"{args.env_id}__{algorithm}{'_eval' if args.evaluate else ''}__{args.seed}__{int(time.time())}"
    if Path(args.exp_name).name != args.exp_name or args.exp_name in ("", ".", ".."):
        fail(f"--exp-name must be a plain name (a folder under runs/), got {args.exp_name!r}")
    run_dir = Path("runs") / args.exp_name
    if run_dir.exists():
        fail(f"run directory {run_dir} already exists; pass another --exp-name (nothing was overwritten)")
    return run_dir


def make_run_dir(run_dir: Path, args) -> None:
    """runs/<exp-name>/ with args.json; on --resume the directory exists and args.json gets the changed flags."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=bool(getattr(args, "resume", None)))
    (run_dir / "videos").mkdir(exist_ok=bool(getattr(args, "resume", None)))
    write_json(run_dir / "args.json", dataclasses.asdict(args))


def open_writer(run_dir: Path, args, resume_step: Optional[int] = None):
    """TensorBoard writer with the hyper-parameters as text. With --track, W&B starts first: its TensorBoard
    sync patches the writer, so a writer made before wandb.init would send it nothing. On --resume at step N the
    writer continues the same directory and drops any event after N (written after the resume state, before the
    stop), so every tag has each step once."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, name=args.exp_name, config=dataclasses.asdict(args),
                   sync_tensorboard=True, save_code=True, dir=str(run_dir), id=args.exp_name, resume="allow")
    if resume_step is not None:
        return SummaryWriter(str(run_dir), purge_step=resume_step + 1)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
    return writer


def write_atomic(path: Path, data) -> None:
    """Write `data` (bytes, or a list of bytes) to a hidden temporary file beside `path`, flush it to disk, then
    rename: a reader never sees half a file, and a crash leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for chunk in [data] if isinstance(data, (bytes, bytearray)) else data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2).encode())


# ----------------------------------------------------------------------------------------------
# Demonstrations
# ----------------------------------------------------------------------------------------------
class DemoError(ValueError):
    """A problem with demonstration data that the user can fix; the message says how."""


# ManiSkill's motion-planning solutions (mani_skill.examples.motionplanning.panda.run.MP_SOLUTIONS in 3.0.1).
MOTION_PLANNING_ENVS = (
    "DrawTriangle-v1", "PickCube-v1", "StackCube-v1", "PegInsertionSide-v1", "PlugCharger-v1",
    "PlaceSphere-v1", "PushCube-v1", "PullCubeTool-v1", "LiftPegUpright-v1", "PullCube-v1",
    "DrawSVG-v1", "StackPyramid-v1",
)


def demo_dir() -> Path:
    """ManiSkill's demo folder: $MS_ASSET_DIR/demos, default ~/.maniskill/demos (read at call time)."""
    root = os.environ.get("MS_ASSET_DIR", os.path.join(os.path.expanduser("~"), ".maniskill"))
    return Path(root) / "demos"


# ----------------------------------------------------------------------------------------------
# Finding and making demonstration files
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _file_modes(meta: dict) -> tuple[str | None, str | None, str | None]:
    info = meta.get("env_info", {})
    kw = info.get("env_kwargs", {})
    return info.get("env_id"), kw.get("obs_mode"), kw.get("control_mode")


def find_demo_file(env_id: str, obs_mode: str, control_mode: str, min_demos: int = 1) -> Path | None:
    """The cached/downloaded trajectory file under demo_dir()/env_id with the requested modes and at
    least `min_demos` trajectories; the largest such file wins (so an official dataset beats a small
    generated one). None if there is none."""
    best, best_n = None, -1
    for h5 in sorted((demo_dir() / env_id).rglob("*.h5")):
        js = h5.with_suffix(".json")
        if any(part.startswith(".tmp") for part in h5.parts) or not js.exists():
            continue
        try:
            meta = _read_json(js)
        except (OSError, ValueError):
            continue
        if _file_modes(meta) != (env_id, obs_mode, control_mode):
            continue
        n = len(meta.get("episodes", []))
        if n >= min_demos and n > best_n:
            best, best_n = h5, n
    return best


def _network_ok(url: str = "https://huggingface.co", timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable network"
        return False


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    # ManiSkill's own progress bars go straight to the terminal
    print(f"[demos] {what}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd)
    if proc.returncode != 0:
        raise DemoError(f"{what} failed (exit {proc.returncode}, output above): python {' '.join(cmd[1:])}")


def _convert(raw_h5: Path, obs_mode: str, control_mode: str, cwd: Path) -> Path:
    """Replay pd_joint_pos trajectories into the requested obs/control mode, keeping env states."""
    _run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory",
          "--traj-path", str(raw_h5), "--use-first-env-state", "-c", control_mode, "-o", obs_mode,
          "--save-traj", "--record-rewards", "--num-envs", "1"], cwd, "converting demos")
    out = raw_h5.with_name(f"{raw_h5.stem}.{obs_mode}.{control_mode}.physx_cpu.h5")
    if not out.exists():
        raise DemoError(f"conversion of {raw_h5} wrote no {out.name}; convert it by hand with "
                        "python -m mani_skill.trajectory.replay_trajectory and pass --dataset-path")
    return out


def generate_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int) -> Path:
    """Generate >= num_demos successful demos offline with ManiSkill's motion planner, convert them, and
    cache them in demo_dir()/env_id/motionplanning/. Files appear atomically (json last)."""
    if env_id not in MOTION_PLANNING_ENVS:
        raise DemoError(f"no demos for {env_id} on disk, none downloadable here, and ManiSkill has no motion "
                        f"planner for it; record demos (ManiSkill trajectory .h5) and pass --dataset-path")
    final_dir = demo_dir() / env_id / "motionplanning"
    final_dir.mkdir(parents=True, exist_ok=True)
    # A few extra: a planner trajectory can fail to convert to a delta controller.
    n_gen = num_demos + max(2, num_demos // 10)
    name = f"generated_{n_gen}_{time.strftime('%Y%m%d_%H%M%S')}"
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".tmp", dir=final_dir) as tmp:
        tmp = Path(tmp)
        stats_path = tmp / "planner_stats.json"
        _run([sys.executable, str(Path(__file__).resolve()), "plan-demos", env_id, str(n_gen),
              str(planner_attempts(n_gen)), str(tmp / name), str(stats_path)],
             tmp, f"generating {n_gen} demos with the motion planner")
        stats = _read_json(stats_path)
        print(f"[demos] planner: {stats['successes']}/{stats['attempts']} attempts solved "
              f"{env_id}, {stats['seconds_per_success']:.1f} s per demo", flush=True)
        if stats["successes"] < n_gen:
            raise DemoError(f"ManiSkill's motion planner solved {env_id} only {stats['successes']} times in "
                            f"{stats['attempts']} attempts (budget 3 per demo + 10); record demos another way "
                            "and pass --dataset-path, or ask for fewer with --num-demos")
        raw = tmp / f"{name}.h5"
        out = _convert(raw, obs_mode, control_mode, tmp)
        n_ok = len(_read_json(out.with_suffix(".json"))["episodes"])
        write_json(final_dir / f"{name}.planner.json", {**stats, "converted": n_ok})  # kept also when too few
        if n_ok < num_demos:
            raise DemoError(f"only {n_ok}/{n_gen} planner demos of {env_id} converted to {control_mode}; "
                            f"ask for fewer (--num-demos {n_ok}) or another --control-mode")
        # the raw pd_joint_pos file is kept too: it is the source the converted one came from
        for src in (raw, raw.with_suffix(".json"), out, out.with_suffix(".json")):
            os.replace(src, final_dir / src.name)
    print(f"[demos] {n_ok} demos of {env_id} cached in {final_dir} ({time.time() - t0:.1f} s)", flush=True)
    return final_dir / out.name


def planner_attempts(num_demos: int) -> int:
    """Retry budget of the motion planner: 3 attempts per demo + 10, then a clear error instead of a hang
    (ManiSkill's own runner retries forever on a task its planner cannot solve)."""
    return 3 * num_demos + 10


def plan_demos(env_id: str, num_demos: int, max_attempts: int, out_stem: str) -> dict:
    """Run ManiSkill's motion-planning solution of env_id on seeds 0, 1, ... until num_demos succeed or
    max_attempts are spent; record the successful ones (pd_joint_pos, env states) to out_stem.h5/.json like
    mani_skill.examples.motionplanning.panda.run does. Returns the planner's statistics. Run in a subprocess
    (generate_demos): the planners' native code can crash its process."""
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS
    from mani_skill.utils.wrappers.record import RecordEpisode

    env = make_env(env_id, obs_mode="none", control_mode="pd_joint_pos", render_mode="rgb_array", sim_backend="cpu")
    out = Path(out_stem)
    env = RecordEpisode(env, output_dir=str(out.parent), trajectory_name=out.name, save_video=False,
                        source_type="motionplanning",
                        source_desc="official motion planning solution from ManiSkill contributors",
                        record_reward=False, save_on_reset=False)
    lengths, attempts, t_all = [], 0, time.time()
    with tqdm(total=num_demos, desc=f"planning {env_id}") as bar:
        while len(lengths) < num_demos and attempts < max_attempts:
            try:
                res = MP_SOLUTIONS[env_id](env, seed=attempts, debug=False, vis=False)
            except Exception as e:  # noqa: BLE001 - a failed plan is one failed attempt, as in ManiSkill's runner
                print(f"planner error on seed {attempts}: {e}", flush=True)
                res = -1
            attempts += 1
            if res != -1 and bool(res[-1]["success"].item()):
                env.flush_trajectory()
                lengths.append(int(res[-1]["elapsed_steps"].item()))
                bar.update(1)
            else:
                env.flush_trajectory(save=False)
    env.close()
    total = time.time() - t_all
    return dict(env_id=env_id, attempts=attempts, successes=len(lengths), success_rate=len(lengths) / attempts,
                seconds_total=total, seconds_per_success=total / max(len(lengths), 1),
                seconds_per_attempt=total / attempts, lengths=lengths)


def _download_demos(env_id: str, obs_mode: str, control_mode: str) -> Path | None:
    if not _network_ok():
        print("[demos] no network for ManiSkill's demo download; generating demos offline instead", flush=True)
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "mani_skill.utils.download_demo", env_id, "-o", str(demo_dir())],
                 Path(tmp), "downloading demos")
    except DemoError as e:
        print(f"[demos] download failed ({e}); generating demos offline instead", flush=True)
        return None
    raws = [p for p in (demo_dir() / env_id).rglob("trajectory.h5")]
    for raw in raws:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return _convert(raw, obs_mode, control_mode, Path(tmp))
            except DemoError as e:
                print(f"[demos] {e}", flush=True)
    return None


def get_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int,
              dataset_path: str | None = None) -> Path:
    """Path of a trajectory file with >= num_demos demos: `dataset_path` if given, else cached, else
    downloaded, else generated offline."""
    if dataset_path:
        return Path(dataset_path)
    found = find_demo_file(env_id, obs_mode, control_mode, num_demos)
    if found is not None:
        return found
    print(f"[demos] no cached {env_id} demos ({obs_mode}, {control_mode}, >= {num_demos}) in {demo_dir()}",
          flush=True)
    path = _download_demos(env_id, obs_mode, control_mode)
    if path is not None and len(_read_json(path.with_suffix(".json"))["episodes"]) >= num_demos:
        return path
    return generate_demos(env_id, obs_mode, control_mode, num_demos)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class Demos:
    """Transitions of the first `num_demos` trajectories, flattened in trajectory order.

    rewards = the demo's per-step success (sparse); terminated as recorded (else = success); `traj_end` marks
    each trajectory's last transition. Per trajectory (lists, len num_demos): obs (T+1, obs_dim), env_states
    (nested dict of arrays with leading T+1; empty when loaded without them), episode json.
    """

    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    traj_end: np.ndarray
    traj_obs: list = field(default_factory=list)
    env_states: list = field(default_factory=list)
    episodes: list = field(default_factory=list)

    @property
    def num_trajectories(self) -> int:
        return len(self.traj_obs)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(o) - 1 for o in self.traj_obs])


def _read_group(g: h5py.Group) -> dict:
    return {k: (_read_group(v) if isinstance(v, h5py.Group) else v[()]) for k, v in g.items()}


def load_demos(path, num_demos: int, env_id: str | None = None, obs_mode: str | None = None,
               control_mode: str | None = None, obs_dim: int | None = None, act_dim: int | None = None,
               env_states: bool = True) -> Demos:
    """Load and validate the first `num_demos` trajectories of a ManiSkill trajectory file (.h5 + .json).

    Every check that is given a value (env id, modes, dims) is enforced; each failure is a DemoError
    whose one-line message names the file and the fix. `env_states=False` loads files without simulator
    states (rlpd.py needs only observations, actions and success).
    """
    path = Path(path)
    fix = "pass --dataset-path to a ManiSkill trajectory .h5 (its .json beside it), or omit it to use/generate cached demos"
    if not path.exists():
        raise DemoError(f"demo file {path} not found; {fix}")
    json_path = path.with_suffix(".json")
    if not json_path.exists():
        raise DemoError(f"{path} has no {json_path.name} beside it, so it is not a ManiSkill trajectory file; {fix}")
    try:
        meta = _read_json(json_path)
        episodes = meta["episodes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"{json_path} is not a ManiSkill trajectory json ({type(e).__name__}); {fix}") from None
    f_env, f_obs, f_ctrl = _file_modes(meta)
    if env_id is not None and f_env is not None and f_env != env_id:
        raise DemoError(f"{path} holds demos of {f_env}, not {env_id}; pass demos of {env_id} or --env-id {f_env}")
    if obs_mode is not None and f_obs != obs_mode:
        raise DemoError(f"{path} was recorded with obs mode {f_obs!r}, not {obs_mode!r}; convert it with "
                        f"python -m mani_skill.trajectory.replay_trajectory --traj-path {path} -o {obs_mode} --save-traj")
    if control_mode is not None and f_ctrl != control_mode:
        raise DemoError(f"{path} was recorded with control mode {f_ctrl!r}, not {control_mode!r}; pass "
                        f"--control-mode {f_ctrl}, or convert it with python -m mani_skill.trajectory.replay_trajectory "
                        f"--traj-path {path} -c {control_mode} --use-first-env-state --save-traj")
    if num_demos < 1:
        raise DemoError(f"--num-demos must be >= 1 (got {num_demos})")
    if num_demos > len(episodes):
        raise DemoError(f"--num-demos {num_demos} but {path} holds only {len(episodes)} trajectories; "
                        f"ask for at most {len(episodes)}, or omit --dataset-path to generate more")
    chosen = episodes[:num_demos]

    cols = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "terminated", "traj_end")}
    traj_obs, states = [], []
    try:
        with h5py.File(path, "r") as f:
            for ep in chosen:
                key = f"traj_{ep['episode_id']}"
                if key not in f:
                    raise DemoError(f"{path} lacks {key} listed in its json; the pair is inconsistent, {fix}")
                g = f[key]
                for need in ("obs", "actions", "success") + (("env_states",) if env_states else ()):
                    if need not in g:
                        raise DemoError(f"{path}:{key} has no '{need}'; re-record or re-convert it with "
                                        f"ManiSkill's replay_trajectory (--use-first-env-state --save-traj)")
                if isinstance(g["obs"], h5py.Group):
                    raise DemoError(f"{path} stores dict observations; convert it to obs mode 'state' "
                                    f"(replay_trajectory -o state)")
                obs, act = g["obs"][()].astype(np.float32), g["actions"][()].astype(np.float32)
                T = len(act)
                if obs.shape[0] != T + 1 or T == 0:
                    raise DemoError(f"{path}:{key} has {obs.shape[0]} observations for {T} actions (need T+1)")
                success = g["success"][()].astype(bool)
                term = g["terminated"][()].astype(bool) if "terminated" in g else success.copy()
                cols["obs"].append(obs[:-1]); cols["next_obs"].append(obs[1:]); cols["actions"].append(act)
                cols["rewards"].append(success.astype(np.float32))
                cols["terminated"].append(term)
                end = np.zeros(T, bool); end[-1] = True; cols["traj_end"].append(end)
                traj_obs.append(obs)
                if env_states:
                    states.append(_read_group(g["env_states"]))
    except OSError as e:
        raise DemoError(f"{path} is not a readable HDF5 file (corrupted or truncated: {str(e).splitlines()[0]}); "
                        f"delete it (and its .json) and rerun to regenerate, or pass another --dataset-path") from None
    d = Demos(**{k: np.concatenate(v) for k, v in cols.items()}, traj_obs=traj_obs, env_states=states,
              episodes=chosen)
    if obs_dim is not None and d.obs.shape[1] != obs_dim:
        raise DemoError(f"{path} has observations of dim {d.obs.shape[1]} but {env_id or 'the env'} has {obs_dim}; "
                        f"the demos were recorded for another env/obs mode, pass matching demos")
    if act_dim is not None and d.actions.shape[1] != act_dim:
        raise DemoError(f"{path} has actions of dim {d.actions.shape[1]} but {env_id or 'the env'} has {act_dim} "
                        f"with this control mode; pass demos recorded with the same --control-mode")
    return d


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
# Both backends offer one interface, with resets and time limits driven by the training loop:
#   reset(mask, seeds, demo_starts=None) -> obs     (only envs where mask; demo_starts[i] = (demo, t) or None)
#   step(actions) -> next_obs, terminated, success  (no auto-reset: next_obs is the true next observation,
#                                                    which is what the transition at a time limit must store)
# Episodes that start at a demo state return the demo's recorded observation: right after
# set_state_dict, contact-based entries (PickCube's is_grasped) are stale until a physics step.
def env_kwargs(args, num_envs: int, sim_backend: str, render: bool) -> dict:
    """gym.make keywords from a script's Args (env_id, obs_mode, control_mode, render_size)."""
    kw = dict(obs_mode=args.obs_mode, control_mode=args.control_mode, reward_mode="sparse",
              sim_backend=sim_backend, num_envs=num_envs, max_episode_steps=100_000)  # the loop truncates
    if render:
        kw.update(render_mode="rgb_array",
                  human_render_camera_configs=dict(width=args.render_size, height=args.render_size))
    return kw


def make_env(env_id: str, **kwargs):
    """gym.make for a process that steps one ManiSkill CPU env. A task whose single env draws its scene from the
    episode seed (ManiSkill sets reconfiguration_freq=1 for it: PegInsertionSide's peg and hole sizes, the YCB
    objects, TurnFaucet, AssemblingKits) rebuilds the scene at every reset, and ManiSkill then calls gc.collect(),
    a full pass over every object of the process: ~0.5 s with torch, JAX and ManiSkill loaded, against ~85 ms for
    the rebuild. Freezing what is alive now (the imported modules and the first scene; gc.freeze) takes it out of
    those passes, so a rebuild pays only for its own objects. Nothing is computed differently."""
    env = gym.make(env_id, **kwargs)
    gc.freeze()
    return env


class CPUWorkerEnv(gym.Wrapper):
    """Lives in a worker process: one ManiSkill CPU env that can reset to a demo state and record video."""

    def __init__(self, env_id: str, kwargs: dict, idx: int = 0, demos: Optional[Demos] = None, record: bool = False):
        env = make_env(env_id, **kwargs)
        self.recorder = VideoRecorder(env) if record else None
        super().__init__(CPUGymWrapper(self.recorder or env))
        self.idx, self.demos = idx, demos
        # Ctrl-C in a terminal, `timeout` and Slurm signal every process of the group or job step: the main process
        # decides when to stop (StopRequest) and closes this worker; a worker whose main process dies sees its pipe close
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def reset(self, seed=None, options=None):
        start = (options or {}).get("demo_starts", [None] * (self.idx + 1))[self.idx]
        if start is None:
            return self.env.reset(seed=seed)
        i, t = start
        ep = self.demos.episodes[i]
        _, info = self.env.reset(seed=ep["episode_seed"], options=(ep.get("reset_kwargs") or {}).get("options") or {})
        self.env.unwrapped.set_state_dict(jax.tree_util.tree_map(lambda x: x[t], self.demos.env_states[i]))
        return self.demos.traj_obs[i][t].copy(), info

    def video(self, start: bool = False, save_path: Optional[str] = None):
        if self.recorder is not None:
            self.recorder.stop(save_path) if not start else self.recorder.start()


def _kill_env_workers() -> None:
    """The env workers ignore SIGTERM (see CPUWorkerEnv), so multiprocessing's exit handler, which terminates and
    joins them, would wait forever when the main process exits without closing its envs (an error, or a stop
    signal while they are being built). This handler is registered after that one, so it runs first."""
    for p in multiprocessing.active_children():
        p.kill()


atexit.register(_kill_env_workers)


class CPUEnvs:
    """num_envs CPU simulators, each in its own process, stepped in parallel."""

    def __init__(self, args, num_envs: int, demos: Optional[Demos] = None, record: bool = False):
        fns = [partial(CPUWorkerEnv, args.env_id, env_kwargs(args, 1, "physx_cpu", render=record and i == 0), i,
                       demos, record and i == 0) for i in range(num_envs)]
        # spawn: the parent already runs JAX threads, which must not be forked
        self.envs = gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
        self.num_envs = num_envs
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = self.envs.single_action_space.shape[0]
        self.obs = np.zeros((num_envs, self.obs_dim), np.float32)

    def _kill(self):
        for p in self.envs.processes:
            if p.is_alive():
                p.kill()

    def reset(self, mask, seeds, demo_starts=None):
        options = {"reset_mask": np.asarray(mask, bool)}
        if demo_starts is not None:
            options["demo_starts"] = list(demo_starts)
        obs, _ = self.envs.reset(seed=[int(s) for s in seeds], options=options)
        self.obs[mask] = obs[mask]
        return self.obs.copy()

    def step(self, actions):
        obs, _, terminated, _, info = self.envs.step(np.asarray(actions))
        self.obs = obs
        return obs, np.asarray(terminated, bool), np.asarray(info["success"], bool)

    def video(self, start=False, save_path=None):
        self.envs.call("video", start=start, save_path=save_path)

    def prepare(self, seeds) -> None:
        """Nothing to fix: a CPU env draws a seed's initial state from that seed alone (GPUEnvs.prepare)."""

    def close(self, now: bool = False):
        """now: kill the workers instead of letting each simulator shut down (about 14 s for 16 workers on 2 cores),
        for a run that has saved everything and was told to stop."""
        if now:
            self._kill()
        self.envs.close(terminate=now)


# The physics of --sim-backend gpu. The tests set "physx_cpu" (which takes exactly 1 env) to run this whole path,
# DLPack handoffs included, on a machine without CUDA.
GPU_PHYSX = "physx_cuda"


class GPUEnvs:
    """One ManiSkill GPU-batched env; observations reach JAX through DLPack, without a host copy."""

    def __init__(self, args, num_envs: int, demos: Optional[Demos] = None, record: bool = False):
        env = gym.make(args.env_id, **env_kwargs(args, num_envs, GPU_PHYSX, render=record))
        self.recorder = VideoRecorder(env, env_index=0) if record else None
        self.env = self.recorder or env
        self.base = env.unwrapped
        self.num_envs = num_envs
        self.obs_dim = self.base.single_observation_space.shape[0]
        self.act_dim = self.base.single_action_space.shape[0]
        self.seeds = np.zeros(num_envs, np.int64)
        self.table = {}  # seed -> (its fixed initial state, observation): see prepare
        self.device = self.base.device
        if demos is not None:  # demo states and observations live on the GPU, for batched resets
            self.demo_states = [jax.tree_util.tree_map(lambda x: torch.as_tensor(x, device=self.device), s)
                                for s in demos.env_states]
            self.demo_obs = [torch.as_tensor(o, device=self.device) for o in demos.traj_obs]
        self.obs = None

    def prepare(self, seeds) -> None:
        """Fix the initial state of each of `seeds` (the forward curriculum's pool, the eval seeds): generate them in
        batched resets, num_envs seeds per call in the given order, and keep each env's state and observation.
        ManiSkill draws all envs of one reset call from one stream (seeded with the first env's seed), so without
        this table a seed's initial state would depend on which envs happen to reset together. Resets every env:
        call it before episodes run."""
        new = [int(s) for s in dict.fromkeys(np.asarray(seeds).tolist()) if int(s) not in self.table]
        for g in range(0, len(new), self.num_envs):
            group = new[g:g + self.num_envs]
            seed_list = group + [int(s) for s in self.seeds[len(group):]]
            obs, _ = self.env.reset(seed=seed_list, options=dict(env_idx=torch.arange(len(group), device=self.device)))
            state = self.base.get_state_dict()
            for j, s in enumerate(group):
                self.table[s] = (jax.tree_util.tree_map(lambda x, j=j: x[j:j + 1].clone(), state), obs[j].clone())

    def reset(self, mask, seeds, demo_starts=None):
        """At most two reset calls however many envs reset: one that restores given states (demo starts, and
        seeds whose initial state `prepare` fixed) with reset_to_env_states, and one seeded call for the rest
        (seeds without a fixed state, e.g. RLPD's training episodes)."""
        idx = np.flatnonzero(mask)
        self.seeds[idx] = seeds[idx]
        starts = demo_starts if demo_starts is not None else [None] * self.num_envs
        given = [j for j in idx if starts[j] is not None or int(self.seeds[j]) in self.table]
        fresh = [j for j in idx if starts[j] is None and int(self.seeds[j]) not in self.table]
        obs = self.obs.clone() if self.obs is not None else None
        if fresh:
            out, _ = self.env.reset(seed=[int(s) for s in self.seeds],
                                    options=dict(env_idx=torch.as_tensor(fresh, device=self.device)))
            obs = out.clone() if obs is None else obs
            obs[fresh] = out[fresh]
        if given:
            states, rows = [], []
            for j in given:
                if starts[j] is not None:
                    i, t = starts[j]
                    states.append(jax.tree_util.tree_map(lambda x, t=t: x[t:t + 1], self.demo_states[i]))
                    rows.append(self.demo_obs[i][t])
                else:
                    state, row = self.table[int(self.seeds[j])]
                    states.append(state)
                    rows.append(row)
            batch = jax.tree_util.tree_map(lambda *xs: torch.cat(xs), *states)
            out, _ = self.env.reset(options=dict(env_idx=torch.as_tensor(given, device=self.device),
                                                 reset_to_env_states=dict(env_states=batch)))
            obs = out.clone() if obs is None else obs
            # the recorded observations: contact flags (e.g. is_grasped) are stale right after a state is set
            obs[given] = torch.stack(rows).to(obs.dtype)
        # a new tensor each time: one already handed to JAX (DLPack shares the memory) is never written
        self.obs = obs
        return jax.dlpack.from_dlpack(self.obs.contiguous())

    def step(self, actions):
        actions = torch.from_dlpack(actions) if isinstance(actions, jax.Array) else torch.as_tensor(actions)
        obs, _, terminated, _, info = self.env.step(actions.to(self.device))
        self.obs = obs.clone()
        return jax.dlpack.from_dlpack(self.obs.contiguous()), terminated.cpu().numpy(), info["success"].cpu().numpy()

    def video(self, start=False, save_path=None):
        if self.recorder is not None:
            self.recorder.stop(save_path) if not start else self.recorder.start()

    def close(self, now: bool = False):
        self.env.close()


def make_envs(args, num_envs: int, demos: Optional[Demos] = None, record: bool = False):
    """The vector env of args.sim_backend; `demos` enables demo-start resets."""
    return (GPUEnvs if args.sim_backend == "gpu" else CPUEnvs)(args, num_envs, demos, record)


def evaluate(envs, act_fn, max_episode_steps: int, num_episodes: int, video_path: Optional[str] = None) -> dict:
    """`act_fn(obs) -> actions` (the deterministic policy) for fixed-length episodes from eval seeds 10**6 + k, unused by demos
    and training. num_episodes is rounded up to whole rounds of envs.num_envs; the video shows round 0, env 0."""
    n = envs.num_envs
    rounds = -(-num_episodes // n)
    once, at_end, returns = [], [], []
    envs.prepare(10**6 + np.arange(rounds * n))  # GPU: each eval seed's initial state fixed once, then reused
    for r in range(rounds):
        seeds = 10**6 + r * n + np.arange(n)
        obs = envs.reset(np.ones(n, bool), seeds)
        if video_path and r == 0:
            envs.video(start=True)
        ret, got = np.zeros(n), np.zeros(n, bool)
        for _ in range(max_episode_steps):
            obs, _, success = envs.step(np.asarray(act_fn(obs)))
            ret += success
            got |= success
        if video_path and r == 0:
            envs.video(save_path=video_path)
        once.append(got), at_end.append(success), returns.append(ret)
    return {"eval/success_once": float(np.mean(once)), "eval/success_at_end": float(np.mean(at_end)),
            "eval/return": float(np.mean(returns)), "eval/episodes": rounds * n}



def get_and_load_demos(args, env_states: bool) -> tuple[Demos, Path]:
    """The first --num-demos demos for a script's Args (found, downloaded or generated), and their file."""
    try:
        path = get_demos(args.env_id, args.obs_mode, args.control_mode, args.num_demos, args.dataset_path)
        return load_demos(path, args.num_demos, args.env_id, args.obs_mode, args.control_mode,
                          env_states=env_states), path
    except DemoError as e:
        fail(str(e))


def check_dims(args, envs, demos: Demos, path: Path, ckpt: Optional[dict]) -> tuple[int, int]:
    """The env's (obs_dim, act_dim), after checking that the demos and the --checkpoint (if any) fit them."""
    obs_dim, act_dim = envs.obs_dim, envs.act_dim
    if demos.obs.shape[1] != obs_dim or demos.actions.shape[1] != act_dim:
        fail(f"{path} has obs/action dims {demos.obs.shape[1]}/{demos.actions.shape[1]} but {args.env_id} with "
             f"{args.control_mode} has {obs_dim}/{act_dim}; pass demos recorded for this env and control mode")
    if ckpt is not None and (ckpt["obs_dim"], ckpt["act_dim"], ckpt["num_qs"]) != (obs_dim, act_dim, args.num_qs):
        fail(f"{args.checkpoint} has obs/act dims {ckpt['obs_dim']}/{ckpt['act_dim']} and {ckpt['num_qs']} "
             f"critics; this run has {obs_dim}/{act_dim} and --num-qs {args.num_qs}")
    return obs_dim, act_dim



class StopRequest:
    """Ctrl-C (SIGINT) or a plain kill / Slurm's warning (SIGTERM) ends a run at the next iteration boundary, after
    it has saved, instead of killing it mid-update. A second signal stops at once."""

    def __init__(self):
        self.name, self.exit_code = None, 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.name is not None:
            raise SystemExit(128 + signum)  # the second signal: at once (the env workers are reaped on exit)
        self.name, self.exit_code = signal.Signals(signum).name, 128 + signum
        tqdm.write(f"{self.name}: saving and stopping after this iteration (send it again to stop at once)")

    def __bool__(self) -> bool:
        return self.name is not None


class RunLog:
    """What both training loops keep besides the algorithm: the wall-clock split (simulation, updates, eval),
    the stats of finished training episodes, the log/eval/save schedule, tensorboard and the progress bar."""

    def __init__(self, args, run_dir: Path, writer):
        self.args, self.run_dir, self.writer = args, run_dir, writer
        self.seconds = {"simulation": 0.0, "update": 0.0, "eval": 0.0, "save": 0.0}
        self.last = {"log": 0, "eval": 0, "save": 0}  # env step of the last of each
        self.episodes = {"return": [], "success_at_end": [], "success_once": []}
        self.last_success = float("nan")
        self.evals = []  # (step, eval success_at_end) of every eval, for --target-success
        # where it ran: a resumed run may continue on another machine
        self.machines = [f"{os.cpu_count()} CPU cores, JAX on {jax.devices()[0].device_kind}"]
        self.t_start = time.time()
        self.pbar = tqdm(total=args.total_timesteps, unit="step", dynamic_ncols=True, smoothing=0.05)

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
        self.pbar.reset(total=self.args.total_timesteps)
        self.pbar.update(step)

    @contextlib.contextmanager
    def timed(self, part: str):
        t0 = time.time()
        yield
        self.seconds[part] += time.time() - t0

    def episode_ended(self, ret: float, success_at_end: bool, success_once: bool) -> None:
        for k, v in (("return", ret), ("success_at_end", success_at_end), ("success_once", success_once)):
            self.episodes[k].append(float(v))

    def due(self, what: str, step: int) -> bool:
        """True once every --log-freq / --eval-freq / --save-freq env steps (eval also at the last step)."""
        freq = {"log": self.args.log_freq, "eval": self.args.eval_freq, "save": self.args.save_freq}[what]
        if step - self.last[what] >= freq or (what == "eval" and step >= self.args.total_timesteps):
            self.last[what] = step
            return True
        return False

    def log(self, step: int, scalars: dict, **postfix) -> None:
        """Write `scalars` plus SPS, the time split and the episodes finished since the last log."""
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
        """Eval episodes (`evaluate`) with a video, logged at `step`."""
        with self.timed("eval"):
            video = str(self.run_dir / "videos" / f"eval_{step:08d}.mp4") if self.args.capture_video else None
            metrics = evaluate(envs, act_fn, self.args.max_episode_steps, self.args.num_eval_episodes, video)
        self.last_success = metrics["eval/success_at_end"]
        self.evals.append([step, self.last_success])
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        tqdm.write(f"step {step}: eval success_at_end {self.last_success:.3f} success_once "
                   f"{metrics['eval/success_once']:.3f} ({metrics['eval/episodes']} episodes)")
        if self.target_reached:
            tqdm.write(f"step {step}: eval success_at_end >= {self.args.target_success} in the last "
                       f"{self.args.target_evals} evals (--target-success): the run ends here")
        return metrics

    @property
    def target_reached(self) -> bool:
        """--target-success: the last --target-evals evals all reached it (judged with the flags as they are now,
        so a resumed run may change them)."""
        last = [v for _, v in self.evals[-self.args.target_evals:]]
        return (self.args.target_success is not None and len(last) == self.args.target_evals
                and min(last) >= self.args.target_success)

    def finish(self, step: int, stop: Optional[StopRequest] = None, **extra) -> dict:
        """runs/<exp-name>/summary.json, also printed; after a stop signal, one line on what was saved."""
        self.pbar.close()
        if stop is not None:
            stop.restore()
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
        return summary


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
NETWORK_FIELDS = ("actor_params", "critic_params", "target_params", "log_alpha")


def save_checkpoint(path: Path, algorithm: str, args, obs_dim: int, act_dim: int, networks: dict,
                    global_step: int, extra: Optional[dict] = None) -> None:
    """One self-describing file (what it is, for which env, with which dims and flags), written atomically.
    `networks` holds NETWORK_FIELDS."""
    payload = {
        "algorithm": algorithm, "env_id": args.env_id, "obs_mode": args.obs_mode, "control_mode": args.control_mode,
        "obs_dim": obs_dim, "act_dim": act_dim, "hidden_dims": list(args.hidden_dims), "num_qs": args.num_qs,
        "global_step": global_step, "args": json.dumps(dataclasses.asdict(args)),
        **{k: jax.device_get(networks[k]) for k in NETWORK_FIELDS},
        "extra": json.dumps(extra or {}, default=lambda o: np.asarray(o).tolist()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, serialization.msgpack_serialize(payload))


def load_checkpoint(path: str, algorithm: Optional[str] = None, args=None) -> dict:
    """Read a checkpoint and check it: written by `algorithm` (any known one if None), and for the env id and
    modes of `args` if given. Every mismatch is a one-line error."""
    p = Path(path)
    if not p.is_file():
        fail(f"checkpoint {p} not found; pass runs/<run>/checkpoints/<file>.ckpt")
    try:
        ckpt = serialization.msgpack_restore(p.read_bytes())
        found = ckpt["algorithm"]
        for k in NETWORK_FIELDS + ("env_id", "obs_dim", "act_dim", "hidden_dims", "args"):
            ckpt[k]  # noqa: B018 - presence check
    except Exception:  # noqa: BLE001
        fail(f"{p} is not a readable rfcl/rlpd checkpoint (corrupted or another format)")
    if found not in KNOWN_ALGORITHMS:
        fail(f"{p} is a checkpoint of unknown algorithm {found!r}; these scripts read {', '.join(KNOWN_ALGORITHMS)}")
    if algorithm is not None and found != algorithm:
        fail(f"{p} is a {found} checkpoint, not {algorithm}; use {found}.py or collect_demos.py")
    if args is not None:
        for k in ("env_id", "control_mode", "obs_mode"):
            if ckpt[k] != getattr(args, k):
                fail(f"{p} was trained with --{k.replace('_', '-')} {ckpt[k]}, not {getattr(args, k)}; pass the same")
    return ckpt



def evaluate_checkpoint(args, ckpt: dict, run_dir: Path, act) -> dict:
    """--evaluate: the checkpoint's deterministic policy `act` on --num-eval-episodes eval episodes, with a video;
    the metrics go to runs/<exp-name>/eval.json and stdout."""
    envs = make_envs(args, args.num_eval_envs, record=args.capture_video)
    if (envs.obs_dim, envs.act_dim) != (int(ckpt["obs_dim"]), int(ckpt["act_dim"])):
        envs.close()
        fail(f"{args.checkpoint} expects obs/action dims {ckpt['obs_dim']}/{ckpt['act_dim']}, the env has "
             f"{envs.obs_dim}/{envs.act_dim}")
    make_run_dir(run_dir, args)
    video = str(run_dir / "videos" / "eval.mp4") if args.capture_video else None
    metrics = evaluate(envs, act, args.max_episode_steps, args.num_eval_episodes, video)
    envs.close()
    write_json(run_dir / "eval.json", metrics)
    print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------
class VideoRecorder(gym.Wrapper):
    """Wraps a ManiSkill env (innermost, before CPUGymWrapper) and renders frames only while recording:
    CPU rendering costs ~0.1-0.4 s a frame, so only the episodes that become videos pay for it.

        rec = VideoRecorder(env); rec.start(); ...steps...; rec.stop("runs/x/videos/eval.mp4")
    `env_index` picks the sub-env of a GPU-batched env. Files appear atomically.
    """

    def __init__(self, env, env_index: int = 0, fps: int | None = None):
        super().__init__(env)
        self.env_index = env_index
        self.fps = fps or getattr(env.unwrapped, "control_freq", 20)
        self.frames, self.recording = [], False

    def _capture(self):
        frame = self.env.render()
        frame = frame.cpu().numpy() if hasattr(frame, "cpu") else np.asarray(frame)
        self.frames.append(frame[self.env_index] if frame.ndim == 4 else frame)

    def start(self):
        self.frames, self.recording = [], True

    def reset(self, *args, **kwargs):
        out = self.env.reset(*args, **kwargs)
        if self.recording:
            self._capture()
        return out

    def step(self, action):
        out = self.env.step(action)
        if self.recording:
            self._capture()
        return out

    def stop(self, path=None) -> None:
        """Stop recording; write the frames to `path` (.mp4) unless path is None."""
        self.recording = False
        if path and self.frames:
            import imageio

            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
            imageio.mimsave(tmp, self.frames, fps=self.fps)
            os.replace(tmp, path)
        self.frames = []


if __name__ == "__main__":
    # python common.py plan-demos ENV_ID NUM_DEMOS MAX_ATTEMPTS OUT_STEM STATS_JSON  (used by generate_demos)
    if len(sys.argv) == 7 and sys.argv[1] == "plan-demos":
        _, _, env_id_, n_, budget_, stem_, stats_ = sys.argv
        write_json(Path(stats_), plan_demos(env_id_, int(n_), int(budget_), stem_))
    else:
        fail("usage: python common.py plan-demos ENV_ID NUM_DEMOS MAX_ATTEMPTS OUT_STEM STATS_JSON")
