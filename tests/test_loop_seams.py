"""The seams of rfcl.py's training loop, where its tested parts meet: a real run (CPU ManiSkill) with spies on the
env, the curricula, the update and the random generator, checked against what the algorithm says must happen.
Each check names the mistake it catches."""

import json

import numpy as np
import pytest

import common
import demo_making
import rfcl
import vector_env
from conftest import read_scalars

ENVS, PER_ENV, SEED_STEPS, TOTAL, HORIZON = 2, 4, 16, 400, 12


class EnvRecorder:
    """Wraps a vector env: every reset (at which step, mask, seeds, demo starts) and every step (success).
    With `scripted`, each step's success is a coin flip (p = 0.3) instead of the simulator's, so that episodes
    succeed at some step but not at their last one and vice versa: a tiny run rarely succeeds for real, and
    the curricula's judging rules differ only where it does."""

    def __init__(self, envs, scripted=False):
        self.envs, self.resets, self.success = envs, [], []
        self.coin = np.random.default_rng(0) if scripted else None

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def reset(self, mask, seeds, states=None):
        """Records each env's demo start (i, t) (tagged by demo_state, see spy_run), or None."""
        self.resets.append((len(self.success), np.array(mask), np.array(seeds),
                            None if states is None else [getattr(s, "start", None) for s in states]))
        return self.envs.reset(mask, seeds, None if states is None else [s if s is None else tuple(s) for s in states])

    def step(self, actions):
        obs, terminated, success = self.envs.step(actions)
        if self.coin is not None:
            success = self.coin.random(len(success)) < 0.3
        self.success.append(np.array(success))
        return obs, terminated, success


class RngSpy:
    """A numpy Generator that counts uniform() calls: the loop draws random actions with it and nothing else."""

    def __init__(self, gen):
        self.gen, self.uniform_calls = gen, 0

    def uniform(self, *a, **k):
        self.uniform_calls += 1
        return self.gen.uniform(*a, **k)

    def __getattr__(self, name):
        return getattr(self.gen, name)


def spy_run(tmp_path, monkeypatch, *extra):
    """rfcl.main in this process on 2 demos, to TOTAL env steps. By default stage 1 ends at the first finished
    episode (negative solved fraction); `extra` flags override. Returns what the spies saw."""
    seen = {"train": None, "eval": None, "reverse": [], "forward": [], "samples": [], "updates": [], "switch": []}
    make_envs, demo_state = vector_env.make_envs, rfcl.demo_state

    def recording_make_envs(*a, **k):
        training = seen["train"] is None  # the training envs are made first
        rec = EnvRecorder(make_envs(*a, **k), scripted=training)
        seen["train" if training else "eval"] = rec
        return rec

    class Start(tuple):
        """A demo state that says which (demo, step) it is."""

    def tagged_demo_state(demos, i, t):
        start = Start(demo_state(demos, i, t))
        start.start = (int(i), int(t))
        return start

    def spy(cls, name, log, keep=lambda self, a, r: a):
        orig = getattr(cls, name)

        def wrapped(self, *a):
            out = orig(self, *a)
            log.append(keep(self, a, out))
            return out
        monkeypatch.setattr(cls, name, wrapped)

    spy(rfcl.ReverseCurriculum, "report", seen["reverse"], lambda self, a, r: (int(a[0]), int(a[1]), bool(a[2])))
    spy(rfcl.ForwardCurriculum, "report", seen["forward"], lambda self, a, r: (int(a[0]), bool(a[1])))
    spy(rfcl.ForwardCurriculum, "sample", seen["samples"], lambda self, a, r: (r, int(self.seeds[r])))
    make_update = rfcl.make_update

    def spying_make_update(*a):
        sample_batch, update_one, update_many = make_update(*a)

        def update_many_spy(s, online, online_size, offline, offline_size, key, n):
            seen["updates"].append((int(online_size), int(offline_size)))
            return update_many(s, online, online_size, offline, offline_size, key, n)
        return sample_batch, update_one, update_many_spy

    switch = rfcl.switch_to_stage2

    def switch_spy(online, *a):
        offline, new_online = switch(online, *a)
        seen["switch"].append((online.size, offline is online, new_online.size))
        return offline, new_online

    rng = {}

    class Random:  # rfcl.np.random, whose default_rng hands out the spy
        def __getattr__(self, name):
            return getattr(np.random, name)

        def default_rng(self, seed=None):
            rng["spy"] = RngSpy(np.random.default_rng(seed))
            return rng["spy"]

    class Numpy:  # rfcl.np
        random = Random()

        def __getattr__(self, name):
            return getattr(np, name)

    monkeypatch.setattr(vector_env, "make_envs", recording_make_envs)
    monkeypatch.setattr(rfcl, "demo_state", tagged_demo_state)
    monkeypatch.setattr(rfcl, "make_update", spying_make_update)
    monkeypatch.setattr(rfcl, "switch_to_stage2", switch_spy)
    monkeypatch.setattr(rfcl, "np", Numpy())
    monkeypatch.chdir(tmp_path)
    args = rfcl.parse_args([
        "--exp-name", "seams", "--num-demos", "2", "--total-timesteps", str(TOTAL), "--reverse-solved-frac", "-1",
        "--num-seed-steps", str(SEED_STEPS), "--batch-size", "16", "--num-envs", str(ENVS), "--steps-per-env",
        str(PER_ENV), "--grad-updates-per-step", "2", "--num-eval-envs", "2", "--num-eval-episodes", "3",
        "--eval-freq", "1000", "--log-freq", "8", "--max-episode-steps", str(HORIZON), "--no-capture-video",
        "--num-seeds", "6", *extra])
    rfcl.main(args)
    monkeypatch.undo()
    seen["rng"] = rng["spy"]
    seen["summary"] = json.loads((tmp_path / "runs" / "seams" / "summary.json").read_text())
    seen["scalars"] = read_scalars(tmp_path / "runs" / "seams")
    seen["demo_lengths"] = common.load_demos(demo_making.get_demos(
        "PickCube-v1", "state", "pd_joint_delta_pos", 2), 2).lengths
    return seen


