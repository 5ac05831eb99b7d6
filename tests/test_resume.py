"""--resume: the state round trip tensor by tensor, runs that stop and resume against runs that do not, and every
bad --resume input as a one-line error that changes nothing."""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import common
import rfcl
import rlpd
import run_files
import run_log
from conftest import read_scalars


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_tree(a, b, skip=("['run']['elapsed']", "['run']['seconds']")):
    la, lb = leaves(a), leaves(b)
    assert set(la) == set(lb), set(la) ^ set(lb)
    for k in la:
        if any(k.startswith(s) for s in skip):
            continue
        va, vb = la[k], lb[k]
        if isinstance(va, (np.ndarray, jax.Array)) or isinstance(vb, (np.ndarray, jax.Array)):
            assert np.shape(va) == np.shape(vb) and np.array_equal(np.asarray(va), np.asarray(vb),
                                                                     equal_nan=True), k
        else:
            assert va == vb or (va != va and vb != vb), (k, va, vb)


# ---- the state round trip ---------------------------------------------------------------------------------------
def test_round_trip_restores_every_tensor_curriculum_field_generator_and_buffer(tmp_path):
    args = rfcl.Args(hidden_dims=(16, 16), num_qs=3, batch_size=8, max_episode_steps=10, exp_name="rt")
    obs_dim, act_dim = 5, 2
    actor, critic, state = rfcl.init_sac(args, obs_dim, act_dim, jax.random.PRNGKey(0))
    _, _, update_many = rfcl.make_update(args, actor, critic, act_dim)
    rng = np.random.default_rng(3)
    online, offline = rfcl.ReplayBuffer(7, obs_dim, act_dim), rfcl.ReplayBuffer(30, obs_dim, act_dim)

    def rows(n):
        return {"obs": rng.normal(size=(n, obs_dim)), "actions": rng.uniform(-1, 1, (n, act_dim)),
                "rewards": rng.integers(0, 2, n).astype(float), "next_obs": rng.normal(size=(n, obs_dim)),
                "masks": np.ones(n)}

    online.add(rows(5)), online.add(rows(5)), offline.add(rows(12))  # online has wrapped around: ptr 3, size 7
    state, _ = update_many(state, online.data, online.size, offline.data, offline.size, jax.random.PRNGKey(1), 3)
    reverse = rfcl.ReverseCurriculum([20, 30, 25], 4, 3, 3.0, 0.9, rng)
    forward = rfcl.ForwardCurriculum(np.arange(6) + 100, 0.1, 0.1, 5, rng)
    for _ in range(7):
        i, t, _ = reverse.sample_start()
        reverse.report(i, reverse.t[i], bool(rng.integers(2)))
        forward.report(forward.sample(), bool(rng.integers(2)))
    run = run_log.RunLog(tmp_path, run_log.SummaryWriter(str(tmp_path)), args.total_timesteps, args.log_freq, args.eval_freq,
                           args.save_freq, args.max_episode_steps, args.num_eval_episodes, args.capture_video, None, 3)
    run.episode_ended(1.0, True, True)
    run.evals.append([32, 0.5])  # an eval's step and success_at_end, which --target-success judges
    run.last["log"] = 64
    loop = {"global_step": 64, "stage": 1, "stage1_end_step": None, "grad_updates": 3}
    key = jax.random.PRNGKey(7)
    saved = rfcl.resume_payload(state, key, rng, reverse, forward, online, offline, loop, run)

    path = tmp_path / common.RESUME_FILE
    run_files.save_resume_state(path, "rfcl", rfcl.SCRIPT, dataclasses.asdict(args), 64, saved)
    header, loaded = run_files.load_resume_state(path, "rfcl", rfcl.SCRIPT)
    assert (header["global_step"], loaded["loop"]["stage"], header["args"]) == (64, 1, json.loads(json.dumps(
        dataclasses.asdict(args))))

    # restore into freshly built objects, as a resumed process does, and take the state again
    _, _, fresh = rfcl.init_sac(args, obs_dim, act_dim, jax.random.PRNGKey(99))
    rng2 = np.random.default_rng(0)
    reverse2 = rfcl.ReverseCurriculum([20, 30, 25], 4, 3, 3.0, 0.9, rng2)
    forward2 = rfcl.ForwardCurriculum(np.arange(6) + 100, 0.1, 0.1, 5, rng2)
    state2, key2, online2, offline2, counters = rfcl.restore(loaded, fresh, rng2, reverse2, forward2, "resumed")
    loop2 = dict(zip(("global_step", "stage", "stage1_end_step", "grad_updates"), counters))
    run2 = run_log.RunLog(tmp_path, run_log.SummaryWriter(str(tmp_path)), args.total_timesteps, args.log_freq, args.eval_freq,
                           args.save_freq, args.max_episode_steps, args.num_eval_episodes, args.capture_video, None, 3)
    run2.load_state_dict(loaded["run"], 64)
    assert_same_tree(saved, rfcl.resume_payload(state2, key2, rng2, reverse2, forward2, online2, offline2, loop2, run2))
    # beyond the snapshot: whole buffers (capacity, ring position), deques' lengths, what the generator draws next
    for a, b in ((online, online2), (offline, offline2)):
        assert (a.capacity, a.ptr, a.size) == (b.capacity, b.ptr, b.size)
        assert_same_tree(a.data, b.data)
    assert [list(w) for w in reverse.windows] == [list(w) for w in reverse2.windows]
    assert [w.maxlen for w in reverse2.windows] == [3, 3, 3] and forward2.histories[0].maxlen == 5
    assert run2.last == run.last and run2.episodes == run.episodes and run2.evals == [[32, 0.5]]
    assert run2.machines == run.machines and run.machines[0].endswith("JAX on cpu")
    np.testing.assert_array_equal(rng.integers(0, 10**9, 5), rng2.integers(0, 10**9, 5))
    np.testing.assert_array_equal(jax.random.split(key), jax.random.split(key2))
    # the restored learner takes the same next update as the original
    s1, i1 = update_many(state, online.data, online.size, offline.data, offline.size, key, 2)
    s2, i2 = update_many(state2, online2.data, online2.size, offline2.data, offline2.size, key2, 2)
    assert_same_tree(rfcl.networks(s1), rfcl.networks(s2))
    assert float(i1["losses/qf_loss"]) == float(i2["losses/qf_loss"])


