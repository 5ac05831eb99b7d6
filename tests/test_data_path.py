"""The data path of both scripts, row by row: every online row of a real run (CPU ManiSkill) is the env's own
transition, and every offline row the demo file's. A spy between the script and its training env records what
the env returned and what the script asked of it; the buffers are read back from the run's resume state."""

import json

import h5py
import numpy as np
import pytest

import rfcl
import rlpd
import common
import run_files
import vector_env

ENVS, PER_ENV, SCALE = 2, 3, 1.7
FIELDS = ("obs", "actions", "rewards", "next_obs", "masks")


class TransitionSpy:
    """Wraps the training vector env and keeps, for every step call, the observation each env was in (from the
    env's own last reset or step, never from the script), the actions the script sent, the reward and
    termination the env returned, and the observation it returned. Success and termination are coin flips, so
    that rewards and masks take both values in a tiny run; everything else is the simulator's."""

    def __init__(self, envs):
        self.envs, self.steps, self.current = envs, [], None
        self.coin = np.random.default_rng(0)

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def reset(self, mask, seeds, *rest):
        obs = np.array(self.envs.reset(mask, seeds, *rest))
        if self.current is None:
            self.current = obs.copy()
        self.current[np.asarray(mask, bool)] = obs[np.asarray(mask, bool)]
        return obs

    def step(self, actions):
        actions = np.array(actions)
        next_obs, _, _ = self.envs.step(actions)
        next_obs = np.array(next_obs)
        terminated, success = self.coin.random(len(actions)) < 0.3, self.coin.random(len(actions)) < 0.3
        self.steps.append({"obs": self.current.copy(), "actions": actions, "rewards": success.astype(np.float32),
                           "next_obs": next_obs.copy(), "masks": 1.0 - terminated})
        self.current = next_obs.copy()
        return next_obs, terminated, success

    def rows(self, first: int = 0, last: int | None = None) -> dict:
        """The recorded transitions of step calls first..last, in the order a buffer adds them (step, env)."""
        return {k: np.concatenate([s[k] for s in self.steps[first:last]]) for k in FIELDS}


def spied_run(script, tmp_path, monkeypatch, *flags) -> tuple[TransitionSpy, dict, dict]:
    """script.main in this process with a TransitionSpy on its training env (the first one it makes); returns the
    spy, the resume state's payload and the run's args."""
    spies, make_envs = [], vector_env.make_envs

    def spying_make_envs(*a, **k):
        envs = make_envs(*a, **k)
        if spies:  # the eval envs
            return envs
        spies.append(TransitionSpy(envs))
        return spies[0]

    monkeypatch.setattr(vector_env, "make_envs", spying_make_envs)
    monkeypatch.chdir(tmp_path)
    args = script.parse_args([
        "--exp-name", "data", "--num-demos", "2", "--num-envs", str(ENVS), "--steps-per-env", str(PER_ENV),
        "--num-seed-steps", "12", "--grad-updates-per-step", "1", "--batch-size", "8", "--buffer-size", "5000",
        "--num-eval-envs", "1", "--num-eval-episodes", "1", "--eval-freq", "100000", "--log-freq", "60",
        "--max-episode-steps", "10", "--no-capture-video", "--bootstrap-at-done", "truncated", "--hidden-dims", "32",
        "32", *flags])
    script.main(args)
    monkeypatch.undo()
    _, payload = run_files.load_resume_state(tmp_path / "runs" / "data" / common.RESUME_FILE,
                                              script.ALGORITHM)
    return spies[0], payload, json.loads((tmp_path / "runs" / "data" / "args.json").read_text())


def buffer_rows(saved: dict) -> dict:
    """A saved replay buffer's filled part, oldest row first (none here wraps around)."""
    assert int(saved["ptr"]) == int(saved["size"]) % int(saved["capacity"])
    return {k: np.asarray(saved["data"][k]) for k in FIELDS}


