"""--sim-backend gpu, run on CPU physics: the shipped GPUEnvs / GPURecorder code with ManiSkill's physx_cpu backend
(which takes exactly 1 env) and torch's cpu device, DLPack handoffs to JAX included. Only the physics differs
from a CUDA machine; what 1 env cannot show (masks, per-slot seeds, calls per round) is in test_sac_core.py."""

import json

import numpy as np
import pytest

import collect_demos
import common
import rfcl
import rlpd
import run_files
import vector_env


@pytest.fixture
def gpu_on_cpu_physics(monkeypatch):
    monkeypatch.setattr(vector_env, "GPU_PHYSX", "physx_cpu")
    monkeypatch.setattr(vector_env, "check_gpu_simulation", lambda: None)  # it asks for CUDA, jax on GPU and PhysX GPU


def test_gpu_envs_reset_to_demo_states_and_seeds_repeat(gpu_on_cpu_physics, demo_path):
    demos = common.load_demos(demo_path, 2)
    envs = vector_env.make_envs("PickCube-v1", 1, "gpu", "state", "pd_joint_delta_pos")
    try:
        assert isinstance(envs, vector_env.GPUEnvs)
        for i, t in ((0, 0), (1, 10), (0, len(demos.traj_obs[0]) - 2)):
            obs = envs.reset(np.ones(1, bool), np.array([demos.episodes[i]["episode_seed"]]), [rfcl.demo_state(demos, i, t)])
            np.testing.assert_array_equal(np.asarray(obs)[0], demos.traj_obs[i][t])
            k = int(np.flatnonzero(demos.traj_end)[i - 1] + 1 if i else 0) + t
            nxt, _, _ = envs.step(demos.actions[k:k + 1])
            np.testing.assert_allclose(np.asarray(nxt)[0], demos.traj_obs[i][t + 1], atol=2e-3)  # as on CPU
        envs.fix_initial_states([11, 12])
        first = {s: np.asarray(envs.reset(np.ones(1, bool), np.array([s])))[0] for s in (11, 12)}
        envs.step(np.zeros((1, envs.act_dim), np.float32))
        for s in (12, 11):
            np.testing.assert_array_equal(np.asarray(envs.reset(np.ones(1, bool), np.array([s])))[0], first[s])
        assert np.abs(first[11] - first[12]).max() > 1e-3, "two seeds, two initial states"
    finally:
        envs.close()


def test_rfcl_rlpd_evaluate_and_collect_demos_run_the_gpu_path(gpu_on_cpu_physics, demo_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--sim-backend", "gpu", "--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1",
             "--num-demos", "2", "--total-timesteps", "96", "--num-seed-steps", "24", "--eval-freq", "96",
             "--log-freq", "8", "--grad-updates-per-step", "2", "--batch-size", "16", "--hidden-dims", "32", "32",
             "--render-size", "64"]
    # rfcl through the stage switch (the first finished episode ends stage 1), with eval and video
    rfcl.main(rfcl.parse_args([*small, "--exp-name", "g", "--reverse-solved-frac", "-1", "--num-seeds", "8"]))
    run = tmp_path / "runs" / "g"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == 2 and summary["global_step"] == 96 and summary["eval_success_at_end"] is not None
    stage1 = run_files.load_checkpoint(str(run / "checkpoints" / "stage1.ckpt"))
    assert stage1["global_step"] == summary["stage1_end_step"] and json.loads(stage1["extra"])["stage"] == 1
    assert (run / "videos" / "eval_00000096.mp4").exists()
    rfcl.main(rfcl.parse_args([
        "--evaluate", "--checkpoint", str(run / "checkpoints" / "final.ckpt"), "--sim-backend", "gpu",
        "--num-eval-envs", "1", "--num-eval-episodes", "1", "--exp-name", "g_eval", "--render-size", "64"]))
    assert (tmp_path / "runs" / "g_eval" / "videos" / "eval.mp4").exists()
    rlpd.main(rlpd.parse_args([*small, "--exp-name", "r"]))
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["global_step"] == 96
    # collect_demos' batched recorder: its episodes load like any demos, and the json says what reproduces them
    collect_demos.main(collect_demos.Args(checkpoint=str(run / "checkpoints" / "final.ckpt"), sim_backend="gpu",
                                          num_envs=1, num_episodes=2, only_successful=False, save_video=False,
                                          output_dir=str(tmp_path / "demos")))
    (h5,) = (tmp_path / "demos").glob("*.physx_cuda.h5")
    assert json.loads(h5.with_suffix(".json").read_text())["reset_seeds_reproduce_episodes"] is False
    assert common.load_demos(h5, 2).num_trajectories == 2
