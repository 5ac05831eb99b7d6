"""Run bookkeeping both scripts share: read it to change how flags are layered, where a run's files go, how it is
saved and resumed, or what it logs besides the algorithm's own numbers.

  * flags:        defaults in layers (class, per-task table, --preset, command line); --resume takes args.json.
  * run files:    runs/<exp-name>/ with args.json, tensorboard (+ W&B), summary.json, atomic writes.
  * checkpoints:  one self-describing file per checkpoint, naming the script that wrote it; resume states.
  * the loop:     RunLog (time split, episode stats, log/eval/save schedule, progress bar), StopRequest (signals).
Every function takes explicit values, never a script's Args: a copy of a script may rename any flag but --preset
and --resume, which parse_args reads by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import tyro
from flax import serialization
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import common
import stop_signals
from common import fail

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def parse_args(args_cls, presets: dict, description: str, task_layer: Callable[[object], dict],
               resume_flags: tuple[str, ...], algorithm: str, script: str, argv=None, fork_fixed: tuple[str, ...] = ()):
    """Defaults in layers, each overriding the one before: the Args class; task_layer(args), the per-task values
    (the env's registered horizon, the script's table); the values `--preset X` sets; every flag given on the
    command line. Prints the per-task values it applied; args.json records the result. With --resume DIR the run's
    args.json is the source of truth instead, and only `resume_flags` may be given beside it (resume_args); the run
    must be one of `algorithm`, written by a script of the same file name as `script`. With --fork SOURCE the flags
    of the resume state there, and any flag given but `fork_fixed` (fork_args)."""
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
        return resume_args(args_cls, argv, given, description, resume_flags, algorithm, script)
    if "fork" in given:
        return fork_args(args_cls, argv, given, description, fork_fixed, algorithm)
    args = tyro.cli(args_cls, default=default, args=argv, description=description)
    base = dataclasses.asdict(args_cls())
    set_by_preset = {k for k, v in dataclasses.asdict(default).items() if v != base[k]}
    applied = {}
    for name, value in task_layer(args).items():
        if name.replace("_", "-") in given or name in set_by_preset or value is None:
            continue
        if getattr(args, name) != value:
            applied[name] = value
        setattr(args, name, value)
    if applied:
        print("per-task defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items()) +
              " (a flag on the command line overrides each)", flush=True)
    return args


RESUME_FILE = "resume.state"
RESUME_FORMAT, RESUME_VERSION = "rfcl-jax resume state", 1


def resume_args(args_cls, argv, given: set, description: str, resume_flags: tuple[str, ...], algorithm: str,
                script: str):
    """--resume DIR: the run's args.json, plus only the resume_flags given on the command line."""
    for flag in sorted(given - {"resume", *resume_flags}):
        fail(f"--{flag} cannot be given with --resume: the run's args.json fixes it; only "
             f"{', '.join('--' + f for f in resume_flags)} may change")
    run_dir = Path(flag_value(argv, "resume"))
    if not run_dir.is_dir():
        fail(f"--resume {run_dir}: no such run directory; pass runs/<exp-name> of the run to continue")
    header = read_resume_header(run_dir / RESUME_FILE, algorithm, script)
    try:
        base = args_from_json(args_cls, json.loads((run_dir / "args.json").read_text()))
    except Exception as e:  # noqa: BLE001 - missing, unreadable or from another version of the script
        fail(f"{run_dir / 'args.json'} is missing or does not match this script's flags ({type(e).__name__}: {e})")
    args = tyro.cli(args_cls, default=base, args=argv, description=description)
    args.resume = str(run_dir)
    for k, v in header["args"].items():
        if k not in ("resume", *(f.replace("-", "_") for f in resume_flags)) and json.dumps(v) != json.dumps(
                getattr(args, k, None), default=list):
            fail(f"{run_dir / 'args.json'} says --{k.replace('_', '-')} {getattr(args, k, None)} but the run's resume "
                 f"state was written with {v}; restore args.json (nothing was changed)")
    return args


def flag_value(argv, flag: str) -> str:
    """The value of --flag in argv (--flag V or --flag=V; '' if none follows)."""
    i = next(i for i, a in enumerate(argv) if a.replace("_", "-").split("=", 1)[0] == f"--{flag}")
    return argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")