# ---- bad --resume input ------------------------------------------------------------------------------------------
@pytest.fixture
def saved_run(tmp_path):
    """runs/r: args.json and a small, valid rfcl resume state at env step 64."""
    run_dir = tmp_path / "runs" / "r"
    args = rfcl.Args(exp_name="r", max_episode_steps=50, total_timesteps=100)
    run_files.make_run_dir(run_dir, dataclasses.asdict(args))
    run_files.save_resume_state(run_dir / common.RESUME_FILE, "rfcl", rfcl.SCRIPT, dataclasses.asdict(args), 64,
                                {"x": np.arange(1000.0)})
    return run_dir


def parse(module, *argv):
    return module.parse_args(list(argv))


def resume_error(module, *argv) -> str:
    """The error of `python module.py argv`: flags fail in parse_args, the state when main loads it (before it
    builds or writes anything)."""
    with pytest.raises(SystemExit) as e:
        module.main(parse(module, *argv))
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: "), msg
    return msg


def test_resume_takes_args_json_and_only_the_flags_that_cannot_change_the_algorithm(saved_run):
    args = parse(rfcl, "--resume", str(saved_run), "--total-timesteps", "500", "--eval-freq", "7",
                 "--no-capture-video", "--num-eval-episodes", "3", "--save-freq=9", "--target-success", "0.9",
                 "--target-evals", "4")
    saved = json.loads((saved_run / "args.json").read_text())
    changed = {"total_timesteps": 500, "eval_freq": 7, "capture_video": False, "num_eval_episodes": 3,
               "save_freq": 9, "target_success": 0.9, "target_evals": 4, "resume": str(saved_run)}
    assert dataclasses.asdict(args) == {**saved, **changed, "hidden_dims": tuple(saved["hidden_dims"])}


