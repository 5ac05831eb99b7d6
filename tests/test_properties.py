"""What makes each script the algorithm it claims to be, and the protocol its numbers depend on, each checked at the
interface where a slip at any layer below would show (benchmarks/mutation.py plants such slips: groups start,
offline, eval, flags, limits, checkpoints, episodes).

rfcl.py
  R1. A stage-1 episode starts from exactly the demo state asked for: the env gets the demo's seed (its scene), the
      simulator holds the demo's state at t (read back from the CPU worker processes, and from the batched GPU env
      class), and the observation handed out is the demo's at t.
  R2. The reverse curriculum is told each finished stage-1 episode's own start and its success; the forward
      curriculum each finished stage-2 episode's own pool index and success (with success scripted so that episodes
      differ: per-episode flags carried over would show). tests/test_loop_seams.py checks the two success rules.
  R3. Stage-2 episodes run under stage 2's rules: sampled actions (no frontier episode's policy mean), the full
      --max-episode-steps, seeds from the pool; also at start_episodes itself, after any stage-1 episode.
rlpd.py
  P1. Every batch is half online, half from the demo file: the update is handed the demo rows as its offline
      buffer, and the offline half is drawn independently of the online half.
  P2. Training seeds come from [10**4, 10**6): disjoint from the demos' (0..) and eval's (10**6..).
both (the same tests, parametrized over the two scripts)
  B1. Eval acts with the policy mean of the current weights (the last eval's actions against the final weights).
  B2. Every flag that enters the loss changes the update by the expected amount (test_sac_core's update by value,
      at non-default values of each flag), and each update call makes exactly --grad-updates-per-step updates.
  B3. Time limits truncate at exactly the episode's limit and never terminate: a time limit leaves the transition's
      mask at 1 (--bootstrap-at-done truncated, nothing terminating).
  B4. A checkpoint holds the weights the run had at that step (final.ckpt against the final resume state).
  B5. The charts (charts/success_once, success_at_end, episodic_return) are the means over the episodes that
      finished since the last log, rebuilt from what the env reported.
  B6. A reset restarts only the envs asked for: every other env keeps its simulator state and observation, so its
      episode goes on (checked at every reset of the spied runs on the CPU workers, partial ones in RFCL's; the
      batched env class's masking by test_sac_core's test of GPU resets).
"""

import json
import shutil

import gymnasium as gym
import jax
import mani_skill.envs  # noqa: F401
import numpy as np
import pytest

import common
import demo_making
import rfcl
import rlpd
import run_files
import vector_env
from conftest import CONTROL_MODE, ENV_ID, OBS_MODE, read_scalars

HORIZON, ENVS, PER_ENV = 12, 2, 4
SUCCESS_AT = 3  # a scripted successful episode succeeds at its 3rd step only: success_once without success_at_end