def episodes(seen, ratio=3.0):
    """Rebuild every training episode from the recorded resets and steps: (env, demo start or None, seed,
    length, success_once, success_at_end, reached its time limit), in the order in which they ended."""
    rec, lengths = seen["train"], seen["demo_lengths"]
    current = {}  # env -> (first step index, demo start, seed)
    out = []
    for at, mask, seeds, starts in rec.resets:
        for j in np.flatnonzero(mask):
            if j in current and at > current[j][0]:  # a reset right after a reset ends no episode
                first, start, seed = current[j]
                succ = np.array([s[j] for s in rec.success[first:at]])
                limit = (16 + int((lengths[start[0]] - start[1]) // ratio)) if start else HORIZON
                out.append((j, start, seed, at - first, bool(succ.any()), bool(succ[-1]), at - first == limit))
            current[j] = (at, None if starts is None else starts[j], int(seeds[j]))
    return out


@pytest.fixture(scope="module")
def runs(demo_path, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        # "once": a real stage 1 whose frontiers jump to 0 at a demo's first frontier success (window 1, a step
        # longer than any demo) and that ends when both demos are solved; "at_end": stage 1 ends at once
        return {"once": spy_run(tmp_path_factory.mktemp("once"), mp, "--curriculum-success", "once",
                                "--reverse-solved-frac", "0.9", "--per-demo-buffer-size", "1",
                                "--reverse-step-size", "1000"),
                "at_end": spy_run(tmp_path_factory.mktemp("at_end"), mp, "--curriculum-success", "at_end")}
    finally:
        mp.undo()


@pytest.mark.parametrize("rule", ["once", "at_end"])
def test_reverse_curriculum_is_told_the_start_each_episode_used_and_the_chosen_success(runs, rule):
    """Catches: reporting a fresh sample instead of the episode's own start, the wrong success rule, or
    reporting episodes cut short by the stage switch."""
    seen = runs[rule]
    stage1 = [e for e in episodes(seen) if e[1] is not None and e[6]]
    assert stage1, "at least one stage-1 episode reached its time limit"
    expected = [(e[1][0], e[1][1], e[4] if rule == "once" else e[5]) for e in stage1]
    assert seen["reverse"] == expected
    assert any(e[4] != e[5] for e in episodes(seen)), "the two rules disagree on some episodes"


def test_the_frontier_moves_by_the_rule_in_a_real_run(runs):
    """Replaying the run's own reports through a fresh curriculum (window 1, step 1000) must move every frontier
    to 0 and solve every demo exactly at the last stage-1 report: the run ended stage 1 when, and because, its
    curriculum said so. Catches a loop that never reports, reports to a copy, or switches on its own rule."""
    seen = runs["once"]
    c = rfcl.ReverseCurriculum(seen["demo_lengths"], 1000, 1, 3.0, 0.9, np.random.default_rng(0))
    done_at = None
    for n, (i, start, success) in enumerate(seen["reverse"]):
        c.report(i, start, success)
        if c.done and done_at is None:
            done_at = n
    assert done_at == len(seen["reverse"]) - 1
    assert (c.t == 0).all() and c.solved.all()
    frac = dict(seen["scalars"]["curriculum/start_step_frac_mean"])
    solved = dict(seen["scalars"]["curriculum/reverse_solved_frac"])
    assert frac[min(frac)] == 1.0 and min(frac.values()) == 0.0 and max(solved.values()) == 1.0


@pytest.mark.parametrize("rule", ["once", "at_end"])
def test_stage_two_envs_get_the_pool_seed_the_horizon_and_report_what_happened(runs, rule):
    """Catches: handing the env the pool index k instead of forward.seeds[k], a stage-1 time limit in stage 2,
    or reporting another seed or success."""
    seen = runs[rule]
    stage2 = [e for e in episodes(seen) if e[1] is None]
    assert len(seen["samples"]) == len(stage2) + ENVS, "one sample per stage-2 episode (the last ones unfinished)"
    assert [e[2] for e in stage2] == [seed for _, seed in seen["samples"][:len(stage2)]]
    assert all(seed != k for k, seed in seen["samples"]), "the env gets the seed, not the pool index"
    done = [e for e in stage2 if e[6]]
    assert done and all(e[3] == HORIZON for e in stage2), "stage-2 episodes last --max-episode-steps"
    by_seed = [(k, e[4] if rule == "once" else e[5]) for (k, _), e in zip(seen["samples"], stage2)]
    assert seen["forward"] == by_seed
    assert any(e[4] != e[5] for e in stage2), "the two rules disagree on some stage-2 episodes"
    edge = dict(seen["scalars"]["curriculum/seeds_on_edge_frac"])
    solved = dict(seen["scalars"]["curriculum/seeds_solved_frac"])
    assert max(edge.values()) + max(solved.values()) > 0, "the seed scores moved off 'unsolved'"


def test_stage_switch_hands_over_all_stage1_data_and_seeds_with_the_policy(runs):
    """Catches: dropping the buffer handover (the offline half would stay the demos), not emptying the online
    buffer, seeding stage 2 with uniform actions, or resuming updates before --num-seed-steps."""
    seen = runs["once"]
    s = seen["summary"]["stage1_end_step"]
    assert seen["switch"] == [(s, True, 0)], "the stage-1 buffer, holding every stage-1 step, becomes offline"
    demo_rows = int(seen["demo_lengths"].sum())
    ends = np.arange(1, TOTAL // (ENVS * PER_ENV) + 1) * ENVS * PER_ENV
    before = ends[(ends >= SEED_STEPS) & (ends < ends[ends >= s][0])]
    after = ends[ends >= s + SEED_STEPS]
    assert seen["updates"] == [(int(e), demo_rows) for e in before] + [(int(e - s), s) for e in after]
    assert seen["rng"].uniform_calls == SEED_STEPS // ENVS, "random actions only in stage 1's seed steps"


def test_seed_ranges_of_demos_training_eval_and_collection_never_overlap(runs):
    seen = runs["once"]
    train = [seed for _, seed in seen["samples"]]
    evals = np.concatenate([r[2] for r in seen["eval"].resets])
    demo_seeds = [e[2] for e in episodes(seen) if e[1] is not None]
    assert max(demo_seeds) < 10_000 <= min(train) and max(train) < 10**6 <= evals.min()
    assert evals.max() < 2 * 10**6, "eval seeds 10**6 + k"
    import collect_demos
    assert collect_demos.Args(checkpoint="x").seed == 2 * 10**6


class FakeEvalEnvs:
    """Two envs whose step k reports success in env 0 at steps 2..3 (then fails) and env 1 from step 1 on."""

    num_envs = 2

    def __init__(self):
        self.seeds, self.video_calls, self.t, self.prepared = [], [], 0, []

    def fix_initial_states(self, seeds):
        self.prepared.append(list(seeds))

    def reset(self, mask, seeds):
        self.seeds.append(list(seeds))
        self.t = 0
        return np.zeros((2, 3))

    def step(self, actions):
        self.t += 1
        return np.zeros((2, 3)), np.zeros(2, bool), np.array([2 <= self.t <= 3, self.t >= 1])

    def video(self, start=False, save_path=None):
        self.video_calls.append((len(self.seeds), start, save_path))


def test_eval_runs_whole_rounds_of_fresh_seeds_with_a_video_of_round_zero_only():
    envs = FakeEvalEnvs()
    m = common.evaluate(envs, lambda obs: np.zeros((2, 1)), max_episode_steps=5, num_episodes=5, video_path="v.mp4")
    assert envs.seeds == [[10**6, 10**6 + 1], [10**6 + 2, 10**6 + 3], [10**6 + 4, 10**6 + 5]]
    assert envs.prepared == [[10**6 + k for k in range(6)]], "every eval seed's initial state fixed up front (GPU)"
    assert envs.video_calls == [(1, True, None), (1, False, "v.mp4")]
    assert m == {"eval/success_once": 1.0, "eval/success_at_end": 0.5, "eval/return": 3.5, "eval/episodes": 6}
