"""The SAC core that rfcl.py and rlpd.py each write out (on purpose, CleanRL style): tested on both."""


import numpy as np
import pytest

import jax
import jax.numpy as jnp

import rfcl
import rlpd
import run_files
from conftest import fake_gpu_envs

both = pytest.mark.parametrize("algo", [rfcl, rlpd], ids=["rfcl", "rlpd"])


# ---- SAC update -------------------------------------------------------------------------------------------------
@both
def test_target_is_min_over_exactly_num_min_qs_random_members(algo):
    num_qs = 10
    q = jnp.broadcast_to(jnp.arange(num_qs, dtype=jnp.float32)[:, None], (num_qs, 3))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    f = jax.jit(jax.vmap(lambda k: algo.random_subset_min(q, k, 2)[0]))
    mins = np.asarray(f(keys)).astype(int)
    # min of 2 distinct members of 0..9: P(min = k) = (9 - k) / 45, never 9
    assert mins.max() <= 8
    expected = (9 - np.arange(9)) / 45
    np.testing.assert_allclose(np.bincount(mins, minlength=9)[:9] / len(mins), expected, atol=0.03)
    assert (np.asarray(jax.vmap(lambda k: algo.random_subset_min(q, k, num_qs)[0])(keys[:50])) == 0).all()
    one = np.asarray(jax.vmap(lambda k: algo.random_subset_min(q, k, 1)[0])(keys[:500]))
    assert len(set(one.tolist())) == num_qs, "a single member is drawn anew each call"


@both
def test_masks_follow_the_bootstrap_convention(algo):
    term = np.array([0, 1, 0, 1], bool)
    assert algo.bootstrap_masks(term, "always").tolist() == [1, 1, 1, 1]
    assert algo.bootstrap_masks(term, "truncated").tolist() == [1, 0, 1, 0]


def small_setup(algo, num_qs=3, num_min_qs=2, actor_update_freq=2):
    args = algo.Args(hidden_dims=(32, 32), num_qs=num_qs, num_min_qs=num_min_qs, batch_size=16,
                     actor_update_freq=actor_update_freq)
    obs_dim, act_dim = 5, 2
    actor, critic, state = algo.init_sac(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def rows(n, tag):
        return {"obs": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, act_dim)),
                "rewards": np.full(n, tag, np.float32), "next_obs": rng.normal(size=(n, obs_dim)),
                "masks": np.ones(n, np.float32)}

    online, offline = algo.ReplayBuffer(64, obs_dim, act_dim), algo.ReplayBuffer(40, obs_dim, act_dim)
    online.add(rows(50, 1.0))
    offline.add(rows(40, 0.0))
    return args, actor, critic, state, online, offline, act_dim


@both
def test_every_minibatch_is_exactly_half_online_half_offline(algo):
    """Each half is drawn from the filled rows of its own buffer: buffers only partly filled, rows tagged by their
    reward (online 1, offline 2, unfilled 0)."""
    args, actor, critic, state, _, _, act_dim = small_setup(algo)
    sample_batch, _, _ = algo.make_update(args, actor, critic, act_dim)
    online, offline = algo.ReplayBuffer(64, 5, act_dim), algo.ReplayBuffer(64, 5, act_dim)
    for buf, n, tag in ((online, 50, 1.0), (offline, 6, 2.0)):
        buf.add({"obs": np.zeros((n, 5)), "actions": np.zeros((n, act_dim)), "rewards": np.full(n, tag),
                 "next_obs": np.zeros((n, 5)), "masks": np.ones(n)})
    for k in jax.random.split(jax.random.PRNGKey(1), 20):
        b = sample_batch(online.data, online.size, offline.data, offline.size, k)
        assert b["rewards"].shape == (16,)
        assert (b["rewards"][:8] == 1).all() and (b["rewards"][8:] == 2).all()


