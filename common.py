"""Shared plumbing for rfcl.py, rlpd.py and collect_demos.py: demonstrations and videos.

Nothing algorithmic lives here. Three jobs:
  * get_demos():  find a ManiSkill trajectory file for (env id, obs mode, control mode), or make one
                  (download if the network allows, else ManiSkill's motion planners, offline), cached.
  * load_demos(): read and validate such a file into flat transition arrays + per-trajectory env states.
  * add_video_recorder(): wrap an env so its episodes become mp4 files.
Every user-facing failure is a DemoError whose message is one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np


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
        _run([sys.executable, "-m", "mani_skill.examples.motionplanning.panda.run", "-e", env_id,
              "-n", str(n_gen), "--only-count-success", "--record-dir", str(tmp), "--traj-name", name],
             tmp, f"generating {n_gen} demos with the motion planner")
        raw = tmp / env_id / "motionplanning" / f"{name}.h5"
        out = _convert(raw, obs_mode, control_mode, tmp)
        n_ok = len(_read_json(out.with_suffix(".json"))["episodes"])
        if n_ok < num_demos:
            raise DemoError(f"only {n_ok}/{n_gen} planner demos of {env_id} converted to {control_mode}; "
                            f"ask for fewer (--num-demos {n_ok}) or another --control-mode")
        # the raw pd_joint_pos file is kept too: it is the source the converted one came from
        for src in (raw, raw.with_suffix(".json"), out, out.with_suffix(".json")):
            os.replace(src, final_dir / src.name)
    print(f"[demos] {n_ok} demos of {env_id} cached in {final_dir} ({time.time() - t0:.1f} s)", flush=True)
    return final_dir / out.name


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

    rewards = the demo's per-step success (sparse). terminated/truncated are as recorded;
    `traj_end` marks each trajectory's last transition. Per trajectory (lists, len num_demos):
    obs (T+1, obs_dim), env_states (nested dict of arrays with leading T+1), episode json.
    """

    path: Path
    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    traj_end: np.ndarray
    traj_obs: list = field(default_factory=list)
    env_states: list = field(default_factory=list)
    episodes: list = field(default_factory=list)
    env_info: dict = field(default_factory=dict)

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
               shuffle: bool = False, seed: int = 0) -> Demos:
    """Load and validate `num_demos` trajectories of a ManiSkill trajectory file (.h5 + .json).

    Every check that is given a value (env id, modes, dims) is enforced; each failure is a DemoError
    whose one-line message names the file and the fix.
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
    order = np.arange(len(episodes))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(episodes))
    chosen = [episodes[i] for i in order[:num_demos]]

    cols = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "terminated", "truncated", "traj_end")}
    traj_obs, env_states = [], []
    try:
        with h5py.File(path, "r") as f:
            for ep in chosen:
                key = f"traj_{ep['episode_id']}"
                if key not in f:
                    raise DemoError(f"{path} lacks {key} listed in its json; the pair is inconsistent, {fix}")
                g = f[key]
                for need in ("obs", "actions", "success", "env_states"):
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
                trunc = g["truncated"][()].astype(bool) if "truncated" in g else np.zeros(T, bool)
                cols["obs"].append(obs[:-1]); cols["next_obs"].append(obs[1:]); cols["actions"].append(act)
                cols["rewards"].append(success.astype(np.float32))
                cols["terminated"].append(term); cols["truncated"].append(trunc)
                end = np.zeros(T, bool); end[-1] = True; cols["traj_end"].append(end)
                traj_obs.append(obs)
                env_states.append(_read_group(g["env_states"]))
    except OSError as e:
        raise DemoError(f"{path} is not a readable HDF5 file (corrupted or truncated: {str(e).splitlines()[0]}); "
                        f"delete it (and its .json) and rerun to regenerate, or pass another --dataset-path") from None
    d = Demos(path=path, **{k: np.concatenate(v) for k, v in cols.items()}, traj_obs=traj_obs,
              env_states=env_states, episodes=chosen, env_info=meta.get("env_info", {}))
    if obs_dim is not None and d.obs.shape[1] != obs_dim:
        raise DemoError(f"{path} has observations of dim {d.obs.shape[1]} but {env_id or 'the env'} has {obs_dim}; "
                        f"the demos were recorded for another env/obs mode, pass matching demos")
    if act_dim is not None and d.actions.shape[1] != act_dim:
        raise DemoError(f"{path} has actions of dim {d.actions.shape[1]} but {env_id or 'the env'} has {act_dim} "
                        f"with this control mode; pass demos recorded with the same --control-mode")
    return d


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