def args_from_json(args_cls, saved: dict):
    """Args from a run's flags as JSON (args.json, a resume state's header): lists back to tuples."""
    return args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def fork_state_path(source: str) -> Path:
    """--fork SOURCE: a run directory (its latest resume state) or a resume-state file (e.g. rfcl.py's
    <run>/stage2_start.state, kept at the stage switch)."""
    return Path(source) / RESUME_FILE if Path(source).is_dir() else Path(source)


def fork_args(args_cls, argv, given: set, description: str, fork_fixed: tuple[str, ...], algorithm: str):
    """--fork SOURCE: a new run that starts from another run's resume state (any script of `algorithm`) with the flags
    that state was written with, and the flags given here changed, except `fork_fixed`: those whose values the state
    itself holds (the networks' shapes, the buffers and what fills them, the generators, the demos), which would
    otherwise be ignored without a word. The parent's files are only read."""
    for flag in ("resume", "checkpoint", "evaluate", "preset"):
        if flag in given:
            fail(f"--fork cannot be given with --{flag}: a fork takes the networks, buffers and flags of the state it "
                 f"starts from" + ("; give the changed flags themselves" if flag == "preset" else ""))
    path = fork_state_path(flag_value(argv, "fork"))
    if not path.is_file():
        fail(f"--fork {flag_value(argv, 'fork')}: no resume state there; pass a run directory (runs/<exp-name>) or a "
             f"resume-state file such as runs/<exp-name>/stage2_start.state")
    header = read_resume_header(path, algorithm)
    try:
        base = args_from_json(args_cls, header["args"])
    except TypeError as e:
        fail(f"{path} was written with flags this script does not have ({e}); fork it with "
             f"{Path(header.get('script') or algorithm + '.py').name}")
    args = tyro.cli(args_cls, default=base, args=argv, description=description)
    for name in fork_fixed:
        old, new = (json.dumps(getattr(a, name), default=list) for a in (base, args))
        if old != new:
            fail(f"--{name.replace('_', '-')} cannot change in a fork: the resume state holds what it made (networks' "
                 f"shapes, buffers, generators or demos); {path} was written with {old}")
    args.fork = str(path)
    if "exp-name" not in given:
        args.exp_name = f"{base.exp_name}__fork{header['global_step']}__{int(time.time())}"
    return args


def fork_record(path: Path, header: dict, config: dict) -> dict:
    """What a fork records of its parent (resume states and summary.json): the state it started from, the parent run,
    the env step, and each flag it changed as [parent's, fork's]."""
    changed = {k: [v, config.get(k)] for k, v in header["args"].items()
               if k not in ("exp_name", "fork", "resume") and json.dumps(v) != json.dumps(config.get(k), default=list)}
    return {"state": str(Path(path).resolve()), "parent": header["args"].get("exp_name"),
            "global_step": header["global_step"], "changed": changed}


# ----------------------------------------------------------------------------------------------
# Run files
# ----------------------------------------------------------------------------------------------
def new_run_dir(exp_name: str) -> Path:
    """runs/<exp-name>: a plain name, refused if it exists. Created by make_run_dir once the inputs are validated,
    so a rejected command leaves nothing behind that would block its corrected rerun."""
    if Path(exp_name).name != exp_name or exp_name in ("", ".", ".."):
        fail(f"--exp-name must be a plain name (a folder under runs/), got {exp_name!r}")
    run_dir = Path("runs") / exp_name
    if run_dir.exists():
        fail(f"run directory {run_dir} already exists; pass another --exp-name (nothing was overwritten)")
    return run_dir


def make_run_dir(run_dir: Path, config: dict, resuming: bool = False, state_bytes: int = 0) -> None:
    """runs/<exp-name>/ with args.json (`config`), locked by this process (lock_run_dir); on --resume the directory
    exists, is locked already, and args.json gets the changed flags. A directory that cannot be written is one line
    before the run starts, and a disk with less free space than a save point's resume state (`state_bytes`, the
    script's estimate) a warning."""
    try:
        if not resuming:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                run_dir.mkdir()
            except FileExistsError:  # another process made it since new_run_dir looked
                fail(f"run directory {run_dir} was just made by another process; pass another --exp-name (nothing "
                     f"was overwritten)")
            lock_run_dir(run_dir)
        (run_dir / "checkpoints").mkdir(exist_ok=resuming)
        (run_dir / "videos").mkdir(exist_ok=resuming)
    except OSError as e:
        fail(f"cannot write in {run_dir.parent if not run_dir.exists() else run_dir} ({e.strerror or e}); make it "
             f"writable or run elsewhere (nothing was written)")
    write_json(run_dir / "args.json", config)
    check_disk(run_dir, state_bytes)


