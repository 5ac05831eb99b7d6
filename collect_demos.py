"""Turn a trained rfcl.py / rlpd.py checkpoint into demonstrations in ManiSkill's trajectory format.

    python collect_demos.py runs/<run>/checkpoints/final.ckpt --num-envs 8 --num-episodes 1000

The deterministic policy runs in parallel envs for fixed-length episodes (the training convention);
ManiSkill's RecordEpisode writes obs, actions, terminated, truncated, success, rewards and env_states,
so `python -m mani_skill.trajectory.replay_trajectory` replays the file and common.load_demos reads it. The policy is
built by the script that wrote the checkpoint (a copy of rfcl.py or rlpd.py with an edited Actor included).
"""

from __future__ import annotations

import stop_signals  # first: from here on Ctrl-C, SIGTERM or SIGHUP exits with one line, during the slow imports too

import json
import multiprocessing
import secrets
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from mani_skill.trajectory.merge_trajectory import merge_trajectories
from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper
from mani_skill.utils.wrappers.record import RecordEpisode
from tqdm import tqdm

import common
import run_files
import vector_env


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """checkpoint written by rfcl.py, rlpd.py or a copy of either"""
    script: Optional[str] = None
    """the script whose networks to build (default: the one that wrote the checkpoint, by the path it records, else
    the file of that name beside this one)"""
    num_envs: int = 8
    """parallel envs"""
    num_episodes: int = 100
    """episodes to write (successful ones, with --only-successful)"""
    only_successful: bool = True
    """keep only episodes that end in success"""
    max_attempts: Optional[int] = None
    """stop after this many episodes even if too few succeeded (default: 10 x --num-episodes)"""
    max_episode_steps: Optional[int] = None
    """episode length (default: the checkpoint's --max-episode-steps)"""
    output_dir: Optional[str] = None
    """where the .h5/.json go (default: runs/<run>/demos/ beside the checkpoint's run)"""
    sim_backend: Literal["cpu", "gpu"] = "cpu"
    """cpu: one CPU simulator per process; gpu: one ManiSkill GPU-batched env (needs CUDA)"""
    seed: int = 2_000_000
    """seed of the first episode; episode k uses seed + k (default range: unused by training and eval)"""
    save_video: bool = False
    """also write mp4s of env 0's first --num-videos episodes"""
    num_videos: int = 3
    """videos to write with --save-video"""


def load_policy(path: str, script: Optional[str] = None):
    """Checkpoint dict plus a jitted deterministic policy, built with the networks of the script that wrote it."""
    ckpt = run_files.load_checkpoint(path)
    return ckpt, run_files.checkpoint_script(ckpt, path, script).load_actor(ckpt)[0]


def make_env_kwargs(ckpt: dict, max_steps: int, num_envs: int, sim_backend: str, render: bool) -> dict:
    return vector_env.env_kwargs(ckpt["obs_mode"], ckpt["control_mode"], num_envs, sim_backend, 256 if render else None,
                                 max_steps, run_files.checkpoint_sim_config(ckpt))  # the physics it was trained in


SOURCE_DESC = "rollouts of a {algo} policy (deterministic actions) from checkpoint {path}"


class RecordingWorker(gym.Wrapper):
    """One CPU env in a worker process: RecordEpisode (trajectories) inside CPUGymWrapper."""

    def __init__(self, env_id: str, env_kwargs: dict, out_dir: str, idx: int, source: str, record_video: bool):
        env = vector_env.make_env(env_id, **env_kwargs)
        self.video = common.VideoRecorder(env) if record_video else None
        self.record = RecordEpisode(self.video or env, output_dir=out_dir, trajectory_name=f"part{idx}",
                                    save_trajectory=True, save_video=False, save_on_reset=False, record_reward=True,
                                    source_type="rl", source_desc=source)
        super().__init__(CPUGymWrapper(self.record, ignore_terminations=True))
        self.idx = idx
        if multiprocessing.parent_process() is not None:  # the main process decides when to stop (as vector_env's)
            for sig in stop_signals.SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def finish(self, saves, video_path=None):
        """End the current episode: keep it in the h5 if saves[idx]; write the video if one was recorded."""
        self.record.flush_trajectory(save=bool(saves[self.idx]))
        if self.video is not None:
            self.video.stop(video_path) if video_path else self.video.stop()

    def start_video(self):
        if self.video is not None:
            self.video.start()

    def h5_path(self):
        return self.record._h5_file.filename