@both
def test_scanned_updates_equal_the_same_updates_one_by_one(algo):
    args, actor, critic, state, online, offline, act_dim = small_setup(algo)
    _, update_one, update_many = algo.make_update(args, actor, critic, act_dim)
    n, key = 6, jax.random.PRNGKey(3)
    keys = jax.random.split(key, n)
    one = jax.jit(update_one)
    s_loop = state
    for i in range(n):
        s_loop, _ = one(s_loop, online.data, online.size, offline.data, offline.size, keys[i])
    s_loop = jax.device_get(s_loop)
    s_scan, info = update_many(state, online.data, online.size, offline.data, offline.size, key, n)
    for a, b in zip(jax.tree_util.tree_leaves(s_loop), jax.tree_util.tree_leaves(jax.device_get(s_scan))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert int(s_scan.critic.step) == n and int(s_scan.actor.step) == n // args.actor_update_freq
    assert np.isfinite(float(info["losses/qf_loss"]))


@both
@pytest.mark.parametrize("freq,per_call,calls", [(1, 4, 3), (2, 3, 4), (20, 16, 5), (20, 80, 2), (7, 4, 5)])
def test_actor_and_temperature_step_every_freq_th_update_across_calls(algo, freq, per_call, calls):
    """The cadence counts updates over the whole run, not inside one call: with --actor-update-freq 20 and
    16 updates per call the actor still steps 4 times in 80 updates (a per-call count would give 0)."""
    args, actor, critic, state, online, offline, act_dim = small_setup(algo, actor_update_freq=freq)
    _, _, update_many = algo.make_update(args, actor, critic, act_dim)
    reported = 0
    for k in jax.random.split(jax.random.PRNGKey(5), calls):
        before = jax.device_get(state.actor.params)
        state, info = update_many(state, online.data, online.size, offline.data, offline.size, k, per_call)
        reported += int(info["actor_steps"])
        moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                               jax.tree_util.tree_leaves(state.actor.params)))
        assert moved == (int(info["actor_steps"]) > 0), "the actor's weights change exactly in calls with actor steps"
    total = per_call * calls
    assert int(state.critic.step) == total
    assert int(state.actor.step) == int(state.temp.step) == reported == total // freq


@both
def test_critic_ensemble_has_num_qs_independent_members(algo):
    args, actor, critic, state, *_ = small_setup(algo, num_qs=4)
    kernel = state.critic.params["Dense_0"]["kernel"]
    assert kernel.shape[0] == 4 and not np.allclose(kernel[0], kernel[1])
    assert "LayerNorm_0" in state.critic.params and "LayerNorm_0" not in state.actor.params
    q = critic.apply({"params": state.critic.params}, jnp.zeros((7, 5)), jnp.zeros((7, 2)))
    assert q.shape == (4, 7)


@both
def test_tanh_gaussian_log_prob_matches_change_of_variables(algo):
    args, actor, critic, state, *_ = small_setup(algo)
    obs = jnp.ones((4096, 5))
    a, logp = algo.sample_action(actor, state.actor.params, obs, jax.random.PRNGKey(0))
    mean, log_std = actor.apply({"params": state.actor.params}, obs[:1])
    u = jnp.arctanh(jnp.clip(a[:1], -1 + 1e-6, 1 - 1e-6))
    naive = (jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std)) - jnp.log(1 - a[:1] ** 2)).sum(-1)
    np.testing.assert_allclose(logp[:1], naive, rtol=1e-3, atol=1e-3)
    assert (jnp.abs(a) <= 1).all()


# ---- buffers and checkpoints ----------------------------------------------------------------------------------
@both
def test_ring_buffer_returns_what_was_stored_and_wraps(algo):
    buf = algo.ReplayBuffer(5, 2, 1)
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


@both
def test_checkpoint_round_trip_and_what_a_run_started_from_it_refuses(algo, tmp_path, monkeypatch):
    args, actor, critic, state, *_ = small_setup(algo)
    path = tmp_path / "c.ckpt"
    run_files.save_checkpoint(path, algo.checkpoint_meta(args, 5, 2), algo.networks(state), 123, {"stage": 2})
    ckpt = run_files.load_checkpoint(str(path))
    assert ckpt["algorithm"] == algo.ALGORITHM and ckpt["global_step"] == 123 and ckpt["obs_dim"] == 5
    np.testing.assert_array_equal(ckpt["networks"]["actor_params"]["Dense_0"]["kernel"], state.actor.params["Dense_0"]["kernel"])
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"
    monkeypatch.chdir(tmp_path)

    def error(*flags) -> str:
        """python algo.py --checkpoint ... flags: the one line it stops with, before it builds or writes anything."""
        with pytest.raises(SystemExit) as e:
            algo.main(algo.parse_args(["--exp-name", "x", "--num-qs", "3", "--hidden-dims", "32", "32", *flags]))
        assert not (tmp_path / "runs").exists()
        return str(e.value.code)

    # networks this script does not build with the run's flags: one line naming the first difference and the writer
    name = f"{algo.__name__}.py"
    assert error("--checkpoint", str(path), "--hidden-dims", "7", "7") == (
        f"error: {path} holds networks that {name} does not build with these flags (['actor_params']['Dense_0']['bias']: "
        f"(32,) in the checkpoint, (7,) here); it was written by {name} with --hidden-dims 32 32 --num-qs 3: pass the "
        f"same flags, or start from it with {name}")
    assert "(['critic_params']" in error("--checkpoint", str(path), "--num-qs", "4")
    (tmp_path / "bad.ckpt").write_bytes(b"\x00garbage")
    assert error("--checkpoint", str(tmp_path / "bad.ckpt")) == (
        f"error: {tmp_path / 'bad.ckpt'} is not a readable checkpoint of these scripts (corrupted or another format)")
    assert error("--checkpoint", str(path), "--env-id", "StackCube-v1") == (
        f"error: {path} was trained with --env-id PickCube-v1, not StackCube-v1; pass the same")