_DISK_WARNED = []


def resume_state_bytes(learner, rows: int, obs_dim: int, act_dim: int) -> int:
    """About what a resume state takes: the learner (networks and optimizer states) and `rows` stored transitions."""
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(learner)) + rows * 4 * (2 * obs_dim + act_dim + 2)


def check_disk(run_dir: Path, need: int) -> None:
    """Warn, once per process, when the disk of run_dir has less free space than `need` bytes (a save point writes
    the whole resume state to a temporary file before it replaces the previous one)."""
    free = shutil.disk_usage(run_dir).free
    if free < need and not _DISK_WARNED:
        _DISK_WARNED.append(True)
        tqdm.write(f"warning: {free / 2**20:.0f} MiB free on the disk of {run_dir}, and a save point writes about "
                   f"{need / 2**20:.0f} MiB: free space, or the run stops at the first save it cannot write")


_LOCKS = []  # the open lock files: a lock lasts as long as its file stays open


def lock_run_dir(run_dir: Path) -> None:
    """One writer per run directory: an exclusive lock on runs/<exp-name>/.lock, held until this process ends, however
    it ends (the kernel releases it). A POSIX record lock (fcntl.lockf), not flock: it holds across the nodes of the
    shared file systems of clusters (NFS through its lock manager, Lustre, GPFS), where flock may lock one node only.
    A second process, new run or --resume, gets one line naming the holder."""
    try:
        f = open(run_dir / ".lock", "a+")
    except OSError as e:
        fail(f"cannot write in {run_dir} ({e.strerror or e}); make it writable, or copy the run elsewhere and resume "
             f"the copy (nothing was written)")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        fail(f"{run_dir} is in use by {holder}; wait for it to end or stop it (Ctrl-C or kill: it saves and exits), "
             f"then run this again")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS.append(f)


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