class CPURecorder:
    def __init__(self, ckpt, args: Args, max_steps: int, tmp: str):
        source = SOURCE_DESC.format(algo=ckpt["algorithm"], path=args.checkpoint)
        fns = [partial(RecordingWorker, ckpt["env_id"],
                       make_env_kwargs(ckpt, max_steps, 1, "physx_cpu", render=args.save_video and i == 0),
                       tmp, i, source, args.save_video and i == 0) for i in range(args.num_envs)]
        self.envs = gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = self.envs.single_action_space.shape[0]

    def reset(self, seeds):
        return self.envs.reset(seed=[int(s) for s in seeds])[0]

    def step(self, actions):
        obs, _, _, _, info = self.envs.step(np.asarray(actions))
        return obs, np.asarray(info["success"], bool)

    def finish(self, saves, video_path=None):
        self.envs.call("finish", saves=list(saves), video_path=video_path)

    def start_video(self):
        self.envs.call("start_video")

    def close(self):
        paths = list(self.envs.call("h5_path"))
        self.envs.close()  # RecordEpisode closes its files here
        return paths


class GPURecorder:
    def __init__(self, ckpt, args: Args, max_steps: int, tmp: str):
        env = gym.make(ckpt["env_id"], **make_env_kwargs(ckpt, max_steps, args.num_envs, vector_env.GPU_PHYSX,
                                                          render=args.save_video))
        self.video = common.VideoRecorder(env, env_index=0) if args.save_video else None
        self.record = RecordEpisode(self.video or env, output_dir=tmp, trajectory_name="part0", save_trajectory=True,
                                    save_video=False, save_on_reset=False, record_reward=True, source_type="rl",
                                    source_desc=SOURCE_DESC.format(algo=ckpt["algorithm"], path=args.checkpoint))
        self.obs_dim = env.unwrapped.single_observation_space.shape[0]
        self.act_dim = env.unwrapped.single_action_space.shape[0]
        self.device = env.unwrapped.device

    def reset(self, seeds):
        return self.record.reset(seed=[int(s) for s in seeds])[0].cpu().numpy()

    def step(self, actions):
        obs, _, _, _, info = self.record.step(torch.as_tensor(np.asarray(actions), device=self.device))
        return obs.cpu().numpy(), info["success"].cpu().numpy()

    def finish(self, saves, video_path=None):
        saves = np.asarray(saves, bool)
        self.record.flush_trajectory(env_idxs_to_flush=np.flatnonzero(saves), save=True)
        self.record.flush_trajectory(env_idxs_to_flush=np.flatnonzero(~saves), save=False)
        if self.video is not None:
            self.video.stop(video_path) if video_path else self.video.stop()

    def start_video(self):
        if self.video is not None:
            self.video.start()

    def close(self):
        path = self.record._h5_file.filename
        self.record.close()
        return [path]