def test_bad_resume_inputs_are_one_line_errors_and_change_nothing(saved_run, tmp_path):
    def contents():  # .lock names its latest holder (this process, once it tried), so it is left out
        return {p: p.read_bytes() for p in saved_run.rglob("*") if p.is_file() and p.name != ".lock"}
    before = contents()
    state = saved_run / common.RESUME_FILE
    good = state.read_bytes()
    assert resume_error(rfcl, "--resume", str(tmp_path / "runs" / "nope")).startswith(
        "error: --resume " + str(tmp_path / "runs" / "nope") + ": no such run directory")
    assert resume_error(rfcl, "--resume", str(saved_run), "--gamma", "0.5") == (
        "error: --gamma cannot be given with --resume: the run's args.json fixes it; only --total-timesteps, "
        "--target-success, --target-evals, --eval-freq, --save-freq, --capture-video, --no-capture-video, "
        "--num-eval-episodes, --dataset-path may change")
    assert resume_error(rfcl, "--resume", str(saved_run), "--env-id", "PushCube-v1").startswith(
        "error: --env-id cannot be given with --resume")
    assert resume_error(rlpd, "--resume", str(saved_run)) == (
        f"error: {saved_run} is a run of rfcl.py (algorithm rfcl); resume it with that script")
    assert resume_error(rfcl, "--resume", str(saved_run), "--total-timesteps", "64") == (
        f"error: {saved_run} is already at env step 64; give a larger --total-timesteps to train it further")

    head, body = good.split(b"\n", 1)
    header = json.loads(head)
    bad_states = {
        "truncated": good[:-100],
        "corrupted": head + b"\n" + body[:50] + bytes([body[50] ^ 0xFF]) + body[51:],
        "not a resume state": b"\x00\x01garbage",
        "old version": json.dumps({**header, "version": 0}).encode() + b"\n" + body,
    }
    expected = {
        "truncated": f"error: {state} is truncated or corrupted",
        "corrupted": f"error: {state} is truncated or corrupted",
        "not a resume state": f"error: {state} is not a readable resume state",
        "old version": f"error: {state} was written by resume-state version 0; this script reads version 1",
    }
    for name, data in bad_states.items():
        state.write_bytes(data)
        assert resume_error(rfcl, "--resume", str(saved_run)).startswith(expected[name]), name
    state.write_bytes(good)
    state.unlink()
    assert resume_error(rfcl, "--resume", str(saved_run)).startswith(
        f"error: {saved_run} holds no resume state (resume.state)")
    state.write_bytes(good)
    assert contents() == before
    assert (saved_run / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_a_resume_state_write_is_atomic(tmp_path, monkeypatch):
    """The previous state stays whole until the new one is complete: a write that dies midway leaves it, removes its
    temporary file and says so in one line."""
    path = tmp_path / common.RESUME_FILE
    config = dataclasses.asdict(rfcl.Args(exp_name="a", max_episode_steps=50))
    run_files.save_resume_state(path, "rfcl", rfcl.SCRIPT, config, 10, {"x": np.zeros(10)})
    first = path.read_bytes()

    def dies(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", dies)
    with pytest.raises(SystemExit) as e:
        run_files.save_resume_state(path, "rfcl", rfcl.SCRIPT, config, 20, {"x": np.ones(10**5)})
    assert str(e.value.code).startswith(f"error: could not write {path} (No space left on device): the previous "
                                        f"resume state is intact: --resume {tmp_path} continues from env step 10")
    assert path.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == [common.RESUME_FILE]
    assert run_files.load_resume_state(path, "rfcl")[0]["global_step"] == 10


# ---- stop at N, resume, and compare with the run that did not stop ---------------------------------------------
SMALL = ["--num-demos", "2", "--num-envs", "2", "--num-eval-envs", "1", "--num-eval-episodes", "1",
         "--eval-freq", "96", "--log-freq", "32", "--num-seed-steps", "64", "--steps-per-env", "4",
         "--grad-updates-per-step", "2", "--batch-size", "32", "--hidden-dims", "32", "32", "--no-capture-video",
         "--max-episode-steps", "20"]


def run_in_process(module, argv, cwd, monkeypatch, keep=False):
    """module.main as `python module.py argv` in cwd; with keep, a copy of every resume state it writes."""
    original = run_files.save_resume_state

    def save_and_keep(path, algorithm, script, config, step, payload, **k):
        original(path, algorithm, script, config, step, payload, **k)
        shutil.copy(path, path.with_name(f"resume_{step}.state"))

    with monkeypatch.context() as m:
        m.chdir(cwd)
        if keep:
            m.setattr(run_files, "save_resume_state", save_and_keep)
        module.main(parse(module, *argv))


@pytest.mark.parametrize("module,extra", [(rfcl, ["--reverse-solved-frac", "-1", "--num-seeds", "20"]), (rlpd, [])],
                         ids=["rfcl-stage2", "rlpd"])
def test_stopped_and_resumed_run_equals_the_run_that_did_not_stop(module, extra, demo_path, tmp_path, monkeypatch):
    """rfcl: a run that stops at N = 192 has, tensor by tensor, the state of the uninterrupted run at N. rlpd: the
    uninterrupted run's own state at N, its logs up to 384 purged after N by the resumed writer. Either way, after
    the resume everything logged and the whole final state (learner, buffers, curricula, generators) equal the
    uninterrupted run's, value for value, each step once. rfcl is in stage 2 here, whose envs reset from seeds;
    for stage 1 see the next test."""
    flags = [*SMALL, *extra, "--save-freq", "192"]
    run_in_process(module, [*flags, "--exp-name", "a", "--total-timesteps", "384"], tmp_path, monkeypatch, keep=True)
    if module is rfcl:  # the resume state of the stage switch is kept as written, whatever is saved after it
        switch = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())["stage1_end_step"]
        assert (tmp_path / "runs" / "a" / rfcl.SWITCH_STATE).read_bytes() == (
            tmp_path / "runs" / "a" / f"resume_{switch}.state").read_bytes()
    if module is rfcl:  # b: a run that stops at N, then resumes
        run_in_process(module, [*flags, "--exp-name", "b", "--total-timesteps", "192"], tmp_path, monkeypatch)
        at_n = tmp_path / "runs" / "b" / "at_192.state"
        shutil.copy(tmp_path / "runs" / "b" / common.RESUME_FILE, at_n)
        assert_same_tree(run_files.load_resume_state(tmp_path / "runs" / "a" / "resume_192.state", None)[1],
                         run_files.load_resume_state(at_n, None)[1])
    else:  # b: the uninterrupted run as it was at N (its logs of all 384 steps, which the resume purges after N)
        shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
        shutil.copy(tmp_path / "runs" / "b" / "resume_192.state", tmp_path / "runs" / "b" / common.RESUME_FILE)
    run_in_process(module, ["--resume", "runs/b", "--total-timesteps", "384"], tmp_path, monkeypatch)

    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert_same_tree(run_files.load_resume_state(a / common.RESUME_FILE, None)[1],
                     run_files.load_resume_state(b / common.RESUME_FILE, None)[1])
    sa, sb = read_scalars(a), read_scalars(b)
    skip = ("charts/SPS",)
    assert {t for t in sa if not t.startswith("time/")} == {t for t in sb if not t.startswith("time/")}
    for tag in sa:
        if tag.startswith("time/") or tag in skip:
            assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag  # each step once, none missing
        else:
            assert sa[tag] == sb[tag], tag
    if module is rfcl:
        assert json.loads((b / "summary.json").read_text())["stage"] == 2
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == sorted(
        p.name for p in (a / "checkpoints").iterdir())


def test_rfcl_stage1_resume_keeps_the_learner_and_restarts_the_same_episodes(demo_path, tmp_path, monkeypatch):
    """Resume at N in stage 1 (the state at N itself is compared tensor by tensor in the test above): both runs restart
    the same episodes from the same demo states with the same first actions. The simulator then
    differs: PhysX keeps contact state from earlier steps that a restored demo state does not reset, so a fresh
    env process and one that has run for a while step the same state to slightly different next observations."""
    flags = [*SMALL, "--save-freq", "192", "--num-seeds", "20"]
    run_in_process(rfcl, [*flags, "--exp-name", "a", "--total-timesteps", "288"], tmp_path, monkeypatch, keep=True)
    assert run_files.load_resume_state(tmp_path / "runs" / "a" / "resume_192.state", None)[1]["loop"]["stage"] == 1
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    shutil.copy(tmp_path / "runs" / "b" / "resume_192.state", tmp_path / "runs" / "b" / common.RESUME_FILE)
    run_in_process(rfcl, ["--resume", "runs/b", "--total-timesteps", "288"], tmp_path, monkeypatch)

    a_end = run_files.load_resume_state(tmp_path / "runs" / "a" / common.RESUME_FILE, None)[1]["online"]["data"]
    b_end = run_files.load_resume_state(tmp_path / "runs" / "b" / common.RESUME_FILE, None)[1]["online"]["data"]
    rows = slice(192, 194)  # the first step after N, both envs
    np.testing.assert_array_equal(a_end["obs"][rows], b_end["obs"][rows])
    np.testing.assert_array_equal(a_end["actions"][rows], b_end["actions"][rows])
    np.testing.assert_allclose(a_end["next_obs"][rows], b_end["next_obs"][rows], atol=0.05)
    assert {t: [s for s, _ in v] for t, v in read_scalars(tmp_path / "runs" / "a").items()} == {
        t: [s for s, _ in v] for t, v in read_scalars(tmp_path / "runs" / "b").items()}, "same steps, once each"



def payload(run_dir: Path) -> dict:
    return run_files.load_resume_state(run_dir / common.RESUME_FILE, None)[1]


def test_a_fork_from_the_stage_switch_goes_on_as_its_parent_or_as_told(demo_path, tmp_path, monkeypatch):
    """--fork of stage2_start.state: with the parent's flags it learns, logs and ends exactly as the parent did after
    its switch; with another update ratio it makes that many more updates and records its parent, the step and the
    changed flag. The parent is only read, also when it was resumed (its state's args then hold --resume).
    Flags the state holds, and a missing state, are one line."""
    flags = [*SMALL, "--reverse-solved-frac", "-1", "--num-seeds", "20", "--save-freq", "192"]
    run_in_process(rfcl, [*flags, "--exp-name", "p", "--total-timesteps", "8"], tmp_path, monkeypatch)
    run_in_process(rfcl, ["--resume", "runs/p", "--total-timesteps", "288"], tmp_path, monkeypatch)
    parent = tmp_path / "runs" / "p"
    switch = json.loads((parent / "summary.json").read_text())["stage1_end_step"]
    state = parent / rfcl.SWITCH_STATE
    assert switch > 8 and run_files.read_resume_header(state)["global_step"] == switch
    assert run_files.read_resume_header(state)["args"]["resume"] == "runs/p", "written by the resumed process"
    untouched = {f: f.read_bytes() for f in parent.rglob("*") if f.is_file() and f.name != ".lock"}

    fork = ["--fork", "runs/p/stage2_start.state", "--total-timesteps", "288"]
    run_in_process(rfcl, [*fork, "--exp-name", "same"], tmp_path, monkeypatch)
    same = tmp_path / "runs" / "same"
    assert_same_tree(payload(parent), payload(same))
    sp, ss = read_scalars(parent), read_scalars(same)
    for tag in ss:
        if not tag.startswith("time/") and tag != "charts/SPS":
            assert ss[tag] == [(t, v) for t, v in sp[tag] if t > switch], tag
    assert json.loads((same / "summary.json").read_text())["forked_from"] == {
        "state": str(state.resolve()), "parent": "p", "global_step": switch, "changed": {}}

    run_in_process(rfcl, [*fork, "--exp-name", "utd", "--grad-updates-per-step", "4"], tmp_path, monkeypatch)
    utd = tmp_path / "runs" / "utd"
    summary = json.loads((utd / "summary.json").read_text())
    assert summary["forked_from"]["changed"] == {"grad_updates_per_step": [2, 4]}
    at_switch = run_files.load_resume_state(state, None)[1]["loop"]["grad_updates"]
    after = json.loads((parent / "summary.json").read_text())["grad_updates"] - at_switch
    assert summary["grad_updates"] - at_switch == 2 * after > 0, "twice the parent's updates after the switch"
    assert json.loads((utd / "args.json").read_text())["fork"] == "runs/p/stage2_start.state"
    assert run_files.read_resume_header(utd / common.RESUME_FILE)["fork"] == summary["forked_from"]
    assert {f: f.read_bytes() for f in parent.rglob("*") if f.is_file() and f.name != ".lock"} == untouched

    for argv, start in [
        (["--fork", "runs/none"], "error: --fork runs/none: no resume state there"),
        ([*fork, "--num-qs", "3"], "error: --num-qs cannot change in a fork: the resume state holds what it made"),
        ([*fork, "--hidden-dims", "16", "16"], "error: --hidden-dims cannot change in a fork"),
        ([*fork, "--buffer-size", "999"], "error: --buffer-size cannot change in a fork"),
        ([*fork, "--preset", "sample-efficient"], "error: --fork cannot be given with --preset"),
        ([*fork, "--checkpoint", "x.ckpt"], "error: --fork cannot be given with --checkpoint"),
        (["--fork", "runs/p", "--total-timesteps", "288"], "error: runs/p is already at env step 288"),
        ([*fork, "--exp-name", "p"], "error: run directory runs/p already exists"),
    ]:
        monkeypatch.chdir(tmp_path)
        assert resume_error(rfcl, *argv).startswith(start), argv
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        assert resume_error(rlpd, *fork).startswith("error: runs/p is a run of rfcl.py (algorithm rfcl)")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["p", "same", "utd"]


def test_an_rlpd_fork_of_a_run_directory_and_its_resume(demo_path, tmp_path, monkeypatch):
    """rlpd.py: --fork DIR starts from the run's latest resume state; the fork, stopped and resumed, keeps its
    record of the parent."""
    run_in_process(rlpd, [*SMALL, "--save-freq", "64", "--total-timesteps", "128", "--exp-name", "p"], tmp_path,
                   monkeypatch)
    run_in_process(rlpd, ["--fork", "runs/p", "--exp-name", "f", "--actor-update-freq", "2", "--total-timesteps",
                          "160"], tmp_path, monkeypatch)
    run_in_process(rlpd, ["--resume", "runs/f", "--total-timesteps", "192"], tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "runs" / "f" / "summary.json").read_text())
    assert summary["global_step"] == 192 and summary["forked_from"] == {
        "state": str((tmp_path / "runs" / "p" / common.RESUME_FILE).resolve()), "parent": "p",
        "global_step": 128, "changed": {"total_timesteps": [128, 160], "actor_update_freq": [1, 2]}}
    assert json.loads((tmp_path / "runs" / "f" / "args.json").read_text())["actor_update_freq"] == 2