class Spy:
    """Wraps a vector env and records every reset (the step count it came at, mask, seeds, each env's demo start
    (i, t) or None, the observations returned) and every step (actions, observations). Success is scripted: the
    k-th episode of env j (counted at its resets) succeeds at its SUCCESS_AT-th step only when (j + k) is even;
    nothing terminates. After a reset that restores demo states it reads back each such env's simulator state."""

    def __init__(self, envs, scripted: bool):
        self.envs, self.scripted = envs, scripted
        self.resets, self.steps, self.restored = [], [], []
        self.episode = np.zeros(envs.num_envs, int) - 1
        self.length = np.zeros(envs.num_envs, int)
        self.last_obs = None
        self.kept = 0  # envs seen to go on through another env's reset

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def sim_states(self) -> list:
        if isinstance(self.envs, vector_env.GPUEnvs):
            return [np.asarray(self.envs.base.get_state())[j] for j in range(self.envs.num_envs)]
        return [np.asarray(s)[0] for s in self.envs.envs.call("get_state")]  # from the worker processes

    def reset(self, mask, seeds, states=None):
        plain = None if states is None else [s if s is None else tuple(s) for s in states]  # picklable for workers
        mask = np.array(mask)
        kept = np.flatnonzero(~mask) if self.last_obs is not None else []
        before = self.sim_states() if len(kept) else None
        obs = np.array(self.envs.reset(mask, seeds, plain))
        starts = [None if states is None or states[j] is None else states[j].start for j in range(len(mask))]
        self.resets.append((len(self.steps), mask, np.array(seeds), starts, obs.copy()))
        sim = self.sim_states() if len(kept) or any(starts[j] is not None for j in np.flatnonzero(mask)) else None
        for j in kept:  # B6: the envs not reset go on with their episode
            np.testing.assert_array_equal(obs[j], self.last_obs[j], err_msg=f"env {j} kept its observation")
            np.testing.assert_array_equal(sim[j], before[j], err_msg=f"env {j} kept its simulator state")
            self.kept += 1
        self.restored += [(starts[j], int(seeds[j]), obs[j], sim[j]) for j in np.flatnonzero(mask) if starts[j]]
        self.episode[mask] += 1
        self.length[mask] = 0
        self.last_obs = obs
        return obs

    def step(self, actions):
        obs, terminated, success = self.envs.step(actions)
        obs = np.array(obs)
        self.length += 1
        if self.scripted:
            success = ((np.arange(len(success)) + self.episode) % 2 == 0) & (self.length == SUCCESS_AT)
            terminated = np.zeros(len(success), bool)
        self.steps.append((np.array(actions), obs.copy(), np.array(success)))
        self.last_obs = obs
        return obs, terminated, success


def tag_demo_states(monkeypatch):
    """rfcl.demo_state hands out states that say which (demo, step) they are."""
    demo_state = rfcl.demo_state

    class Start(tuple):
        pass

    def tagged(demos, i, t):
        s = Start(demo_state(demos, i, t))
        s.start = (int(i), int(t))
        return s
    monkeypatch.setattr(rfcl, "demo_state", tagged)


def spied_run(script, tmp_path, monkeypatch, *flags, sim_backend="cpu", scripted=True) -> dict:
    """script.main on 2 PickCube demos in this process, its training env and eval env wrapped in Spies, its update
    calls and curriculum reports recorded. Returns what was seen."""
    seen = {"envs": [], "updates": [], "reverse": [], "forward": [], "starts": []}
    make_envs, make_update = vector_env.make_envs, script.make_update

    def spying_make_envs(*a, **k):
        seen["envs"].append(Spy(make_envs(*a, **k), scripted=scripted and not seen["envs"]))  # train, then eval
        return seen["envs"][-1]

    def spying_make_update(*a):
        sample_batch, update_one, update_many = make_update(*a)

        def update_many_spy(s, online, online_size, offline, offline_size, key, n):
            seen["updates"].append((int(online_size), int(offline_size), n,
                                    {k: np.asarray(v[:int(offline_size)]) for k, v in offline.items()}))
            return update_many(s, online, online_size, offline, offline_size, key, n)
        return sample_batch, update_one, update_many_spy

    monkeypatch.setattr(vector_env, "make_envs", spying_make_envs)
    monkeypatch.setattr(script, "make_update", spying_make_update)
    if script is rfcl:
        tag_demo_states(monkeypatch)
        for cls, name, keep in ((rfcl.ReverseCurriculum, "report", lambda a: (int(a[0]), int(a[1]), bool(a[2]))),
                                (rfcl.ForwardCurriculum, "report", lambda a: (int(a[0]), bool(a[1])))):
            orig = getattr(cls, name)
            log = seen["reverse" if cls is rfcl.ReverseCurriculum else "forward"]
            monkeypatch.setattr(cls, name, lambda self, *a, orig=orig, log=log, keep=keep: (log.append(keep(a)),
                                                                                          orig(self, *a))[1])
        start_episodes = rfcl.start_episodes

        def start_spy(mask, eps, envs, stage, *a):
            obs = start_episodes(mask, eps, envs, stage, *a)
            seen["starts"].append((stage, np.array(mask), eps.policy_mean.copy(), eps.horizon.copy(), eps.seed_idx.copy()))
            return obs
        monkeypatch.setattr(rfcl, "start_episodes", start_spy)
    monkeypatch.chdir(tmp_path)
    demo_file = reseeded_demos(tmp_path / "demos.h5")
    script.main(script.parse_args([
        "--exp-name", "p", "--num-demos", "2", "--dataset-path", str(demo_file), "--num-envs", str(ENVS), "--steps-per-env", str(PER_ENV),
        "--grad-updates-per-step", "3", "--batch-size", "16", "--hidden-dims", "16", "--num-eval-envs", "2",
        "--num-eval-episodes", "2", "--log-freq", "40", "--max-episode-steps", str(HORIZON), "--no-capture-video",
        "--bootstrap-at-done", "truncated", "--sim-backend", sim_backend, *flags]))
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "p"
    seen.update(run_dir=run_dir, summary=json.loads((run_dir / "summary.json").read_text()),
                scalars=read_scalars(run_dir), payload=run_files.load_resume_state(
                    run_dir / common.RESUME_FILE, None)[1],
                demos=common.load_demos(demo_file, 2))
    return seen