def main(args: Args) -> None:
    warnings.filterwarnings("ignore", module="mani_skill")
    if args.num_envs < 1 or args.num_episodes < 1:
        common.fail(f"--num-envs and --num-episodes must be >= 1 (got {args.num_envs}, {args.num_episodes})")
    for flag, value, least in (("max-attempts", args.max_attempts, 1), ("max-episode-steps", args.max_episode_steps, 1),
                               ("num-videos", args.num_videos, 0), ("seed", args.seed, 0)):
        if value is not None and value < least:
            common.fail(f"--{flag} must be >= {least}, got {value}")
    if args.sim_backend == "gpu":
        vector_env.check_gpu_simulation()
    ckpt, act = load_policy(args.checkpoint, args.script)
    train_args = json.loads(ckpt["args"])
    max_steps = args.max_episode_steps or int(train_args.get("max_episode_steps", 50))
    max_attempts = args.max_attempts or 10 * args.num_episodes
    ckpt_path = Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else ckpt_path.resolve().parent.parent / "demos"
    if out_dir.exists() and not out_dir.is_dir():
        common.fail(f"--output-dir {out_dir} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        common.fail(f"cannot write in --output-dir {out_dir} ({e.strerror or e}); pass a writable folder")
    # unique to this process (another one may write into the same folder in the same second), and placed without
    # ever replacing a file (common.place_new)
    name = (f"{ckpt['algorithm']}_{ckpt_path.stem}_{args.num_episodes}_{time.strftime('%Y%m%d_%H%M%S')}_"
            f"{secrets.token_hex(3)}.{ckpt['obs_mode']}.{ckpt['control_mode']}."
            f"physx_{'cuda' if args.sim_backend == 'gpu' else 'cpu'}")
    out_h5 = out_dir / f"{name}.h5"

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".tmp", dir=out_dir) as tmp:
        rec = (GPURecorder if args.sim_backend == "gpu" else CPURecorder)(ckpt, args, max_steps, tmp)
        if (rec.obs_dim, rec.act_dim) != (int(ckpt["obs_dim"]), int(ckpt["act_dim"])):
            rec.close()
            common.fail(f"{ckpt['env_id']} with {ckpt['control_mode']} has obs/action dims {rec.obs_dim}/{rec.act_dim}, "
                 f"the checkpoint expects {ckpt['obs_dim']}/{ckpt['act_dim']}")
        stop_signals.exit_if_signalled()
        kept = attempts = successes = videos = 0
        pbar = tqdm(total=args.num_episodes, unit="demo", dynamic_ncols=True)
        # Ctrl-C / SIGTERM / SIGHUP: the episodes kept so far are written, then it exits
        stop = stop_signals.StopRequest(lost="the demos collected so far are not written")
        while kept < args.num_episodes and attempts < max_attempts and not stop:
            seeds = args.seed + attempts + np.arange(args.num_envs)
            obs = rec.reset(seeds)
            video = args.save_video and videos < args.num_videos
            if video:
                rec.start_video()
            for _ in range(max_steps):
                obs, success = rec.step(np.asarray(act(obs)))
            attempts += args.num_envs
            successes += int(success.sum())
            saves = success if args.only_successful else np.ones(args.num_envs, bool)
            # never more than asked for: the surplus of the last round is dropped
            saves &= np.cumsum(saves) <= args.num_episodes - kept
            kept += int(saves.sum())
            video_path = str(out_dir / f"{name}.video{videos}.mp4") if video else None
            videos += bool(video)
            rec.finish(saves, video_path)
            pbar.update(int(saves.sum()))
            pbar.set_postfix(success_rate=f"{successes / attempts:.3f}", attempts=attempts)
        pbar.close()
        stop.restore()
        parts = [p for p in rec.close() if Path(p).exists()]
        if kept:
            tmp_h5 = Path(tmp) / f"{name}.h5"
            try:
                merge_trajectories(str(tmp_h5), parts)
            except OSError as e:
                common.write_failed(out_h5, e)
            meta = json.loads(tmp_h5.with_suffix(".json").read_text())
            # a GPU reset call draws all its envs from its first env's seed: there a recorded seed does not give
            # back its episode's initial state; the recorded env states always do
            meta["reset_seeds_reproduce_episodes"] = args.sim_backend == "cpu"
            common.write_json(tmp_h5.with_suffix(".json"), meta)
            # json last: a reader that finds the json finds a complete h5
            common.place_new(tmp_h5, out_h5)
            common.place_new(tmp_h5.with_suffix(".json"), out_h5.with_suffix(".json"))
    report = {"path": str(out_h5) if kept else None, "episodes_written": kept, "attempts": attempts,
              "success_rate": successes / max(attempts, 1), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(report))
    if stop:
        print(f"stopped by {stop.name} after {kept} of {args.num_episodes} demos" +
              (f"; they are in {out_h5}" if kept else ""), file=sys.stderr)
        sys.exit(stop.exit_code)
    if kept < args.num_episodes:
        common.fail(f"the policy succeeded in {successes} of {attempts} episodes ({report['success_rate']:.1%}); "
             f"wrote {kept} of {args.num_episodes} demos after --max-attempts {max_attempts}: train longer or "
             f"raise --max-attempts")


if __name__ == "__main__":
    stop_signals.exit_if_signalled()  # a Ctrl-C during the imports whose exit a library dropped
    main(tyro.cli(Args, description=__doc__))