# ---- GPU env resets (logic only: a stand-in replaces the CUDA env) ----------------------------------------------
@pytest.mark.parametrize("n", [16, 256, 1024])
def test_gpu_resets_take_one_call_per_round_and_a_seed_keeps_its_initial_state(n):
    """ManiSkill draws all envs of one reset call from the first env's seed. GPUEnvs.prepare fixes each pool seed's
    initial state (n seeds per call) and every later round restores the states of all finished envs in one call,
    so seed s gives the same initial state whichever envs reset with it; seeds without a fixed state (RLPD's)
    reset in one seeded call; envs outside the mask keep their observation."""
    g, fake = fake_gpu_envs(n)
    pool = 10_000 + np.arange(2 * n + 3)
    g.fix_initial_states(pool)
    assert [c[0] for c in fake.calls] == ["seeded"] * 3, "n seeds per call"
    fixed = {int(s): g.table[int(s)][1].clone() for s in pool}
    assert len({float(v[0]) for v in fixed.values()}) == len(pool), "every seed its own state"
    rng = np.random.default_rng(0)
    before = np.asarray(fake.obs).copy()  # what the envs show before their first reset
    for _ in range(3):  # rounds of partial resets with random seeds from the pool
        fake.calls.clear()
        mask = rng.random(n) < 0.5
        seeds = rng.choice(pool, n)
        obs = np.asarray(g.reset(mask, seeds))
        assert fake.calls == [("states", np.flatnonzero(mask).tolist())], "one call per round"
        for j in range(n):
            np.testing.assert_array_equal(obs[j], fixed[int(seeds[j])] if mask[j] else before[j])
        before = obs
    # seeds without a fixed state: one seeded call for all of them
    fake.calls.clear()
    obs = np.asarray(g.reset(np.ones(n, bool), np.arange(n) + 5))
    assert fake.calls == [("seeded", list(range(n)))]
    # demo starts: one call, the recorded observations
    states = [{"x": np.arange(40, dtype=np.float32).reshape(10, 4)[:, :3] + 100 * i} for i in range(2)]
    demo_obs = [np.full((10, 3), float(i)) for i in range(2)]
    fake.calls.clear()
    starts = [({"x": states[j % 2]["x"][j % 10]}, demo_obs[j % 2][j % 10]) for j in range(n)]
    obs = np.asarray(g.reset(np.ones(n, bool), np.zeros(n, np.int64), starts))
    assert fake.calls == [("states", list(range(n)))]
    np.testing.assert_array_equal(obs[:, 0], [j % 2 for j in range(n)])
    np.testing.assert_array_equal(np.asarray(fake.obs)[1], [100 + 4, 100 + 5, 100 + 6])  # demo 1's state at t=1


# ---- the SAC maths by value, on hand-made numbers --------------------------------------------------------------
def constant_critics(params, values):
    """Critic params whose member i outputs values[i] for every input (zero output kernel, bias = value)."""
    out = jax.tree_util.tree_map(jnp.array, params)
    last = max(k for k in out if k.startswith("Dense_"))
    out[last]["kernel"] = jnp.zeros_like(out[last]["kernel"])
    out[last]["bias"] = jnp.asarray(values, jnp.float32)[:, None]
    return out


