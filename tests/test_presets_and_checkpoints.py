"""Every value of every preset; the curricula's numbers written out by hand; checkpoints field by field, and
--evaluate acting with the saved weights."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import common
import rfcl
import rlpd
import run_files
import vector_env

SHARED = {"exp_name": None, "seed": 1, "track": False, "env_id": "PickCube-v1", "obs_mode": "state",
          "control_mode": "pd_joint_delta_pos", "sim_backend": "cpu", "num_envs": 8, "num_eval_envs": 8,
          "max_episode_steps": 50, "render_size": 256, "dataset_path": None, "total_timesteps": 1_000_000,
          "target_success": None, "target_evals": 3,
          "num_seed_steps": 5000, "steps_per_env": 4, "grad_updates_per_step": 16, "buffer_size": 1_000_000,
          "eval_freq": 10_000, "num_eval_episodes": 50, "save_freq": 100_000, "log_freq": 1000, "capture_video": True,
          "checkpoint": None, "resume": None, "fork": None, "sim_config": None, "evaluate": False, "gamma": 0.9,
          "tau": 0.005, "batch_size": 256,
          "learning_rate": 3e-4, "hidden_dims": (256, 256, 256), "num_qs": 2, "num_min_qs": 2, "actor_update_freq": 1,
          "init_temperature": 0.01, "target_entropy_scale": 0.5, "backup_entropy": False, "bootstrap_at_done": "always"}
RFCL = {**SHARED, "preset": "fast", "wandb_project_name": "rfcl-jax", "num_demos": 5, "demo_action_scale": 1.0,
        "reverse_step_size": 4,
        "per_demo_buffer_size": 3, "demo_horizon_to_max_steps_ratio": 3.0, "reverse_solved_frac": 0.9,
        "curriculum_success": "once", "curriculum_policy": "stochastic", "num_seeds": 1000, "plr_temperature": 0.1,
        "plr_staleness_coef": 0.1, "plr_history": 5}
RLPD = {**SHARED, "preset": "walltime", "wandb_project_name": "rlpd-jax", "num_demos": 100}
EXPECTED = {
    (rfcl, "fast"): RFCL,  # ManiSkill3's published CPU config
    # base_sac_ms3_sample_efficient.yml: 8 envs x 1 step, UTD 10, actor every 20th update, 10 critics (min over 2)
    (rfcl, "sample-efficient"): {**RFCL, "preset": "sample-efficient", "steps_per_env": 1, "grad_updates_per_step": 80,
                                 "actor_update_freq": 20, "num_qs": 10, "eval_freq": 5000},
    (rlpd, "walltime"): RLPD,
    (rlpd, "sample-efficient"): {**RLPD, "preset": "sample-efficient", "num_envs": 1, "steps_per_env": 1,
                                 "num_qs": 10, "eval_freq": 5000},
}


@pytest.mark.parametrize("algo,preset", list(EXPECTED), ids=lambda x: getattr(x, "__name__", x))
def test_every_value_of_every_preset(algo, preset):
    args = algo.parse_args(["--preset", preset])
    assert dataclasses.asdict(args) == EXPECTED[algo, preset]
    over = algo.parse_args(["--num-qs", "5", "--preset", preset, "--gamma", "0.99"])
    assert dataclasses.asdict(over) == {**EXPECTED[algo, preset], "num_qs": 5, "gamma": 0.99}, "flags beat presets"


@pytest.mark.parametrize("algo", [rfcl, rlpd], ids=lambda m: m.__name__)
def test_per_task_defaults_horizon_from_the_registry_and_flags_win(algo, capsys):
    parse = lambda *argv: algo.parse_args(list(argv))  # noqa: E731
    plug = parse("--env-id", "PlugCharger-v1")
    assert (plug.max_episode_steps, plug.gamma, plug.batch_size, plug.buffer_size) == (200, 0.95, 512, 2_000_000)
    if algo is rfcl:
        assert (plug.demo_horizon_to_max_steps_ratio, plug.reverse_step_size, plug.demo_action_scale) == (1.25, 2, 1.25)
    out = capsys.readouterr().out
    assert "per-task defaults: --max-episode-steps 200, --gamma 0.95, --batch-size 512" in out
    # every flag on the command line wins over the task's value, in either spelling; the others still apply
    over = parse("--gamma", "0.8", "--env-id=PlugCharger-v1", "--max_episode_steps", "30", "--preset", "sample-efficient")
    assert (over.gamma, over.max_episode_steps, over.batch_size, over.num_qs) == (0.8, 30, 512, 10)
    assert "--gamma" not in capsys.readouterr().out.split("per-task defaults:")[1]
    assert parse("--env-id", "PullCubeTool-v1").max_episode_steps == 100       # registered, no table entry
    assert parse("--env-id", "PegInsertionSide-v1", "--preset", "sample-efficient").gamma == 0.99
    push = parse("--env-id", "PushCube-v1")                                     # unlisted: the class defaults
    assert dataclasses.asdict(push) == {**dataclasses.asdict(parse()), "env_id": "PushCube-v1"}


def test_per_task_values_are_recorded_in_args_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = rfcl.parse_args(["--env-id", "PegInsertionSide-v1", "--exp-name", "t"])
    run_files.make_run_dir(run_files.new_run_dir(args.exp_name), dataclasses.asdict(args))
    saved = json.loads((tmp_path / "runs" / "t" / "args.json").read_text())
    assert (saved["gamma"], saved["max_episode_steps"]) == (0.99, 100)


# ---- curricula, by hand ----------------------------------------------------------------------------------------
def test_forward_curriculum_probabilities_written_out_by_hand():
    c = rfcl.ForwardCurriculum(np.arange(4) + 100, temperature=1.0, staleness_coef=0.1, history=5,
                               rng=np.random.default_rng(0))
    c.scores[:] = [3, 1, 2, 2]              # rank 1, 4, 2, 2 -> weights 1, 1/4, 1/2, 1/2 (sum 2.25)
    c.num_sampled, c.last_sampled[:] = 10, [10, 4, 7, 0]  # staleness 0, 6, 3, 10 -> ranks 4, 2, 3, 1
    score_w = np.array([1, 1 / 4, 1 / 2, 1 / 2]) / 2.25
    stale_w = np.array([1 / 4, 1 / 2, 1 / 3, 1]) / (1 / 4 + 1 / 2 + 1 / 3 + 1)
    np.testing.assert_allclose(c.probs(), [0.412, 0.124, 0.216, 0.248], atol=1e-12)
    np.testing.assert_allclose(c.probs(), 0.9 * score_w + 0.1 * stale_w)
    # the default temperature 0.1: weight 1 / rank^10
    c.temperature = 0.1
    p = c.probs()
    np.testing.assert_allclose(p[0], 0.9 / (1 + 2 / 2**10 + 1 / 4**10) + 0.1 * (1 / 4**10) /
                               (1 + 1 / 2**10 + 1 / 3**10 + 1 / 4**10))


def test_forward_curriculum_samples_at_its_probabilities_and_tracks_staleness():
    c = rfcl.ForwardCurriculum(np.arange(4) + 100, temperature=1.0, staleness_coef=0.0, history=5,
                               rng=np.random.default_rng(1))
    c.scores[:] = [3, 1, 2, 2]
    draws = np.array([c.sample() for _ in range(20_000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [4 / 9, 1 / 9, 2 / 9, 2 / 9], atol=0.015)
    assert c.num_sampled == 20_000 and c.last_sampled[draws[-1]] == 20_000


@pytest.mark.parametrize("n,solved_frac", [(10, 0.9), (4, 0.5), (5, 0.8)])
def test_stage_one_ends_only_above_the_solved_fraction(n, solved_frac):
    c = rfcl.ReverseCurriculum([10] * n, 4, 3, 3.0, solved_frac, np.random.default_rng(0))
    at_boundary = round(n * solved_frac)
    c.solved[:at_boundary] = True
    assert c.solved.mean() == pytest.approx(solved_frac) and not c.done, "exactly the fraction is not more"
    c.solved[at_boundary] = True
    assert c.done


# ---- checkpoints --------------------------------------------------------------------------------------------------
def trained_like_state(algo, args, seed):
    """A learner state whose weights differ from a fresh init (as after training)."""
    _, _, state = algo.init_sac(args, 42, 8, jax.random.PRNGKey(seed))
    return state.replace(temp=state.temp.replace(params={"log_alpha": np.float32(-3.3)}))


@pytest.mark.parametrize("algo", [rfcl, rlpd], ids=["rfcl", "rlpd"])
def test_every_checkpoint_field_round_trips(algo, tmp_path):
    args = algo.Args(hidden_dims=(16, 16), num_qs=3)
    state = trained_like_state(algo, args, 5)
    path = tmp_path / "c.ckpt"
    run_files.save_checkpoint(path, algo.checkpoint_meta(args, 42, 8), algo.networks(state), 1234,
                                {"stage": 2, "t": [1, 2]})
    ckpt = run_files.load_checkpoint(str(path))
    assert ckpt["script"] == str(Path(algo.__file__).resolve())
    assert {k: ckpt[k] for k in ("algorithm", "env_id", "obs_mode", "control_mode", "obs_dim", "act_dim",
                                 "hidden_dims", "num_qs", "global_step")} == {
        "algorithm": algo.ALGORITHM, "env_id": "PickCube-v1", "obs_mode": "state",
        "control_mode": "pd_joint_delta_pos", "obs_dim": 42, "act_dim": 8, "hidden_dims": [16, 16], "num_qs": 3,
        "global_step": 1234}
    assert json.loads(ckpt["args"]) == json.loads(json.dumps(dataclasses.asdict(args)))
    assert json.loads(ckpt["extra"]) == {"stage": 2, "t": [1, 2]}
    _, _, fresh = algo.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    restored = algo.with_networks(fresh, ckpt["networks"])
    assert set(ckpt["networks"]) == set(algo.networks(state))
    for name in algo.networks(state):
        saved, back = algo.networks(state)[name], algo.networks(restored)[name]
        leaves = list(zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(back)))
        assert leaves and all(np.array_equal(a, b) for a, b in leaves), name
    assert not np.array_equal(fresh.actor.params["Dense_0"]["kernel"], state.actor.params["Dense_0"]["kernel"])


def test_evaluate_acts_with_the_saved_weights_not_a_fresh_init(tmp_path, monkeypatch):
    args = rfcl.Args(hidden_dims=(16, 16))
    state = trained_like_state(rfcl, args, 5)
    path = tmp_path / "c.ckpt"
    run_files.save_checkpoint(path, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 10)
    used = {}
    monkeypatch.setattr(vector_env, "make_envs", lambda *a: SimpleNamespace(obs_dim=42, act_dim=8, close=lambda: None))
    monkeypatch.setattr(common, "evaluate", lambda envs, act, *a: used.update(act=act) or {"eval/episodes": 0})
    monkeypatch.chdir(tmp_path)
    rfcl.main(rfcl.parse_args(["--evaluate", "--checkpoint", str(path)]))
    obs = np.random.default_rng(0).normal(size=(4, 42)).astype(np.float32)
    actor = rfcl.Actor(8, (16, 16))
    np.testing.assert_allclose(used["act"](obs), rfcl.deterministic_action(actor, state.actor.params, obs), rtol=1e-6)
    _, _, fresh = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(args.seed))
    assert not np.allclose(used["act"](obs), rfcl.deterministic_action(actor, fresh.actor.params, obs))