def test_target_success_ends_a_run_as_finished(demo_path, tmp_path, monkeypatch):
    """Every eval meets --target-success 0: the run ends, finished, at its --target-evals-th eval instead of at its
    budget, and suite.py counts it as done."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import suite

    assert resume_error(rlpd, "--target-success", "1.5") == (
        "error: --target-success must be in [0, 1], got 1.5")
    run_dir = tmp_path / "runs" / "t"
    run_in_process(rlpd, [*SMALL, "--eval-freq", "64", "--target-success", "0", "--target-evals", "2",
                          "--total-timesteps", "100000", "--exp-name", "t"], tmp_path, monkeypatch)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["global_step"], summary["target_reached"], summary["stopped_by"]) == (128, True, None)
    assert [s for s, _ in read_scalars(run_dir)["eval/success_at_end"]] == [64, 128]
    assert (run_dir / "checkpoints" / "final.ckpt").exists()
    assert suite.RunSpec("rlpd", "PickCube-v1", 2, 1, 100000, []).finished(run_dir)
    assert not suite.RunSpec("rlpd", "PickCube-v1", 2, 1, 100000, []).finished(tmp_path / "runs" / "none")


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__))]))


def test_resume_continues_only_on_the_demos_the_run_began_with(demo_path, tmp_path, monkeypatch):
    """The resume state records the demos (path, count, content hash): other demos at the same path are refused with
    one line; a moved file is given with --dataset-path and checked by content."""
    import h5py

    mine = tmp_path / "mine"
    mine.mkdir()
    data = mine / "demos.h5"
    shutil.copy(demo_path, data), shutil.copy(demo_path.with_suffix(".json"), data.with_suffix(".json"))
    run_in_process(rlpd, [*SMALL, "--save-freq", "64", "--total-timesteps", "64", "--exp-name", "d",
                          "--dataset-path", str(data)], tmp_path, monkeypatch)
    header = run_files.read_resume_header(tmp_path / "runs" / "d" / common.RESUME_FILE)
    assert header["demos"]["path"] == str(data.resolve()) and header["demos"]["num_demos"] == 2
    moved = tmp_path / "moved.h5"
    shutil.move(data, moved), shutil.move(data.with_suffix(".json"), moved.with_suffix(".json"))
    shutil.copy(moved, data), shutil.copy(moved.with_suffix(".json"), data.with_suffix(".json"))
    with h5py.File(data, "r+") as f:  # other demos at the same path: one action changed
        f["traj_0/actions"][3] = f["traj_0/actions"][3] * 0.5
    resume = ["--resume", "runs/d", "--total-timesteps", "128"]
    with pytest.raises(SystemExit) as e:
        run_in_process(rlpd, resume, tmp_path, monkeypatch)
    assert str(e.value.code) == (f"error: {data} holds other demos than the run began with (2 demos of "
                                 f"{data.resolve()}, sha256 {header['demos']['sha256'][:12]}...); put that file back, "
                                 f"or pass --dataset-path to a copy of it")
    data.unlink()
    run_in_process(rlpd, [*resume, "--dataset-path", str(moved)], tmp_path, monkeypatch)  # the same demos, moved
    assert json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())["global_step"] == 128
