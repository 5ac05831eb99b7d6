"""The files of a run, shared by rfcl.py, rlpd.py and their copies: read it to change where a run's files go or what
its checkpoints and resume states hold.

  * run directory:  runs/<exp-name>/ with args.json, locked by one writer; a disk-space warning.
  * resume states:  a one-line JSON header (who wrote it, when, with which flags and demos), then the script's own
                    payload, checked whole on reading; --resume and --fork start from one.
  * checkpoints:    one self-describing file each: what wrote it, for which env and physics, and every network tree
                    the script's networks() returns; --checkpoint, --evaluate, collect_demos.py and the frontier probe
                    read them with the script that wrote them.
Every function takes explicit values, never a script's Args.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from flax import serialization
from tqdm import tqdm

import common
import demo_making
import stop_signals
from common import RESUME_FILE, fail, write_atomic, write_json

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Run directory
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


# ----------------------------------------------------------------------------------------------
# Resume states
# ----------------------------------------------------------------------------------------------
RESUME_FORMAT, RESUME_VERSION = "rfcl-jax resume state", 1


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


def save_resume_state(path: Path, algorithm: str, script: str, config: dict, global_step: int, payload: dict,
                      demos: Optional[dict] = None, fork: Optional[dict] = None) -> None:
    """Everything a run needs to continue exactly: a one-line JSON header (with `demos`: the demo file's path, the
    number of demos and their content hash, see load_run_demos; with `fork`: the run's parent, fork_record), then the
    msgpack payload: whatever the script puts there (its learner, buffers, generators, schedule...). Written atomically:
    the previous state stays until this one is complete on disk."""
    body = serialization.msgpack_serialize(payload)
    header = {"format": RESUME_FORMAT, "version": RESUME_VERSION, "algorithm": algorithm, "script": script,
              "global_step": global_step, "args": config, "demos": demos, "fork": fork,
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


def fork_state_path(source: str) -> Path:
    """--fork SOURCE: a run directory (its latest resume state) or a resume-state file (e.g. rfcl.py's
    <run>/stage2_start.state, kept at the stage switch)."""
    return Path(source) / RESUME_FILE if Path(source).is_dir() else Path(source)


def fork_record(path: Path, header: dict, config: dict) -> dict:
    """What a fork records of its parent (resume states and summary.json): the state it started from, the parent run,
    the env step, and each flag it changed as [parent's, fork's]."""
    changed = {k: [v, config.get(k)] for k, v in header["args"].items() if k not in (
        "exp_name", "fork", "resume", "checkpoint") and json.dumps(v) != json.dumps(config.get(k), default=list)}
    return {"state": str(Path(path).resolve()), "parent": header["args"].get("exp_name"),
            "global_step": header["global_step"], "changed": changed}


def start_state(resume: Optional[str], fork: Optional[str], exp_name: str, algorithm: str, script: str,
                total_timesteps: int, config: dict) -> tuple[Path, dict, Optional[dict], Optional[dict]]:
    """(run directory, header, payload, fork record) a run starts from: its own resume state with --resume (the
    directory locked: one writer per run), another run's with --fork (fork_record of it), none for a new run
    (runs/<exp-name>, made by make_run_dir once everything is checked). A resumed fork keeps its fork record."""
    if resume:
        run_dir = Path(resume)
        lock_run_dir(run_dir)
        header, payload = load_resume_state(run_dir / RESUME_FILE, algorithm, script, total_timesteps)
        return run_dir, header, payload, header.get("fork")
    run_dir = new_run_dir(exp_name)
    if fork:
        header, payload = load_resume_state(fork_state_path(fork), algorithm, None, total_timesteps)
        return run_dir, header, payload, fork_record(fork_state_path(fork), header, config)
    return run_dir, {}, None, None


def load_run_demos(header: dict, env_id: str, obs_mode: str, control_mode: str, num_demos: int,
                   dataset_path: Optional[str], sim_config: dict, dims: Optional[tuple[int, int]],
                   env_states: bool) -> tuple[common.Demos, Path, dict]:
    """The demos a run trains on (demo_making.get_and_load_demos), and the record of them its resume states keep. A resumed
    run (header: its resume state's) loads --dataset-path if given, else the file it began with, and continues only
    on the demos it began with: the same content, wherever the file now is (states written before they recorded their
    demos are not checked)."""
    saved = header.get("demos")
    demos, path = demo_making.get_and_load_demos(env_id, obs_mode, control_mode, num_demos,
                                            dataset_path or (saved or {}).get("path"), env_states, sim_config, dims)
    digest = common.demos_digest(demos)
    if saved and saved["sha256"] != digest:
        fail(f"{path} holds other demos than the run began with ({saved['num_demos']} demos of {saved['path']}, "
             f"sha256 {saved['sha256'][:12]}...); put that file back, or pass --dataset-path to a copy of it")
    return demos, path, {"path": str(path.resolve()), "num_demos": num_demos, "sha256": digest}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "rfcl-jax checkpoint", 2
V1_NETWORKS = ("actor_params", "critic_params", "target_params", "log_alpha")  # version 1 kept these, at the top level


def save_checkpoint(path: Path, meta: dict, networks: dict, global_step: int, extra: Optional[dict] = None) -> None:
    """One self-describing file, written atomically: `meta` says what it is (algorithm, the script that wrote it,
    env id, modes, dims, flags), `networks` is every tree the script's networks() returns, whatever their names (a copy
    that adds a network keeps it)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "global_step": global_step,
               "networks": jax.device_get(networks),
               "extra": json.dumps(extra or {}, default=lambda o: np.asarray(o).tolist())}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, serialization.msgpack_serialize(payload))


