"""rfcl.py's curricula in isolation (the SAC core is tested in test_sac_core.py, the presets in
test_presets_and_checkpoints.py)."""

from types import SimpleNamespace

import numpy as np

import rfcl
from conftest import fake_gpu_envs


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


def test_curriculum_policy_deterministic_acts_with_the_mean_only_in_frontier_episodes():
    import jax
    import jax.numpy as jnp

    c = reverse(lengths=(20, 30))
    c.t[:] = [8, 0]
    c.solved[1] = True
    assert c.is_frontier(0, 8) and not c.is_frontier(0, 9), "past the frontier: not judged"
    assert not c.is_frontier(1, 0), "a solved demo has no frontier"
    actor = rfcl.Actor(3, (16, 16))
    obs = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    params = actor.init(jax.random.PRNGKey(1), obs)["params"]
    key = jax.random.PRNGKey(2)
    mask = jnp.array([True, False, True, False])
    a = rfcl.training_action(actor, params, obs, key, mask)
    mean = rfcl.deterministic_action(actor, params, obs)
    sampled, _ = rfcl.sample_action(actor, params, obs, key)
    np.testing.assert_allclose(a[mask], mean[mask], rtol=1e-6)
    np.testing.assert_allclose(a[~mask], sampled[~mask], rtol=1e-6)
    assert not np.allclose(mean[~mask], sampled[~mask]), "the sampled rows really are noisy"


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


def test_gpu_reset_mixes_demo_starts_and_seeds_in_two_calls_and_keeps_the_other_envs():
    """Demo-start envs (rfcl.demo_state) are set to their demo states in one reset_to_env_states call and show the recorded
    observation; seeds without a fixed state share one seeded call (ManiSkill: drawn from the first env's seed);
    envs outside the mask keep their observation."""
    g, fake = fake_gpu_envs(4)
    demos = SimpleNamespace(env_states=[{"x": np.arange(30, dtype=np.float32).reshape(10, 3) + 100}],
                            traj_obs=[np.arange(30, dtype=np.float32).reshape(10, 3)])

    obs = np.asarray(g.reset(np.array([True, True, True, False]), np.array([11, 12, 13, 14]),
                             [None, rfcl.demo_state(demos, 0, 5), None, None]))
    assert fake.calls == [("seeded", [0, 2]), ("states", [1])]
    np.testing.assert_array_equal(obs[:3], [[11000] * 3, [15, 16, 17], [11001] * 3])
    np.testing.assert_array_equal(np.asarray(fake.obs)[1], [115, 116, 117])  # the demo's state at t = 5
    kept = obs[3].copy()

    obs2 = np.asarray(g.reset(np.array([False, False, True, True]), np.array([0, 0, 21, 22])))
    assert fake.calls[2:] == [("seeded", [2, 3])]
    np.testing.assert_array_equal(obs2[:2], obs[:2])
    np.testing.assert_array_equal(obs2[2:], [[11000 + 0] * 3, [11000 + 1] * 3])  # env 0's seed (11) seeds the call
    assert not np.array_equal(obs2[3], kept)
