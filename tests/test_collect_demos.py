"""collect_demos.py round trip on real ManiSkill: checkpoint -> trajectories -> common.py / ManiSkill replay."""

import json
import re
import signal
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

import common
import rfcl
import run_files
from conftest import ROOT, error_line, interrupted, run_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of freshly initialised networks, written by rfcl.py's real save function."""
    d = tmp_path_factory.mktemp("ckpt") / "runs" / "fresh" / "checkpoints"
    args = rfcl.Args(max_episode_steps=12)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    path = d / "fresh.ckpt"
    run_files.save_checkpoint(path, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    return path


@pytest.fixture(scope="module")
def collected(checkpoint, asset_dir):
    proc = run_script([str(ROOT / "collect_demos.py"), str(checkpoint), "--num-envs", "2", "--num-episodes", "3",
                       "--no-only-successful", "--save-video", "--num-videos", "1"], checkpoint.parent)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, proc


def test_written_where_documented_and_loadable_by_common(collected, checkpoint):
    report, _ = collected
    assert report["episodes_written"] == 3 and report["attempts"] == 4
    path = checkpoint.parent.parent / "demos" / report["path"].split("/")[-1]
    assert path.exists() and path.with_suffix(".json").exists()
    assert len(list(path.parent.glob("*.mp4"))) == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")], "temporary files cleaned up"
    d = common.load_demos(path, 3, "PickCube-v1", "state", "pd_joint_delta_pos", 42, 8)
    assert d.lengths.tolist() == [12, 12, 12]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["source_type"] == "rl" and "rfcl policy" in meta["source_desc"]
    assert sorted(e["episode_seed"] for e in meta["episodes"]) == [2_000_000, 2_000_001, 2_000_002]


def test_maniskill_replays_them_with_the_same_success_flags(collected, tmp_path):
    report, _ = collected
    src = tmp_path / "demo.h5"
    src.write_bytes(open(report["path"], "rb").read())
    src.with_suffix(".json").write_text(open(report["path"].replace(".h5", ".json")).read())
    subprocess.run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory", "--traj-path", str(src),
                    "--use-env-states", "--save-traj", "--allow-failure", "--num-envs", "1"],
                   check=True, capture_output=True, cwd=tmp_path)
    (replayed,) = [p for p in tmp_path.glob("demo.*.h5")]
    with h5py.File(src) as a, h5py.File(replayed) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(a[k]["success"][()], b[k]["success"][()])
            np.testing.assert_allclose(a[k]["actions"][()], b[k]["actions"][()])


def test_a_stored_env_state_reproduces_the_stored_observation(collected):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    report, _ = collected
    d = common.load_demos(report["path"], 3)
    env = gym.make("PickCube-v1", obs_mode="state", control_mode="pd_joint_delta_pos", sim_backend="physx_cpu")
    try:
        for i, ep in enumerate(d.episodes):
            env.reset(seed=ep["episode_seed"])
            for t in (0, 5, 12):
                env.unwrapped.set_state_dict({k: _at(v, t) for k, v in d.env_states[i].items()})
                diff = np.abs(env.unwrapped.get_obs().cpu().numpy()[0] - d.traj_obs[i][t])
                diff[18] = 0  # is_grasped: contact-based, refreshed by the next physics step
                assert diff.max() < 1e-4, (i, t)
    finally:
        env.close()


def _at(tree, t):
    return {k: _at(v, t) for k, v in tree.items()} if isinstance(tree, dict) else tree[t]


def test_bad_checkpoints_and_a_too_weak_policy_give_one_line_errors(checkpoint, tmp_path):
    from flax import serialization

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    ckpt = serialization.msgpack_restore(checkpoint.read_bytes())
    other = tmp_path / "other.ckpt"
    other.write_bytes(serialization.msgpack_serialize(dict(ckpt, algorithm="ppo", script="/elsewhere/ppo.py")))
    cases = [([str(tmp_path / "missing.ckpt")], "error: checkpoint"),
             ([str(bad)], f"error: {bad} is not a readable checkpoint of these scripts"),
             ([str(other)], f"error: {other} was written by /elsewhere/ppo.py, which is not here (nor {ROOT / 'ppo.py'}); "
                            f"pass --script PATH to that script or a copy of it")]
    import collect_demos

    for extra, start in cases:  # in this process: these fail before any simulator starts
        with pytest.raises(SystemExit) as e:
            collect_demos.main(collect_demos.Args(checkpoint=extra[0]))
        assert str(e.value.code).startswith(start), e.value.code
    # an untrained policy never succeeds: bounded by --max-attempts, with a clear message
    proc = run_script([str(ROOT / "collect_demos.py"), str(checkpoint), "--num-envs", "2", "--num-episodes", "2",
                       "--max-attempts", "2", "--max-episode-steps", "5", "--output-dir", str(tmp_path / "out")],
                      tmp_path, check=False)
    assert proc.returncode != 0
    assert error_line(proc).startswith("error: the policy succeeded in 0 of 2 episodes (0.0%); wrote 0 of 2 demos")


def test_ctrl_c_keeps_the_demos_collected_so_far_and_ends_at_once_while_it_starts(checkpoint, asset_dir, tmp_path):
    """Ctrl-C (to the process group, as a terminal sends it) while collecting: the round under way ends, the episodes
    kept so far are written as a complete, loadable file, and one line says where. While it starts (1 s in, in its
    imports): one line, nothing written."""
    args = [str(ROOT / "collect_demos.py"), str(checkpoint), "--num-envs", "2", "--num-episodes", "200",
            "--no-only-successful", "--output-dir", str(tmp_path / "out")]
    code, lines = interrupted(args, tmp_path, signal.SIGINT, once="| 4/200")
    assert code == 130 and not [line for line in lines if "Traceback" in line or "Error" in line], lines
    kept, path = re.fullmatch(r"stopped by SIGINT after (\d+) of 200 demos; they are in (.+\.h5)", lines[-1]).groups()
    assert 4 <= int(kept) < 200
    demos = common.load_demos(path, int(kept), "PickCube-v1", "state", "pd_joint_delta_pos", 42, 8)
    assert demos.lengths.tolist() == [12] * int(kept)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([path.split("/")[-1],
                                                                         path.split("/")[-1][:-3] + ".json"])

    code, lines = interrupted(args[:-1] + [str(tmp_path / "early")], tmp_path, signal.SIGINT, after=1.0, within=10)
    assert (code, lines) == (130, ["stopped by SIGINT"])
    assert not (tmp_path / "early").exists()