def checkpoint_sim_config(ckpt: dict) -> dict:
    """The physics a checkpoint was trained under (vector_env.sim_config; checkpoints written before --sim-config
    existed: the task's own, {})."""
    return ckpt.get("sim_config") or {}


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint and check that it is one, whole; a one-line error if not. Its networks are in ckpt["networks"]
    (also for version 1, which kept V1_NETWORKS beside the meta)."""
    p = Path(path)
    if not p.is_file():
        fail(f"checkpoint {p} not found; pass runs/<run>/checkpoints/<file>.ckpt")
    try:
        ckpt = serialization.msgpack_restore(p.read_bytes())
        if int(ckpt.get("version", 1)) == 1:
            ckpt["networks"] = {k: ckpt.pop(k) for k in V1_NETWORKS}
        for k in ("networks", "algorithm", "env_id", "obs_mode", "control_mode", "obs_dim", "act_dim",
                                   "hidden_dims", "args"):
            ckpt[k]  # noqa: B018 - presence check
    except Exception:  # noqa: BLE001
        fail(f"{p} is not a readable checkpoint of these scripts (corrupted or another format)")
    # checkpoints written before they carried a format and version are version 1
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        fail(f"{p} is not a checkpoint of these scripts (format {ckpt['format']!r})")
    if int(ckpt.get("version", 1)) not in (1, CHECKPOINT_VERSION):
        fail(f"{p} was written by checkpoint version {ckpt['version']}; these scripts read versions up to "
             f"{CHECKPOINT_VERSION}: use it with the version of the code that wrote it")
    return ckpt


def load_run_checkpoint(path: str, env_id: str, obs_mode: str, control_mode: str, sim_config: dict, script: str,
                        networks_like: Optional[Callable[[int, int], dict]] = None,
                        dims: Optional[tuple[int, int]] = None) -> dict:
    """--checkpoint of a run, read and checked before anything is built: trained with the run's env id, modes and
    physics (--sim-config), for the env's (obs_dim, act_dim) `dims` if given, and (given `networks_like(obs_dim,
    act_dim)`, the networks `script` builds with the run's flags, as shapes) holding networks of that tree and
    shapes. Each mismatch is one line."""
    ckpt = load_checkpoint(path)
    for flag, want in (("env-id", env_id), ("control-mode", control_mode), ("obs-mode", obs_mode)):
        if ckpt[flag.replace("-", "_")] != want:
            fail(f"{path} was trained with --{flag} {ckpt[flag.replace('-', '_')]}, not {want}; pass the same")
    if checkpoint_sim_config(ckpt) != sim_config:
        fail(f"{path} was trained under the physics {common.physics_name(checkpoint_sim_config(ckpt))}, not "
             f"{common.physics_name(sim_config)}; pass the same --sim-config")
    if networks_like is not None:
        check_networks(ckpt, path, script, networks_like)
    if dims is not None and (int(ckpt["obs_dim"]), int(ckpt["act_dim"])) != tuple(dims):
        fail(f"{path} has obs/act dims {ckpt['obs_dim']}/{ckpt['act_dim']}; {env_id} has {dims[0]}/{dims[1]}")
    return ckpt


def check_networks(ckpt: dict, path: str, script: str, networks_like: Callable[[int, int], dict]) -> None:
    """One line unless the checkpoint holds networks_like(obs_dim, act_dim)'s tree and shapes (load_run_checkpoint)."""
    want = jax.eval_shape(lambda: networks_like(int(ckpt["obs_dim"]), int(ckpt["act_dim"])))
    got = ckpt["networks"]
    flat_got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    flat_want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    if flat_got == flat_want:
        return
    diff = next(k for k in sorted(set(flat_got) | set(flat_want)) if flat_got.get(k) != flat_want.get(k))
    writer = Path(ckpt.get("script") or f"{ckpt['algorithm']}.py").name
    fail(f"{path} holds networks that {Path(script).name} does not build with these flags ({diff}: "
         f"{flat_got.get(diff, 'absent')} in the checkpoint, {flat_want.get(diff, 'absent')} here); it was written by "
         f"{writer} with --hidden-dims {' '.join(map(str, ckpt.get('hidden_dims', [])))} --num-qs "
         f"{ckpt.get('num_qs')}: pass the same flags, or start from it with {writer}")


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