@both
@pytest.mark.parametrize("backup_entropy", [False, True])
def test_one_update_by_value(algo, backup_entropy):
    """One update_one call, every number recomputed by hand: the critic target r + gamma * mask * (min of the
    *target* critics - alpha * log pi if --backup-entropy), the critic loss, the Polyak step, the actor loss
    against the ensemble *mean*, and the temperature loss alpha * (entropy - target entropy) with its sign."""
    gamma, tau, lr = 0.8, 0.05, 1e-3
    args = algo.Args(hidden_dims=(8,), num_qs=3, num_min_qs=3, batch_size=4, gamma=gamma, tau=tau, learning_rate=lr,
                     backup_entropy=backup_entropy, init_temperature=0.5, actor_update_freq=1,
                     target_entropy_scale=1.5)  # every flag of the loss away from its default
    obs_dim, act_dim = 5, 2
    actor, critic, state = algo.init_sac(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    state = state.replace(critic=state.critic.replace(params=constant_critics(state.critic.params, [1.0, 2.0, 3.0])),
                          target_params=constant_critics(state.target_params, [0.5, 1.5, -1.0]))
    rng = np.random.default_rng(0)
    rows = {"obs": rng.normal(size=(2, obs_dim)), "actions": rng.uniform(-1, 1, (2, act_dim)),
            "rewards": np.array([1.0, 0.0]), "next_obs": rng.normal(size=(2, obs_dim)), "masks": np.array([1.0, 0.0])}
    online, offline = algo.ReplayBuffer(2, obs_dim, act_dim), algo.ReplayBuffer(2, obs_dim, act_dim)
    online.add(rows)
    offline.add(rows)
    sample_batch, update_one, _ = algo.make_update(args, actor, critic, act_dim)
    key = jax.random.PRNGKey(7)
    new, info = jax.jit(update_one)(state, online.data, online.size, offline.data, offline.size, key)

    # the same draws as update_one: batch, then critic (policy sample, subset) and actor keys
    k_batch, k_c, k_a = jax.random.split(key, 3)
    k_pi, _ = jax.random.split(k_c)
    b = jax.device_get(sample_batch(online.data, online.size, offline.data, offline.size, k_batch))
    assert b["obs"].shape == (4, obs_dim), "--batch-size rows"
    alpha = 0.5
    _, next_logp = algo.sample_action(actor, state.actor.params, b["next_obs"], k_pi)
    next_v = -1.0 - (alpha * np.asarray(next_logp) if backup_entropy else 0.0)  # min of the target critics
    target = b["rewards"] + gamma * b["masks"] * next_v
    qf_loss = np.mean([(c - target) ** 2 for c in (1.0, 2.0, 3.0)])
    np.testing.assert_allclose(info["losses/qf_loss"], qf_loss, rtol=1e-5)
    np.testing.assert_allclose(info["losses/qf_values"], 2.0, rtol=1e-6)

    for t_new, c_new, t_old in zip(jax.tree_util.tree_leaves(new.target_params),
                                   jax.tree_util.tree_leaves(new.critic.params),
                                   jax.tree_util.tree_leaves(state.target_params)):
        np.testing.assert_allclose(t_new, tau * np.asarray(c_new) + (1 - tau) * np.asarray(t_old), rtol=1e-5, atol=1e-7)

    a, logp = algo.sample_action(actor, state.actor.params, b["obs"], k_a)
    q_mean = np.asarray(critic.apply({"params": new.critic.params}, b["obs"], a)).mean(0)
    np.testing.assert_allclose(info["losses/actor_loss"], np.mean(alpha * np.asarray(logp) - q_mean), rtol=1e-4)
    entropy = -float(np.mean(logp))
    np.testing.assert_allclose(info["losses/entropy"], entropy, rtol=1e-5)
    target_entropy = -1.5 * act_dim
    np.testing.assert_allclose(info["losses/alpha_loss"], alpha * (entropy - target_entropy), rtol=1e-4)
    # Adam's first step moves log alpha by lr against the sign of its gradient alpha * (entropy - target)
    moved = float(new.temp.params["log_alpha"]) - np.log(alpha)
    np.testing.assert_allclose(moved, -lr * np.sign(entropy - target_entropy), rtol=1e-3)
    np.testing.assert_allclose(info["losses/alpha"], np.exp(np.log(alpha) + moved), rtol=1e-5)
