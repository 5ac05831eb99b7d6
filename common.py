"""What every script and tool shares so that runs compare: finding and loading demos, the eval that defines the
reported metrics, and eval videos. Read it to check what a demo file must hold or how success is measured.

  * demos:   get_demos() finds a ManiSkill trajectory file for (env id, obs mode, control mode), or has demo_making
             make one (download if the network allows, else ManiSkill's motion planners, offline), cached;
             load_demos() reads and validates it into flat transition arrays + per-trajectory env states.
  * eval:    evaluate() runs fixed-length episodes of the deterministic policy from the eval seeds.
  * videos:  VideoRecorder renders frames only while it records.
Every user-facing failure is one line saying what was wrong and how to fix it (fail(), DemoError).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gymnasium as gym
import h5py
import numpy as np

import stop_signals


def fail(msg: str):
    """One-line error for the user, no traceback: env workers that exist are ended first, so that nothing they print
    while their pipes close comes after it."""
    for worker in multiprocessing.active_children():
        worker.kill()
    bars = sys.modules.get("tqdm.std")  # a progress bar left open redraws itself at exit, under the error
    for bar in list(bars.tqdm._instances) if bars else []:
        bar.close()
    sys.exit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# Files written atomically (run files, checkpoints, demos, results)
# ----------------------------------------------------------------------------------------------
RESUME_FILE = "resume.state"  # a run's resume state, in runs/<exp-name>/ (run_files.py)


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
    fix = (f"Create the folder {path.parent} or write elsewhere" if not path.parent.is_dir() else
           f"Free space on that disk (or make {path.parent} writable)")
    fail(f"could not write {path} ({e.strerror or e}): {kept}. {fix}; stopped here")


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
# Finding demonstration files
# ----------------------------------------------------------------------------------------------
class DemoError(ValueError):
    """A problem with demonstration data that the user can fix; the message says how."""


def demo_dir() -> Path:
    """ManiSkill's demo folder: $MS_ASSET_DIR/demos, default ~/.maniskill/demos (read at call time)."""
    root = os.environ.get("MS_ASSET_DIR", os.path.join(os.path.expanduser("~"), ".maniskill"))
    return Path(root) / "demos"


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _file_modes(meta: dict) -> tuple[str | None, str | None, str | None]:
    info = meta.get("env_info", {})
    kw = info.get("env_kwargs", {})
    return info.get("env_id"), kw.get("obs_mode"), kw.get("control_mode")


def file_sim_config(meta: dict) -> dict:
    """The physics a trajectory file was recorded under: the sim_config of its env_kwargs ({}: the task's own)."""
    return meta.get("env_info", {}).get("env_kwargs", {}).get("sim_config") or {}


def physics_name(sim_config: dict) -> str:
    return json.dumps(sim_config, sort_keys=True) if sim_config else "the task's own (no --sim-config)"


