"""rfcl.py pieces in isolation: curricula bookkeeping, the SAC update's clever parts, buffers, checkpoints."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import rfcl


def reverse(lengths=(20, 30), step=4, window=3, solved_frac=0.9, seed=0):
    return rfcl.ReverseCurriculum(lengths, step, window, 3.0, solved_frac, np.random.default_rng(seed))


# ---- reverse curriculum ------------------------------------------------------------------------------------
def test_frontier_moves_back_only_after_a_full_window_of_frontier_successes():
    c = reverse()
    assert c.t.tolist() == [20, 30]
    c.report(0, 20, True), c.report(0, 20, True)
    assert c.t[0] == 20
    c.report(0, 22, True)  # started past the frontier: does not count
    assert c.t[0] == 20
    c.report(0, 20, False), c.report(0, 20, True), c.report(0, 20, True)
    assert c.t[0] == 20, "a failure inside the last 3 frontier episodes holds the frontier"
    c.report(0, 20, True)
    assert c.t[0] == 16 and len(c.windows[0]) == 0, "moved by reverse_step_size, window reset"
    c.report(0, 16, True), c.report(0, 16, True)
    assert c.t[0] == 16
    c.report(0, 16, True)
    assert c.t[0] == 12 and c.t[1] == 30


def test_demo_is_solved_at_zero_and_stage_ends_above_the_fraction():
    c = reverse(lengths=(5, 5), step=4, window=1, solved_frac=0.9)
    c.report(0, 5, True)
    assert c.t[0] == 1
    c.report(0, 1, True)
    assert c.t[0] == 0 and not c.solved[0]
    c.report(0, 0, True)
    assert c.solved[0] and not c.done, "1/2 solved is not > 0.9"
    c.report(1, 5, True), c.report(1, 1, True), c.report(1, 0, True)
    assert c.solved.all() and c.done
    assert c.stats()["curriculum/reverse_solved_frac"] == 1.0
    assert c.stats()["curriculum/start_step_frac_mean"] == 0.0


def test_start_sampling_offsets_weights_and_time_limit():
    c = reverse(lengths=(100, 100), seed=1)
    c.t[:] = [50, 100]
    starts = np.array([c.sample_start() for _ in range(4000)])
    w = c.sample_weights()
    assert w[1] > w[0] and np.isclose(w.sum(), 1)
    demo0 = starts[starts[:, 0] == 0]
    offsets = demo0[:, 1] - 50
    assert set(offsets) <= {0, 1, 2, 3, 4}
    np.testing.assert_allclose(np.mean(offsets == 0), 0.5, atol=0.05)
    np.testing.assert_allclose(np.mean(offsets == 1), 0.25, atol=0.05)
    assert (starts[starts[:, 0] == 1][:, 1] == 100).all(), "clipped to the demo length"
    assert (demo0[:, 2] == 16 + (100 - demo0[:, 1]) // 3).all()
    c.solved[0] = True
    assert c.sample_weights()[0] < 1e-2


# ---- forward curriculum ---------------------------------------------------------------------------------------
def test_seed_scores_on_hand_built_histories():
    score = rfcl.ForwardCurriculum.score
    assert score([]) == 2, "untried counts as unsolved"
    assert score([False] * 5) == 2
    assert score([True, False, False, False, False]) == 3
    assert score([True, True, True, False]) == 1  # 75% is not under 75%
    assert score([True, True, False, False]) == 3
    assert score([True] * 5) == 1


def test_rank_weights_share_the_smallest_rank_on_ties():
    w = rfcl.ForwardCurriculum.rank_weights(np.array([3.0, 2.0, 2.0, 1.0]), temperature=0.1)
    ranks = np.array([1, 2, 2, 4])
    expected = 1 / ranks ** 10.0
    np.testing.assert_allclose(w, expected / expected.sum())


def test_sampling_mixes_scores_and_staleness_and_updates_scores():
    c = rfcl.ForwardCurriculum(np.arange(4) + 100, 0.1, 0.1, 5, np.random.default_rng(0))
    p = c.probs()
    np.testing.assert_allclose(p, 0.25), "all untried: uniform"
    c.report(0, True), c.report(0, False)  # seed 0 on the edge: score 3
    c.report(1, True)                      # seed 1 solved: score 1
    assert c.scores.tolist() == [3, 1, 2, 2]
    k = c.sample()
    assert c.last_sampled[k] == 1 and c.num_sampled == 1
    p = c.probs()
    score_w = c.rank_weights(c.scores, 0.1)
    stale_w = c.rank_weights((c.num_sampled - c.last_sampled).astype(float), 0.1)
    np.testing.assert_allclose(p, 0.9 * score_w + 0.1 * stale_w)
    assert p.argmax() == 0 and np.isclose(p.sum(), 1)
    assert c.stats()["curriculum/seeds_on_edge_frac"] == 0.25


# ---- SAC update -------------------------------------------------------------------------------------------------
def test_target_is_min_over_exactly_num_min_qs_random_members():
    num_qs = 10
    q = jnp.broadcast_to(jnp.arange(num_qs, dtype=jnp.float32)[:, None], (num_qs, 3))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    f = jax.jit(jax.vmap(lambda k: rfcl.random_subset_min(q, k, 2)[0]))
    mins = np.asarray(f(keys)).astype(int)
    # min of 2 distinct members of 0..9: P(min = k) = (9 - k) / 45, never 9
    assert mins.max() <= 8
    expected = (9 - np.arange(9)) / 45
    np.testing.assert_allclose(np.bincount(mins, minlength=9)[:9] / len(mins), expected, atol=0.03)
    assert (np.asarray(jax.vmap(lambda k: rfcl.random_subset_min(q, k, num_qs)[0])(keys[:50])) == 0).all()
    one = np.asarray(jax.vmap(lambda k: rfcl.random_subset_min(q, k, 1)[0])(keys[:500]))
    assert len(set(one.tolist())) == num_qs, "a single member is drawn anew each call"


def test_masks_follow_the_bootstrap_convention():
    term = np.array([0, 1, 0, 1], bool)
    assert rfcl.bootstrap_masks(term, "always").tolist() == [1, 1, 1, 1]
    assert rfcl.bootstrap_masks(term, "truncated").tolist() == [1, 0, 1, 0]


def small_setup(num_qs=3, num_min_qs=2, actor_update_freq=2):
    args = rfcl.Args(hidden_dims=(32, 32), num_qs=num_qs, num_min_qs=num_min_qs, batch_size=16,
                     actor_update_freq=actor_update_freq)
    obs_dim, act_dim = 5, 2
    actor, critic, state = rfcl.init_sac(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def rows(n, tag):
        return {"obs": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, act_dim)),
                "rewards": np.full(n, tag, np.float32), "next_obs": rng.normal(size=(n, obs_dim)),
                "masks": np.ones(n, np.float32)}

    online, offline = rfcl.ReplayBuffer(64, obs_dim, act_dim), rfcl.ReplayBuffer(40, obs_dim, act_dim)
    online.add(rows(50, 1.0))
    offline.add(rows(40, 0.0))
    return args, actor, critic, state, online, offline, act_dim


def test_every_minibatch_is_exactly_half_online_half_offline():
    args, actor, critic, state, online, offline, act_dim = small_setup()
    sample_batch, _, _ = rfcl.make_update(args, actor, critic, act_dim)
    for k in jax.random.split(jax.random.PRNGKey(1), 20):
        b = sample_batch(online.data, online.size, offline.data, offline.size, k)
        assert b["rewards"].shape == (16,)
        assert (b["rewards"][:8] == 1).all() and (b["rewards"][8:] == 0).all()


def test_scanned_updates_equal_the_same_updates_one_by_one():
    args, actor, critic, state, online, offline, act_dim = small_setup()
    _, update_one, update_many = rfcl.make_update(args, actor, critic, act_dim)
    n, key = 6, jax.random.PRNGKey(3)
    keys = jax.random.split(key, n)
    one = jax.jit(update_one)
    s_loop = state
    for i in range(n):
        s_loop, _ = one(s_loop, i, online.data, online.size, offline.data, offline.size, keys[i])
    s_loop = jax.device_get(s_loop)
    s_scan, info = update_many(state, online.data, online.size, offline.data, offline.size, key, n)
    for a, b in zip(jax.tree_util.tree_leaves(s_loop), jax.tree_util.tree_leaves(jax.device_get(s_scan))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert int(s_scan.critic.step) == n and int(s_scan.actor.step) == n // args.actor_update_freq
    assert np.isfinite(float(info["losses/qf_loss"]))


def test_critic_ensemble_has_num_qs_independent_members():
    args, actor, critic, state, *_ = small_setup(num_qs=4)
    kernel = state.critic.params["Dense_0"]["kernel"]
    assert kernel.shape[0] == 4 and not np.allclose(kernel[0], kernel[1])
    assert "LayerNorm_0" in state.critic.params and "LayerNorm_0" not in state.actor.params
    q = critic.apply({"params": state.critic.params}, jnp.zeros((7, 5)), jnp.zeros((7, 2)))
    assert q.shape == (4, 7)


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    args, actor, critic, state, *_ = small_setup()
    obs = jnp.ones((4096, 5))
    a, logp = rfcl.sample_action(actor, state.actor.params, obs, jax.random.PRNGKey(0))
    mean, log_std = actor.apply({"params": state.actor.params}, obs[:1])
    u = jnp.arctanh(jnp.clip(a[:1], -1 + 1e-6, 1 - 1e-6))
    naive = (jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std)) - jnp.log(1 - a[:1] ** 2)).sum(-1)
    np.testing.assert_allclose(logp[:1], naive, rtol=1e-3, atol=1e-3)
    assert (jnp.abs(a) <= 1).all()


# ---- buffers and checkpoints ----------------------------------------------------------------------------------
def test_ring_buffer_returns_what_was_stored_and_wraps():
    buf = rfcl.ReplayBuffer(5, 2, 1)
    rows = lambda start, n: {"obs": np.arange(start, start + n)[:, None] * np.ones((1, 2)),  # noqa: E731
                             "actions": np.zeros((n, 1)), "rewards": np.arange(start, start + n, dtype=np.float32),
                             "next_obs": np.zeros((n, 2)), "masks": np.ones(n)}
    buf.add(rows(0, 3))
    assert buf.size == 3 and buf.ptr == 3
    np.testing.assert_array_equal(np.asarray(buf.data["rewards"][:3]), [0, 1, 2])
    buf.add(rows(3, 4))
    assert buf.size == 5 and buf.ptr == 2
    np.testing.assert_array_equal(np.asarray(buf.data["rewards"]), [5, 6, 2, 3, 4])
    np.testing.assert_array_equal(np.asarray(buf.data["obs"][:, 0]), [5, 6, 2, 3, 4])


def test_checkpoint_round_trip_and_wrong_algorithm(tmp_path):
    args, actor, critic, state, *_ = small_setup()
    path = tmp_path / "c.ckpt"
    rfcl.save_checkpoint(path, state, args, 5, 2, 123, {"stage": 2})
    ckpt = rfcl.load_checkpoint(str(path), args)
    assert ckpt["algorithm"] == "rfcl" and ckpt["global_step"] == 123 and ckpt["obs_dim"] == 5
    np.testing.assert_array_equal(ckpt["actor_params"]["Dense_0"]["kernel"], state.actor.params["Dense_0"]["kernel"])
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"
    from flax import serialization
    other = dict(ckpt, algorithm="rlpd")
    (tmp_path / "o.ckpt").write_bytes(serialization.msgpack_serialize(other))
    with pytest.raises(SystemExit, match="is a rlpd checkpoint, not rfcl"):
        rfcl.load_checkpoint(str(tmp_path / "o.ckpt"))
    (tmp_path / "bad.ckpt").write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit, match="not a readable rfcl/rlpd checkpoint"):
        rfcl.load_checkpoint(str(tmp_path / "bad.ckpt"))
    with pytest.raises(SystemExit, match="was trained with --env-id PickCube-v1, not StackCube-v1"):
        rfcl.load_checkpoint(str(path), rfcl.Args(env_id="StackCube-v1"))


def test_presets_set_defaults_and_flags_override_them():
    a = rfcl.parse_args(["--preset", "sample-efficient", "--num-qs", "5"])
    assert a.num_envs == 1 and a.steps_per_env == 1 and a.num_min_qs == 2 and a.num_qs == 5
    b = rfcl.parse_args([])
    assert (b.num_envs, b.steps_per_env, b.grad_updates_per_step, b.num_qs, b.num_seed_steps) == (8, 4, 16, 2, 5000)
    assert b.gamma == 0.9 and b.control_mode == "pd_joint_delta_pos" and b.bootstrap_at_done == "always"