def write_atomic(path: Path, data) -> None:
    """Write `data` (bytes, or a list of bytes) to a hidden temporary file beside `path`, flush it to disk, then
    rename: a reader never sees half a file, and a crash leaves the previous file whole. A write that fails (no
    space, read-only, no permission) or is interrupted removes its temporary file; a failure is then one line saying
    what is intact and what is lost (write_failed), and the process stops."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            write_failed(path, e)
        raise


def write_failed(path: Path, e: OSError):
    """The one line of a write that failed: the file, why, what is intact (the previous file of that name, and for a
    resume state the step --resume continues from), and that the process stops instead of working on towards
    saves it cannot make."""
    if path.name == RESUME_FILE:
        try:
            with open(path, "rb") as f:
                step = json.loads(f.readline())["global_step"]
            kept = (f"the previous resume state is intact: --resume {path.parent} continues from env step {step}, "
                    f"and everything since is lost")
        except (OSError, ValueError, KeyError):
            kept = "this run has no resume state yet, so it cannot be continued; its checkpoints so far are intact"
    else:
        kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
    fail(f"could not write {path} ({e.strerror or e}): {kept}. Free space on that disk (or make {path.parent} "
         f"writable); stopped here")

def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2).encode())


def place_new(src: Path, dst: Path) -> None:
    """Move a finished file to dst, refusing to replace one that is there (one line): a hard link cannot overwrite,
    so two writers never both believe they wrote dst."""
    try:
        os.link(src, dst)
    except FileExistsError:
        fail(f"{dst} appeared while this was being written (another process?); nothing was replaced, and this "
             f"process's file was not kept: run it again")
    except OSError:  # a file system without hard links: check, then rename
        if dst.exists():
            fail(f"{dst} exists; nothing was replaced: run it again")
        try:
            os.replace(src, dst)
        except OSError as e2:
            write_failed(dst, e2)
        return
    os.unlink(src)


def copy_atomic(src: Path, dst: Path) -> None:
    """A copy of `src` at `dst` that later writes of `src` leave as it is, written like write_atomic."""
    with open(src, "rb") as f:
        write_atomic(dst, iter(lambda: f.read(2**24), b""))


# ----------------------------------------------------------------------------------------------
# Resume states and checkpoints
# ----------------------------------------------------------------------------------------------
def read_resume_header(path: Path, algorithm: Optional[str] = None, script: Optional[str] = None) -> dict:
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
    # states written before they named their script were written by <algorithm>.py
    writer = Path(header.get("script") or f"{header['algorithm']}.py")
    if (algorithm is not None and header["algorithm"] != algorithm) or (
            script is not None and writer.name != Path(script).name):
        fail(f"{path.parent} is a run of {writer.name} (algorithm {header['algorithm']}); resume it with that script")
    return header


def save_resume_state(path: Path, algorithm: str, script: str, config: dict, global_step: int, stage: int,
                      payload: dict, demos: Optional[dict] = None, fork: Optional[dict] = None) -> None:
    """Everything a run needs to continue exactly: a one-line JSON header (with `demos`: the demo file's path, the
    number of demos and their content hash, see load_run_demos; with `fork`: the run's parent, fork_record), then the
    msgpack payload (learner state, optimizer states, buffers, curricula, generators, schedule). Written atomically:
    the previous state stays until this one is complete on disk."""
    body = serialization.msgpack_serialize(payload)
    header = {"format": RESUME_FORMAT, "version": RESUME_VERSION, "algorithm": algorithm, "script": script,
              "global_step": global_step, "stage": stage, "args": config, "demos": demos, "fork": fork,
              "payload_bytes": len(body), "payload_crc32": zlib.crc32(body)}
    write_atomic(path, [json.dumps(header).encode() + b"\n", body])
    check_disk(path.parent, len(body))  # the next save point needs as much again


def load_resume_state(path: Path, algorithm: str, script: Optional[str] = None,
                      total_timesteps: Optional[int] = None) -> tuple[dict, dict]:
    """(header, payload) of a resume state written by `algorithm` (and by a script of the same file name as
    `script`, if given), checked whole: a truncated or corrupted file is a one-line error, and so is a run already
    at `total_timesteps`."""
    header = read_resume_header(path, algorithm, script)
    if total_timesteps is not None and total_timesteps <= header["global_step"]:
        fail(f"{path.parent} is already at env step {header['global_step']}; give a larger --total-timesteps to train "
             f"it further")
    with open(path, "rb") as f:
        f.readline()
        body = f.read()
    if len(body) != header["payload_bytes"] or zlib.crc32(body) != header["payload_crc32"]:
        fail(f"{path} is truncated or corrupted ({len(body)} of {header['payload_bytes']} payload bytes, or a "
             f"checksum mismatch); the run cannot continue exactly from it. --checkpoint "
             f"{path.parent}/checkpoints/<file>.ckpt starts a new run from saved networks")
    return header, serialization.msgpack_restore(body)


def load_start_state(run_dir: Path, resume: Optional[str], fork: Optional[str], algorithm: str, script: str,
                     total_timesteps: int, config: dict) -> tuple[dict, Optional[dict], Optional[dict]]:
    """(header, payload, fork record) of the state a run starts from: its own resume state (--resume), another run's
    (--fork: fork_record of it), or none (a new run: {}, None, None). A resumed fork keeps its fork record."""
    if resume:
        header, payload = load_resume_state(run_dir / RESUME_FILE, algorithm, script, total_timesteps)
        return header, payload, header.get("fork")
    if fork:
        header, payload = load_resume_state(fork_state_path(fork), algorithm, None, total_timesteps)
        return header, payload, fork_record(fork_state_path(fork), header, config)
    return {}, None, None


def load_run_demos(header: dict, env_id: str, obs_mode: str, control_mode: str, num_demos: int,
                   dataset_path: Optional[str], sim_config: dict, dims: Optional[tuple[int, int]],
                   env_states: bool) -> tuple[common.Demos, Path, dict]:
    """The demos a run trains on (common.get_and_load_demos), and the record of them its resume states keep. A resumed
    run (header: its resume state's) loads --dataset-path if given, else the file it began with, and continues only
    on the demos it began with: the same content, wherever the file now is (states written before they recorded their
    demos are not checked)."""
    saved = header.get("demos")
    demos, path = common.get_and_load_demos(env_id, obs_mode, control_mode, num_demos,
                                            dataset_path or (saved or {}).get("path"), env_states, sim_config, dims)
    digest = common.demos_digest(demos)
    if saved and saved["sha256"] != digest:
        fail(f"{path} holds other demos than the run began with ({saved['num_demos']} demos of {saved['path']}, "
             f"sha256 {saved['sha256'][:12]}...); put that file back, or pass --dataset-path to a copy of it")
    return demos, path, {"path": str(path.resolve()), "num_demos": num_demos, "sha256": digest}


NETWORK_FIELDS = ("actor_params", "critic_params", "target_params", "log_alpha")
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "rfcl-jax checkpoint", 1


def save_checkpoint(path: Path, meta: dict, networks: dict, global_step: int, extra: Optional[dict] = None) -> None:
    """One self-describing file, written atomically: `meta` says what it is (algorithm, the script that wrote it,
    env id, modes, dims, flags), `networks` holds NETWORK_FIELDS."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "global_step": global_step,
               **{k: jax.device_get(networks[k]) for k in NETWORK_FIELDS},
               "extra": json.dumps(extra or {}, default=lambda o: np.asarray(o).tolist())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, serialization.msgpack_serialize(payload))


def checkpoint_sim_config(ckpt: dict) -> dict:
    """The physics a checkpoint was trained under (vector_env.sim_config; checkpoints written before --sim-config
    existed: the task's own, {})."""
    return ckpt.get("sim_config") or {}


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint and check that it is one, whole; a one-line error if not."""
    p = Path(path)
    if not p.is_file():
        fail(f"checkpoint {p} not found; pass runs/<run>/checkpoints/<file>.ckpt")
    try:
        ckpt = serialization.msgpack_restore(p.read_bytes())
        for k in NETWORK_FIELDS + ("algorithm", "env_id", "obs_mode", "control_mode", "obs_dim", "act_dim",
                                   "hidden_dims", "args"):
            ckpt[k]  # noqa: B018 - presence check
    except Exception:  # noqa: BLE001
        fail(f"{p} is not a readable checkpoint of these scripts (corrupted or another format)")
    # checkpoints written before they carried a format and version are version 1
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        fail(f"{p} is not a checkpoint of these scripts (format {ckpt['format']!r})")
    if int(ckpt.get("version", 1)) != CHECKPOINT_VERSION:
        fail(f"{p} was written by checkpoint version {ckpt['version']}; these scripts read version "
             f"{CHECKPOINT_VERSION}: use it with the version of the code that wrote it")
    return ckpt


def load_run_checkpoint(path: str, env_id: str, obs_mode: str, control_mode: str, sim_config: dict, script: str,
                        networks_like: Optional[Callable[[int, int], dict]] = None) -> dict:
    """--checkpoint of a run, read and checked before anything is built: trained with the run's env id, modes and
    physics (--sim-config), and (given `networks_like(obs_dim, act_dim)`, the networks `script` builds with the run's
    flags, as shapes) holding networks of that tree and shapes. Each mismatch is one line."""
    ckpt = load_checkpoint(path)
    for flag, want in (("env-id", env_id), ("control-mode", control_mode), ("obs-mode", obs_mode)):
        if ckpt[flag.replace("-", "_")] != want:
            fail(f"{path} was trained with --{flag} {ckpt[flag.replace('-', '_')]}, not {want}; pass the same")
    if checkpoint_sim_config(ckpt) != sim_config:
        fail(f"{path} was trained under the physics {common.physics_name(checkpoint_sim_config(ckpt))}, not "
             f"{common.physics_name(sim_config)}; pass the same --sim-config")
    if networks_like is None:
        return ckpt
    want = jax.eval_shape(lambda: networks_like(int(ckpt["obs_dim"]), int(ckpt["act_dim"])))
    got = {k: ckpt[k] for k in NETWORK_FIELDS}
    flat_got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    flat_want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    if flat_got == flat_want:
        return ckpt
    diff = next(k for k in sorted(set(flat_got) | set(flat_want)) if flat_got.get(k) != flat_want.get(k))
    writer = Path(ckpt.get("script") or f"{ckpt['algorithm']}.py").name
    fail(f"{path} holds networks that {Path(script).name} does not build with these flags ({diff}: "
         f"{flat_got.get(diff, 'absent')} in the checkpoint, {flat_want.get(diff, 'absent')} here); it was written by "
         f"{writer} with --hidden-dims {' '.join(map(str, ckpt['hidden_dims']))} --num-qs {ckpt.get('num_qs')}: pass "
         f"the same flags, or start from it with {writer}")


def checkpoint_script(ckpt: dict, path: str, script: Optional[str] = None, flag: str = "--script"):
    """The module of the script that wrote a checkpoint (its networks are the ones trained): `script` if given, else
    the file the checkpoint names, else one of that name beside this file (a checkpoint carried from another
    machine; those written before checkpoints named their script: <algorithm>.py)."""
    named = Path(ckpt.get("script") or f"{ckpt['algorithm']}.py")
    where = Path(script) if script else (named if named.is_file() else ROOT / named.name)
    if not where.is_file():
        fail(f"{path} was written by {named}, which is not here (nor {ROOT / named.name}); pass {flag} PATH to that "
             f"script or a copy of it")
    where = where.resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == where:
            return module
    name = where.stem if where.stem not in sys.modules else f"{where.stem}_{zlib.crc32(str(where).encode())}"
    sys.path.insert(0, str(where.parent))  # its own imports (common, ...) resolve as when it is run
    spec = importlib.util.spec_from_file_location(name, where)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def evaluate_checkpoint(ckpt: dict, path: str, run_dir: Path, make_envs: Callable[[], object], config: dict,
                        max_episode_steps: int, num_episodes: int, video: bool) -> dict:
    """--evaluate: the checkpoint's deterministic policy, built by the script that wrote it (so a copy's edited Actor
    is the one evaluated), on num_episodes eval episodes of make_envs() (with a video of the first); the metrics go
    to run_dir/eval.json and stdout."""
    act = checkpoint_script(ckpt, path).load_actor(ckpt)[0]
    envs = make_envs()
    if (envs.obs_dim, envs.act_dim) != (int(ckpt["obs_dim"]), int(ckpt["act_dim"])):
        envs.close()
        fail(f"{path} expects obs/action dims {ckpt['obs_dim']}/{ckpt['act_dim']}, the env has "
             f"{envs.obs_dim}/{envs.act_dim}")
    stop_signals.exit_if_signalled()
    make_run_dir(run_dir, config)
    try:
        metrics = common.evaluate(envs, act, max_episode_steps, num_episodes,
                                  str(run_dir / "videos" / "eval.mp4") if video else None)
    except BaseException:  # Ctrl-C or SIGTERM (stop_signals.py): nothing complete to keep, nothing to block a rerun
        shutil.rmtree(run_dir, ignore_errors=True)
        envs.close(now=True)
        raise
    envs.close()
    write_json(run_dir / "eval.json", metrics)
    print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C (SIGINT), a plain kill / Slurm's warning (SIGTERM) or a closed terminal (SIGHUP) ends a run at the next
    iteration boundary, after it has saved, instead of killing it mid-update. An impatient second signal changes
    nothing (the save goes on: it is what keeps the work); a third stops at once, saying what is lost (`lost`), with
    the env workers ended first and any half-written file removed (write_atomic)."""

    def __init__(self, lost: str = "this save point's resume state is not written; --resume continues from the "
                                   "previous save point, whose files are intact"):
        self.name, self.exit_code, self.count, self.lost = None, 0, 0, lost
        self.previous = {s: signal.signal(s, self._handle) for s in stop_signals.SIGNALS}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.name is None:
            stop_signals.quiet_if_terminal_gone(signum)
            self.name, self.exit_code = name, 128 + signum
            tqdm.write(f"{name}: saving and stopping after this iteration (a third signal stops at once, unsaved)",
                       file=sys.stderr)
        elif self.count == 2:
            tqdm.write(f"{name} again: still saving, which keeps the work; once more stops at once, without the save",
                       file=sys.stderr)
        else:
            for worker in multiprocessing.active_children():
                worker.kill()
            tqdm.write(f"stopped at once by a third signal ({name}): {self.lost}", file=sys.stderr)
            warnings.simplefilter("ignore")  # gymnasium's warnings as the abandoned envs are collected at exit
            raise SystemExit(self.exit_code)

    def __bool__(self) -> bool:
        return self.name is not None


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

    def saved(self, step: int) -> None:
        """A scheduled save happened at `step` (the next is due --save-freq env steps later)."""
        self.last["save"] = step

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

    def finish(self, step: int, stop: Optional[StopRequest] = None, **extra) -> dict:
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