def find_demo_file(env_id: str, obs_mode: str, control_mode: str, min_demos: int = 1,
                   sim_config: Optional[dict] = None) -> Path | None:
    """The cached/downloaded trajectory file under demo_dir()/env_id with the requested modes and physics
    (sim_config, {} or None: the task's own) and at least `min_demos` trajectories; the largest such file wins (so an
    official dataset beats a small generated one). None if there is none."""
    best, best_n = None, -1
    for h5 in sorted((demo_dir() / env_id).rglob("*.h5")):
        js = h5.with_suffix(".json")
        if any(part.startswith(".tmp") for part in h5.parts) or not js.exists():
            continue
        try:
            meta = read_json(js)
        except (OSError, ValueError):
            continue
        if _file_modes(meta) != (env_id, obs_mode, control_mode) or file_sim_config(meta) != (sim_config or {}):
            continue
        n = len(meta.get("episodes", []))
        if n >= min_demos and n > best_n:
            best, best_n = h5, n
    return best


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
               env_states: bool = True, sim_config: dict | None = None) -> Demos:
    """Load and validate the first `num_demos` trajectories of a ManiSkill trajectory file (.h5 + .json).

    Every check that is given a value (env id, modes, physics, dims) is enforced; each failure is a DemoError
    whose one-line message names the file and the fix. `env_states=False` loads files without simulator
    states (rlpd.py needs only observations, actions and success).
    """
    path = Path(path)
    fix = "pass --dataset-path to a ManiSkill trajectory .h5 (its .json beside it), or omit it to use/generate cached demos"
    if not path.exists():
        raise DemoError(f"demo file {path} not found; {fix}")
    if path.is_dir():
        raise DemoError(f"{path} is a folder, not a ManiSkill trajectory .h5; {fix}")
    if path.suffix == ".json":
        raise DemoError(f"{path} is the .json half of a ManiSkill trajectory file: pass the .h5 beside it "
                        f"({path.with_suffix('.h5')})")
    json_path = path.with_suffix(".json")
    if not json_path.exists():
        raise DemoError(f"{path} has no {json_path.name} beside it, so it is not a ManiSkill trajectory file; {fix}")
    try:
        meta = read_json(json_path)
        episodes = meta["episodes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"{json_path} is not a ManiSkill trajectory json ({type(e).__name__}); {fix}") from None
    f_env, f_obs, f_ctrl = _file_modes(meta)
    if env_id is not None and f_env is not None and f_env != env_id:
        raise DemoError(f"{path} holds demos of {f_env}, not {env_id}; pass demos of {env_id} or --env-id {f_env}")
    other_obs, other_ctrl = obs_mode is not None and f_obs != obs_mode, control_mode is not None and f_ctrl != control_mode
    if other_obs or other_ctrl:
        # one command converts both, as demo_making does with the planner's files
        obs, ctrl = obs_mode if other_obs else f_obs, control_mode if other_ctrl else f_ctrl
        what = " and ".join([f"obs mode {f_obs!r}, not {obs_mode!r}"] * other_obs +
                            [f"control mode {f_ctrl!r}, not {control_mode!r}"] * other_ctrl)
        instead = f"pass --control-mode {f_ctrl}, or " if not other_obs else ""
        raise DemoError(f"{path} was recorded with {what}; {instead}convert it with python -m "
                        f"mani_skill.trajectory.replay_trajectory --traj-path {path} "
                        f"--use-first-env-state -o {obs} -c {ctrl} --save-traj --num-envs 1 and pass --dataset-path "
                        f"{path.with_name(f'{path.stem}.{obs}.{ctrl}.physx_cpu.h5')}")
    if sim_config is not None and file_sim_config(meta) != sim_config:
        raise DemoError(f"{path} was recorded under the physics {physics_name(file_sim_config(meta))}, the run "
                        f"simulates {physics_name(sim_config)}: demos of other physics are not mixed in; pass demos "
                        f"made with the same --sim-config, or omit --dataset-path to use or make such demos")
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
                for name, x in (("observations", obs), ("actions", act)):
                    if not np.isfinite(x).all():
                        raise DemoError(f"{path}:{key} holds NaN or infinite {name} (first at step "
                                        f"{int(np.argwhere(~np.isfinite(x))[0][0])}); re-record or re-convert it, or "
                                        f"pass --num-demos to stop before it")
                T = len(act)
                sizes = obs.shape[1:], act.shape[1:]
                if cols["obs"] and sizes != (cols["obs"][0].shape[1:], cols["actions"][0].shape[1:]):
                    first = f"traj_{chosen[0]['episode_id']}"
                    raise DemoError(f"{path}:{key} has observations/actions of size {sizes[0]}/{sizes[1]} but {first} "
                                    f"has {cols['obs'][0].shape[1:]}/{cols['actions'][0].shape[1:]}: the file mixes "
                                    f"envs or modes; pass --num-demos to stop before it, or another file")
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
        # deleting is advised only for a file this repository cached, which a rerun makes again
        again = ("delete it (and its .json) and rerun to make it again" if demo_dir() in path.resolve().parents else
                 "copy it again (an interrupted copy or download leaves such a file)")
        raise DemoError(f"{path} is not a readable HDF5 file (corrupted or truncated: {str(e).splitlines()[0]}); "
                        f"{again}, or pass another --dataset-path") from None
    d = Demos(**{k: np.concatenate(v) for k, v in cols.items()}, traj_obs=traj_obs, env_states=states,
              episodes=chosen)
    if obs_dim is not None and d.obs.shape[1] != obs_dim:
        raise DemoError(f"{path} has observations of dim {d.obs.shape[1]} but {env_id or 'the env'} has {obs_dim}; "
                        f"the demos were recorded for another env/obs mode, pass matching demos")
    if act_dim is not None and d.actions.shape[1] != act_dim:
        raise DemoError(f"{path} has actions of dim {d.actions.shape[1]} but {env_id or 'the env'} has {act_dim} "
                        f"with this control mode; pass demos recorded with the same --control-mode")
    return d



def demos_digest(demos: Demos) -> str:
    """A content hash of the demos as loaded (transitions and env states): a resume state records it, so that a run
    is never continued on other demos than it began with, wherever the file has moved."""
    h = hashlib.sha256()
    for x in (demos.obs, demos.actions, demos.rewards, demos.terminated, demos.traj_end):
        h.update(np.ascontiguousarray(x).tobytes())
    for states in demos.env_states:
        stack = [states]
        while stack:
            node = stack.pop()
            for k in sorted(node):
                if isinstance(node[k], dict):
                    stack.append(node[k])
                else:
                    h.update(k.encode() + np.ascontiguousarray(node[k]).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------
def evaluate(envs, act_fn, max_episode_steps: int, num_episodes: int, video_path: Optional[str] = None) -> dict:
    """`act_fn(obs) -> actions` (the deterministic policy) for fixed-length episodes from eval seeds 10**6 + k, unused by demos
    and training. num_episodes is rounded up to whole rounds of envs.num_envs; the video shows round 0, env 0."""
    n = envs.num_envs
    rounds = -(-num_episodes // n)
    once, at_end, returns = [], [], []
    envs.fix_initial_states(10**6 + np.arange(rounds * n))  # GPU: each eval seed's initial state fixed once, then reused
    for r in range(rounds):
        stop_signals.exit_if_signalled()  # --evaluate: a Ctrl-C whose exit was dropped ends it here
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