def demo_rows(path, num_demos: int, action_scale: float) -> dict:
    """The first num_demos trajectories of a ManiSkill trajectory file, read with h5py alone, as the offline buffer
    must hold them: actions scaled and clipped, reward = success, mask = 1 - terminated (--bootstrap-at-done
    truncated)."""
    episodes = json.loads(path.with_suffix(".json").read_text())["episodes"][:num_demos]
    out = {k: [] for k in FIELDS}
    with h5py.File(path, "r") as f:
        for ep in episodes:
            g = f[f"traj_{ep['episode_id']}"]
            obs = g["obs"][()]
            out["obs"].append(obs[:-1]), out["next_obs"].append(obs[1:])
            out["actions"].append(np.clip(g["actions"][()] * action_scale, -1, 1))
            out["rewards"].append(g["success"][()].astype(np.float32))
            out["masks"].append(1.0 - g["terminated"][()].astype(np.float32))
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def assert_rows(got: dict, want: dict, what: str) -> None:
    for k in FIELDS:
        assert got[k].shape == want[k].shape, f"{what}: {k} has {got[k].shape} rows, expected {want[k].shape}"
        bad = np.flatnonzero(~np.isclose(got[k], want[k].astype(np.float32), rtol=0, atol=1e-6).reshape(
            len(want[k]), -1).all(1))
        assert bad.size == 0, f"{what}: field {k} differs from the expected transition in rows {bad[:10].tolist()}"
    # both values occur, so a field stuck at one value cannot pass
    assert 0 < want["masks"].mean() < 1 or what.startswith("offline"), f"{what}: masks all equal"


@pytest.mark.parametrize("stage", [1, 2])
def test_rfcl_buffers_hold_the_envs_transitions_and_the_scaled_demo_transitions(stage, demo_path, tmp_path,
                                                                               monkeypatch):
    solved_frac = "2" if stage == 1 else "-1"  # never switch / switch at the first finished episode
    spy, saved, args = spied_run(rfcl, tmp_path, monkeypatch, "--total-timesteps", "120", "--reverse-solved-frac",
                                 solved_frac, "--demo-action-scale", str(SCALE))
    assert saved["loop"]["stage"] == stage and len(spy.steps) == 120 // ENVS
    demos = demo_rows(demo_path, 2, SCALE)
    assert np.abs(demos["actions"]).max() == 1.0, "the scale clips some demo actions"
    if stage == 1:
        assert_rows(buffer_rows(saved["online"]), spy.rows(), "online (stage 1)")
        assert_rows(buffer_rows(saved["offline"]), demos, "offline (the demos)")
    else:
        # the stage-1 transitions became the offline buffer at the switch; stage 2 filled a new online buffer
        k = saved["offline"]["size"] // ENVS
        assert 0 < k < len(spy.steps)
        assert_rows(buffer_rows(saved["offline"]), spy.rows(0, k), "offline (stage 1's online transitions)")
        assert_rows(buffer_rows(saved["online"]), spy.rows(k), "online (stage 2)")


def test_rlpd_buffers_hold_the_envs_transitions_and_the_demo_transitions(demo_path, tmp_path, monkeypatch):
    built = []  # rlpd rebuilds its offline buffer from the demos at every start: keep the one it built
    demo_buffer = rlpd.demo_buffer
    monkeypatch.setattr(rlpd, "demo_buffer", lambda *a: built.append(demo_buffer(*a)) or built[-1])
    spy, saved, _ = spied_run(rlpd, tmp_path, monkeypatch, "--total-timesteps", "60")
    assert len(spy.steps) == 60 // ENVS and len(built) == 1
    assert_rows(buffer_rows(saved["online"]), spy.rows(), "online")
    assert_rows({k: np.asarray(v[:built[0].size]) for k, v in built[0].data.items()}, demo_rows(demo_path, 2, 1.0),
                "offline (the demos)")