def reseeded_demos(dst):
    """The planner's PickCube demos with episode seeds 500, 503, ... instead of 0, 1, ...: a seed that equals its
    demo's index would hide a run that builds a demo's scene from the index. (PickCube's whole scene, goal included,
    is in the restored state, so the demos stay valid.)"""
    src = demo_making.get_demos(ENV_ID, OBS_MODE, CONTROL_MODE, 2)
    shutil.copy(src, dst)
    meta = json.loads(src.with_suffix(".json").read_text())
    for k, e in enumerate(meta["episodes"]):
        e["episode_seed"] = e["reset_kwargs"]["seed"] = 500 + 3 * k
    dst.with_suffix(".json").write_text(json.dumps(meta))
    return dst


RFCL_FLAGS = ["--total-timesteps", "1200", "--num-seed-steps", "16", "--eval-freq", "1200", "--curriculum-policy",
              "deterministic", "--per-demo-buffer-size", "1", "--reverse-step-size", "40", "--reverse-solved-frac",
              "0.4", "--num-seeds", "6", "--save-freq", "480"]
RLPD_FLAGS = ["--total-timesteps", "240", "--num-seed-steps", "16", "--eval-freq", "240", "--save-freq", "160"]


@pytest.fixture(scope="module")
def runs(demo_path, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return {"rfcl": spied_run(rfcl, tmp_path_factory.mktemp("rfcl"), mp, *RFCL_FLAGS),
                "rlpd": spied_run(rlpd, tmp_path_factory.mktemp("rlpd"), mp, *RLPD_FLAGS)}
    finally:
        mp.undo()


def limit_of(seen, start) -> int:
    """The time limit of an episode that began at `start` (a demo's (i, t) in RFCL's stage 1, else None)."""
    if start is None:
        return HORIZON
    return 16 + int((seen["demos"].lengths[start[0]] - start[1]) // 3.0)


def episodes(seen) -> list[dict]:
    """Every training episode rebuilt from the training env's resets and steps, in the order they ended: env, start,
    seed, length, whether it finished (reached its limit), its step count at the end, success once / at end, return."""
    spy = seen["envs"][0]
    out, current = [], {}
    for at, mask, seeds, starts, _ in spy.resets:
        for j in np.flatnonzero(mask):
            if j in current and at > current[j][0]:
                first, start, seed = current[j]
                success = np.array([s[2][j] for s in spy.steps[first:at]])
                out.append({"env": j, "start": start, "seed": seed, "length": at - first, "end": at,
                            "finished": at - first == limit_of(seen, start), "once": bool(success.any()),
                            "at_end": bool(success[-1]), "return": float(success.sum())})
            current[j] = (at, starts[j], int(seeds[j]))
    return sorted(out, key=lambda e: (e["end"], e["env"]))


both = pytest.mark.parametrize("name", ["rfcl", "rlpd"])


# ---- rfcl.py ----------------------------------------------------------------------------------------------------
def assert_demo_starts(seen, min_starts: int) -> None:
    """R1 for every demo start the spy saw: seed, simulator state and observation are the demo's at t."""
    demos = seen["demos"]
    ref = gym.make(ENV_ID, obs_mode=OBS_MODE, control_mode=CONTROL_MODE, sim_backend="physx_cpu")
    try:
        starts = seen["envs"][0].restored
        assert len({s for s, *_ in starts}) >= min_starts and any(t < demos.lengths[i] for (i, t), *_ in starts)
        for (i, t), seed, obs, sim in starts:
            assert seed == demos.episodes[i]["episode_seed"], "the demo's own seed builds its scene"
            ref.reset(seed=seed)
            ref.unwrapped.set_state_dict(jax.tree_util.tree_map(lambda x, t=t: x[t], demos.env_states[i]))
            np.testing.assert_allclose(sim, ref.unwrapped.get_state().numpy()[0], atol=1e-6,
                                       err_msg=f"the simulator holds demo {i}'s state at step {t}")
            np.testing.assert_array_equal(obs, demos.traj_obs[i][t])
    finally:
        ref.close()


def test_stage1_episodes_start_from_exactly_the_demo_state_in_the_cpu_workers(runs):
    assert_demo_starts(runs["rfcl"], min_starts=4)


def test_stage1_episodes_start_from_exactly_the_demo_state_in_the_batched_env_class(demo_path, tmp_path,
                                                                                    monkeypatch):
    """R1 on --sim-backend gpu's GPUEnvs, run here on CPU physics (one env; see test_gpu_path.py)."""
    monkeypatch.setattr(vector_env, "GPU_PHYSX", "physx_cpu")
    monkeypatch.setattr(vector_env, "check_gpu_simulation", lambda: None)
    seen = spied_run(rfcl, tmp_path, monkeypatch, "--total-timesteps", "160", "--num-seed-steps", "16",
                     "--eval-freq", "1000", "--num-seeds", "6", "--num-envs", "1", "--num-eval-envs", "1",
                     "--per-demo-buffer-size", "1", "--reverse-step-size", "40", sim_backend="gpu")
    assert isinstance(seen["envs"][0].envs, vector_env.GPUEnvs)
    assert_demo_starts(seen, min_starts=2)


def test_the_curricula_are_told_each_finished_episodes_own_start_and_success(runs):
    seen = runs["rfcl"]
    eps = [e for e in episodes(seen) if e["finished"]]
    stage1, stage2 = [e for e in eps if e["start"]], [e for e in eps if not e["start"]]
    assert seen["reverse"] == [(*e["start"], e["once"]) for e in stage1]
    assert len({e["once"] for e in stage1}) == 2, "successful and failed stage-1 episodes"
    assert seen["summary"]["stage"] == 2 and stage2, "the run reached stage 2 and finished episodes there"
    pool = seen["payload"]["forward"]["seeds"]
    assert [(int(pool[k]), s) for k, s in seen["forward"]] == [(e["seed"], e["once"]) for e in stage2]
    assert len({e["once"] for e in stage2}) == 2


def test_stage2_episodes_act_sampled_with_the_full_horizon_from_pool_seeds(runs):
    seen = runs["rfcl"]
    dets = [(stage, det[mask]) for stage, mask, det, *_ in seen["starts"]]
    assert any(det.any() for stage, det in dets if stage == 1), "frontier episodes acted with the policy mean"
    assert not any(det.any() for stage, det in dets if stage == 2), "no stage-2 episode acts with the policy mean"
    assert all((h[m] == HORIZON).all() for stage, m, _, h, _ in seen["starts"] if stage == 2)
    pool = set(int(s) for s in seen["payload"]["forward"]["seeds"])
    assert {e["seed"] for e in episodes(seen) if not e["start"]} <= pool


def test_a_stage2_start_clears_what_the_envs_previous_episode_left(tmp_path):
    """R3 at start_episodes itself, whatever the last stage-1 episode of each env was (the run above may switch
    with no frontier episode running): a stage-2 start acts sampled, with the full horizon, a pool seed, no demo
    state, and its counters from zero."""
    class Envs:
        def reset(self, mask, seeds, states):
            self.seeds, self.states = np.array(seeds), states
            return np.zeros((len(mask), 1))
    eps, envs = rfcl.Episodes.empty(3), Envs()
    eps.policy_mean[:], eps.success_once[:], eps.length[:], eps.episode_return[:], eps.horizon[:] = True, True, 7, 1.5, 20
    forward = rfcl.ForwardCurriculum(np.arange(4) + 100, temperature=1.0, staleness_coef=0.1, history=5,
                                     rng=np.random.default_rng(0))
    rfcl.start_episodes(np.ones(3, bool), eps, envs, 2, None, forward, None, rfcl.Args(max_episode_steps=50))
    assert not eps.policy_mean.any() and not eps.success_once.any() and (eps.length == 0).all() and (
        eps.episode_return == 0).all()
    assert (eps.horizon == 50).all() and set(envs.seeds) <= set(range(100, 104)) and envs.states == [None] * 3
    np.testing.assert_array_equal(envs.seeds, forward.seeds[eps.seed_idx])


# ---- rlpd.py ----------------------------------------------------------------------------------------------------
def test_rlpd_hands_the_update_the_demo_rows_as_its_offline_half(runs, demo_path):
    from test_data_path import demo_rows

    seen, want = runs["rlpd"], demo_rows(demo_path, 2, 1.0)
    assert seen["updates"]
    for online_size, offline_size, _, offline in seen["updates"]:
        assert offline_size == len(want["obs"]) and online_size >= 16
        for k, v in want.items():
            np.testing.assert_allclose(offline[k], v, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("algo", [rfcl, rlpd], ids=["rfcl", "rlpd"])
def test_the_offline_half_is_drawn_independently_of_the_online_half(algo):
    args = algo.Args(batch_size=512)
    actor, critic, _ = algo.init_sac(args, 1, 1, jax.random.PRNGKey(0))
    sample_batch, _, _ = algo.make_update(args, actor, critic, 1)
    n = 1000
    rows = {"obs": np.arange(n, dtype=np.float32)[:, None], "actions": np.zeros((n, 1)), "rewards": np.zeros(n),
            "next_obs": np.zeros((n, 1)), "masks": np.zeros(n)}
    buf = algo.ReplayBuffer(n, 1, 1)
    buf.add(rows)
    b = np.asarray(sample_batch(buf.data, n, buf.data, n, jax.random.PRNGKey(1))["obs"][:, 0])
    assert np.mean(b[:256] == b[256:]) < 0.05, "the same rows drawn in both halves"


def test_rlpd_training_seeds_are_disjoint_from_demo_and_eval_seeds():
    class Envs:
        def reset(self, mask, seeds, states=None):
            drawn.append(np.asarray(seeds)[mask])

    drawn, rng = [], np.random.default_rng(0)
    for _ in range(2000):
        rlpd.start_episodes(np.ones(10, bool), rlpd.Episodes.empty(10), Envs(), rng)
    seeds = np.concatenate(drawn)
    assert 10_000 <= seeds.min() and seeds.max() < 10**6


# ---- both scripts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", [rfcl, rlpd], ids=["rfcl", "rlpd"])
@pytest.mark.parametrize("mode", ["always", "truncated"])
def test_an_episode_ends_at_its_time_limit_and_at_a_termination_only_if_terminations_end_episodes(algo, mode):
    """B3 at Episodes.step itself: every env's counters advance by one step (length, return, success so far); an
    episode ends when its length reaches the limit, and where the env terminated only with --bootstrap-at-done
    truncated."""
    eps = algo.Episodes.empty(3)
    limit = ()
    if algo is rfcl:
        eps.horizon[:] = 3  # rfcl.py: each episode's own time limit
    else:
        limit = (3,)
    ended = [eps.step(np.array(s), np.array(t), *limit, mode).tolist() for s, t in [
        ([True, False, False], [False, True, False]), ([False, False, True], [False, False, False]),
        ([False, False, False], [False, False, False])]]
    assert ended[0] == ([False, True, False] if mode == "truncated" else [False, False, False])
    assert ended[1] == [False, False, False] and ended[2] == [True, True, True]
    assert eps.length.tolist() == [3, 3, 3] and eps.episode_return.tolist() == [1.0, 0.0, 1.0]
    assert eps.success_once.tolist() == [True, False, True]


@both
def test_eval_acts_with_the_policy_mean_of_the_current_weights(runs, name):
    seen = runs[name]
    algo = rfcl if name == "rfcl" else rlpd
    ckpt = run_files.load_checkpoint(str(seen["run_dir"] / "checkpoints" / "final.ckpt"))
    det = algo.load_actor(ckpt)[0]
    spy = seen["envs"][1]
    last_eval = spy.steps[-HORIZON:]  # the last eval ran at the last step, after the last update
    assert spy.resets[-1][0] == len(spy.steps) - HORIZON
    assert np.asarray(spy.resets[-1][2]).min() >= 10**6
    obs = [spy.resets[-1][4]] + [o for _, o, _ in last_eval[:-1]]
    for o, (actions, _, _) in zip(obs, last_eval):
        np.testing.assert_allclose(actions, np.asarray(det(o)), atol=1e-5)


@both
def test_each_update_call_makes_exactly_grad_updates_per_step_updates(runs, name):
    seen = runs[name]
    assert seen["updates"] and all(u[2] == 3 for u in seen["updates"])
    counted = int(seen["payload"]["sac"]["critic"]["step"])
    assert counted == seen["summary"]["grad_updates"] == 3 * len(seen["updates"])


@both
def test_time_limits_truncate_at_the_limit_and_never_terminate(runs, name):
    seen = runs[name]
    eps = episodes(seen)
    assert all(e["length"] <= limit_of(seen, e["start"]) for e in eps), "no episode outlasts its time limit"
    assert sum(e["finished"] for e in eps) >= 4
    p = seen["payload"]
    masks = [np.asarray(p[b]["data"]["masks"]) for b in ("online", "offline") if b in p]
    assert all((m == 1).all() for m in masks), "a time limit left a transition's mask at 0"


@both
def test_a_checkpoint_holds_the_weights_the_run_had_at_its_step(runs, name):
    seen = runs[name]
    ckpt = run_files.load_checkpoint(str(seen["run_dir"] / "checkpoints" / "final.ckpt"))
    sac = seen["payload"]["sac"]
    assert ckpt["global_step"] == seen["summary"]["global_step"]
    for field, saved in (("actor_params", sac["actor"]["params"]), ("critic_params", sac["critic"]["params"]),
                         ("target_params", sac["target_params"]), ("log_alpha", sac["temp"]["params"]["log_alpha"])):
        got, want = jax.tree_util.tree_leaves(ckpt["networks"][field]), jax.tree_util.tree_leaves(saved)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)), field


@both
def test_charts_are_the_means_over_the_episodes_finished_since_the_last_log(runs, name):
    seen = runs[name]
    eps = [e for e in episodes(seen) if e["finished"]]
    logs = sorted(t for t, _ in seen["scalars"]["charts/SPS"])
    charts = {k: dict(seen["scalars"][f"charts/{k}"]) for k in ("success_once", "success_at_end", "episodic_return")}
    prev, checked = 0, 0
    for step in logs:
        done = [e for e in eps if prev < e["end"] * ENVS <= step]
        prev = step
        if not done:
            assert step not in charts["success_once"]
            continue
        for key, field in (("success_once", "once"), ("success_at_end", "at_end"), ("episodic_return", "return")):
            assert charts[key][step] == pytest.approx(np.mean([e[field] for e in done])), (key, step)
        checked += 1
    assert checked >= 2 and 0 < np.mean([e["once"] for e in eps]) < 1


def test_a_reset_restarts_only_the_envs_asked_for(runs):
    """B6: the spy compared the simulator state and observation of every env outside a reset's mask before and
    after the reset; this says such resets happened: in RFCL's stage 1 episodes of different limits end at
    different steps (the spied RLPD run's episodes all end together: one limit, nothing terminates)."""
    assert runs["rfcl"]["envs"][0].kept >= 3
