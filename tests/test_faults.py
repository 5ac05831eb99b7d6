"""Faults a long run meets, each ending in one line that says what is intact and what is lost, never a traceback, a
half-written file or another writer's file replaced: a full disk and a read-only run directory (a real small tmpfs
where this machine lets the tests mount one, else the fault injected at the write), SIGHUP, an impatient second and
third Ctrl-C, two collect_demos.py into one folder, demo files that disagree with themselves or with the env, control
modes the env or ManiSkill's conversion lacks, and bad flags of every entry point."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import collect_demos
import common
import demo_making
import rfcl
import rlpd
import run_files
import run_log
import vector_env
from conftest import ROOT, error_line, one_line, read_scalars, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import frontier  # noqa: E402
import suite  # noqa: E402

SMALL = ["--num-demos", "2", "--num-envs", "2", "--num-eval-envs", "1", "--num-eval-episodes", "1", "--log-freq", "32",
         "--num-seed-steps", "64", "--grad-updates-per-step", "2", "--batch-size", "32", "--hidden-dims", "32",
         "--no-capture-video", "--max-episode-steps", "20"]


def no_tmp_files(root) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (where the tests may mount one), with ManiSkill's demos reachable from it."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a tmpfs (the injected faults below still run)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def rlpd_run(demo_path, tmp_path_factory):
    """A small rlpd.py run that saved at env step 64, made once for the tests that copy it (a copied run resumes)."""
    root, cwd = tmp_path_factory.mktemp("rlpd_run"), os.getcwd()
    os.chdir(root)
    try:
        rlpd.main(rlpd.parse_args([*SMALL, "--exp-name", "r", "--save-freq", "64", "--total-timesteps", "64",
                                   "--eval-freq", "64"]))
    finally:
        os.chdir(cwd)
    while run_files._LOCKS:  # the run's lock is held until this process ends; the copies need none
        run_files._LOCKS.pop().close()
    return root / "runs" / "r"


def copy_run(run, root, name):
    (root / "runs").mkdir(exist_ok=True)
    return Path(shutil.copytree(run, root / "runs" / name, ignore=shutil.ignore_patterns(".lock")))


def fail_writes_of(monkeypatch, name: str, err=errno.ENOSPC):
    """Every write of a file called `name` fails at its flush to disk, as on a full disk."""
    fsync = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".{name}.tmp"):
            raise OSError(err, os.strerror(err))
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", failing)


# ---- a full disk, a read-only run directory -----------------------------------------------------------------------
def test_a_full_disk_stops_a_new_run_at_its_first_save_with_one_line_and_no_tmp_file(small_disk, demo_path):
    proc = run_script([str(ROOT / "rfcl.py"), *SMALL, "--hidden-dims", "256", "256", "--exp-name", "full",
                       "--save-freq", "128", "--total-timesteps", "100000", "--eval-freq", "100000"], small_disk,
                      check=False)
    assert proc.returncode == 1
    assert "MiB free on the disk of runs/full, and a save point writes about" in proc.stdout, "warned at the start"
    assert error_line(proc) == ("error: could not write runs/full/resume.state (No space left on device): this run "
                                "has no resume state yet, so it cannot be continued; its checkpoints so far are "
                                "intact. Free space on that disk (or make runs/full writable); stopped here")
    assert "Traceback" not in proc.stderr
    assert no_tmp_files(small_disk) and (small_disk / "runs" / "full" / "checkpoints" / "step_00000128.ckpt").exists()


def test_a_read_only_run_directory_is_one_line_before_anything_runs(small_disk, rlpd_run, monkeypatch):
    copy_run(rlpd_run, small_disk, "ro")
    monkeypatch.chdir(small_disk)
    before = {p: p.read_bytes() for p in (small_disk / "runs" / "ro").rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    msg = one_line(lambda: rlpd.main(rlpd.parse_args(["--resume", "runs/ro", "--total-timesteps", "128"])))
    assert msg.startswith("error: cannot write in runs/ro (Read-only file system); make it writable")
    msg = one_line(lambda: rlpd.main(rlpd.parse_args([*SMALL, "--exp-name", "ro2"])))
    assert msg.startswith("error: cannot write in runs (Read-only file system)")
    assert {p: p.read_bytes() for p in (small_disk / "runs" / "ro").rglob("*") if p.is_file()} == before


def test_a_failed_resume_state_write_keeps_the_previous_one_and_says_so(demo_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rfcl.main(rfcl.parse_args([*SMALL, "--exp-name", "r", "--save-freq", "64", "--total-timesteps", "64",
                               "--eval-freq", "64"]))
    state = tmp_path / "runs" / "r" / common.RESUME_FILE
    saved = state.read_bytes()
    fail_writes_of(monkeypatch, common.RESUME_FILE)
    msg = one_line(lambda: rfcl.main(rfcl.parse_args(["--resume", "runs/r", "--total-timesteps", "192"])))
    assert msg == ("error: could not write runs/r/resume.state (No space left on device): the previous resume state "
                   "is intact: --resume runs/r continues from env step 64, and everything since is lost. Free space "
                   "on that disk (or make runs/r writable); stopped here")
    assert state.read_bytes() == saved and no_tmp_files(tmp_path)


def test_a_failed_checkpoint_write_stops_the_run_and_it_resumes_as_if_that_never_ran(rlpd_run, tmp_path,
                                                                                     monkeypatch):
    run = copy_run(rlpd_run, tmp_path, "r")
    monkeypatch.chdir(tmp_path)
    saved = (run / common.RESUME_FILE).read_bytes()
    with monkeypatch.context() as m:  # the checkpoint is written before the resume state of its save point
        fail_writes_of(m, "step_00000128.ckpt", errno.EACCES)
        msg = one_line(lambda: rlpd.main(rlpd.parse_args(["--resume", "runs/r", "--total-timesteps", "192",
                                                          "--save-freq", "64"])))
    assert msg == ("error: could not write runs/r/checkpoints/step_00000128.ckpt (Permission denied): "
                   "step_00000128.ckpt was not written. Free space on that disk (or make runs/r/checkpoints "
                   "writable); stopped here")
    assert (run / common.RESUME_FILE).read_bytes() == saved and no_tmp_files(tmp_path)
    rlpd.main(rlpd.parse_args(["--resume", "runs/r", "--total-timesteps", "128"]))  # nothing was lost
    assert json.loads((run / "summary.json").read_text())["global_step"] == 128


# ---- signals ---------------------------------------------------------------------------------------------------
def signalled(script, name, cwd, sigs, gap):
    """`script` until its progress bar passes env step 96 (its loop running, updates begun, env workers up), then
    `sigs` to its process group `gap` s apart."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *SMALL, "--exp-name", name, "--eval-freq", "100000",
                             "--total-timesteps", "100000"], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    t0 = time.time()
    while max(map(int, re.findall(r"(\d+)/100000 \[", "".join(err)[-2000:])), default=0) < 96:
        assert proc.poll() is None and time.time() - t0 < 300, "".join(err)[-3000:]
        time.sleep(0.05)
    for s in sigs:
        os.killpg(proc.pid, s)
        time.sleep(gap)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    lines = [x.strip() for x in "".join(err).replace("\r", "\n").splitlines() if x.strip() and "step/s" not in x]
    return proc.returncode, lines


def test_sighup_from_a_closed_terminal_saves_and_stops_like_sigterm(demo_path, tmp_path):
    code, lines = signalled("rfcl.py", "hup", tmp_path, [signal.SIGHUP], 0)
    assert code == 129 and lines[-1].startswith("stopped by SIGHUP at env step ")
    assert not any("Traceback" in x or "resource_tracker" in x for x in lines), lines
    header = run_files.read_resume_header(tmp_path / "runs" / "hup" / common.RESUME_FILE)
    assert lines[-1] == f"stopped by SIGHUP at env step {header['global_step']}; continue with: python rfcl.py " \
                        f"--resume runs/hup"
    assert (tmp_path / "runs" / "hup" / "checkpoints" / f"step_{header['global_step']:08d}.ckpt").exists()


def ctrl_c_at_96(name, tmp_path, monkeypatch, capsys, during_save: int):
    """An rlpd.py run (saving every 64 env steps) gets Ctrl-C at env step 96 and `during_save` more as that save
    point's resume state begins to be written. Returns (exit code, the non-empty stderr lines)."""
    monkeypatch.chdir(tmp_path)
    progress, save = run_log.RunLog.progress, run_files.save_resume_state

    def first_at_96(self, step):
        progress(self, step)
        if step == 96:
            os.kill(os.getpid(), signal.SIGINT)

    def more(path, algorithm, script, config, step, *a, **k):
        for _ in range(during_save if step == 96 else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return save(path, algorithm, script, config, step, *a, **k)
    monkeypatch.setattr(run_log.RunLog, "progress", first_at_96)
    monkeypatch.setattr(run_files, "save_resume_state", more)
    with pytest.raises(SystemExit) as e:
        rlpd.main(rlpd.parse_args([*SMALL, "--exp-name", name, "--save-freq", "64", "--eval-freq", "1000",
                                   "--total-timesteps", "1000"]))
    err = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines() if x.strip() and "step/s" not in x]
    return e.value.code, err


def test_a_second_ctrl_c_lets_the_save_finish(demo_path, tmp_path, monkeypatch, capsys):
    """The second signal as the save point's resume state begins to be written: the save completes and the run
    stops as after one signal."""
    code, err = ctrl_c_at_96("twice", tmp_path, monkeypatch, capsys, during_save=1)
    assert code == 130
    assert "SIGINT again: still saving, which keeps the work; once more stops at once, without the save" in err
    assert err[-1].startswith("stopped by SIGINT at env step 96; continue with: python ")
    assert run_files.read_resume_header(tmp_path / "runs" / "twice" / common.RESUME_FILE)["global_step"] == 96


def test_a_third_ctrl_c_inside_the_save_stops_at_once_saying_what_is_lost(demo_path, tmp_path, monkeypatch, capsys):
    """Two more as the resume state of 96 begins to be written (--save-freq 64 saved at 64): it exits at once,
    leaves the state of 64 as it was, and says so."""
    code, err = ctrl_c_at_96("t", tmp_path, monkeypatch, capsys, during_save=2)
    assert code == 130
    assert err[-1] == ("stopped at once by a third signal (SIGINT): this save point's resume state is not written; "
                       "--resume continues from the previous save point, whose files are intact")
    assert run_files.read_resume_header(tmp_path / "runs" / "t" / common.RESUME_FILE)["global_step"] == 64
    assert no_tmp_files(tmp_path)


def test_a_stop_does_not_wait_for_an_eval_due_in_its_last_iteration(demo_path, tmp_path, monkeypatch):
    """Signalled in the iteration that reaches env step 96, where an eval falls due: it saves and stops without the
    eval; the resumed run makes it in its first iteration (env step 104), and its final one at 128."""
    monkeypatch.chdir(tmp_path)
    progress = run_log.RunLog.progress

    def signal_at_96(self, step):
        progress(self, step)
        if step == 96:
            os.kill(os.getpid(), signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(run_log.RunLog, "progress", signal_at_96)
        with pytest.raises(SystemExit) as e:
            rlpd.main(rlpd.parse_args([*SMALL, "--exp-name", "s", "--eval-freq", "96", "--total-timesteps", "1000"]))
    assert e.value.code == 130
    run = tmp_path / "runs" / "s"
    assert json.loads((run / "summary.json").read_text())["global_step"] == 96
    assert "eval/success_at_end" not in read_scalars(run)
    rlpd.main(rlpd.parse_args(["--resume", "runs/s", "--total-timesteps", "128"]))
    assert [t for t, _ in read_scalars(run)["eval/success_at_end"]] == [104, 128]


# ---- collect_demos.py: two writers of one folder ------------------------------------------------------------------
def test_two_collections_into_one_folder_in_the_same_second_keep_both_files(demo_path, tmp_path, monkeypatch):
    import jax

    args = rfcl.Args(max_episode_steps=5)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "c.ckpt"
    run_files.save_checkpoint(ckpt, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    monkeypatch.setattr(collect_demos.time, "strftime", lambda *a: "20260101_000000")  # the same second
    for seed in (0, 100):
        collect_demos.main(collect_demos.Args(checkpoint=str(ckpt), num_envs=1, num_episodes=1, seed=seed,
                                              only_successful=False, output_dir=str(tmp_path / "out")))
    files = sorted((tmp_path / "out").glob("*.h5"))
    assert len(files) == 2 and len(list((tmp_path / "out").glob("*.json"))) == 2
    seeds = {json.loads(f.with_suffix(".json").read_text())["episodes"][0]["episode_seed"] for f in files}
    assert seeds == {0, 100}, "each collection's own episodes"
    # the final placement never replaces a file that is there
    src = tmp_path / "mine.h5"
    src.write_bytes(b"mine")
    assert one_line(lambda: common.place_new(src, files[0])).startswith(f"error: {files[0]} appeared while")
    assert files[0].read_bytes() != b"mine"


# ---- demo files, control modes ----------------------------------------------------------------------------------
def copy_demos(demo_path, dst):
    shutil.copy(demo_path, dst)
    shutil.copy(demo_path.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_a_demo_file_whose_trajectories_disagree_on_sizes_is_one_line(demo_path, tmp_path):
    bad = copy_demos(demo_path, tmp_path / "mixed.h5")
    with h5py.File(bad, "r+") as f:
        obs = f["traj_1/obs"][()]
        del f["traj_1/obs"]
        f["traj_1/obs"] = np.concatenate([obs, obs[:, :3]], 1)
    with pytest.raises(common.DemoError) as e:
        common.load_demos(bad, 2)
    assert str(e.value) == (f"{bad}:traj_1 has observations/actions of size (45,)/(8,) but traj_0 has (42,)/(8,): the "
                            f"file mixes envs or modes; pass --num-demos to stop before it, or another file")
    assert common.load_demos(bad, 1).num_trajectories == 1


def test_demos_that_do_not_fit_the_env_are_refused_before_any_env_worker_starts(demo_path, tmp_path, monkeypatch):
    bad = copy_demos(demo_path, tmp_path / "wide.h5")
    with h5py.File(bad, "r+") as f:
        for k in ("traj_0", "traj_1"):
            obs = f[f"{k}/obs"][()]
            del f[f"{k}/obs"]
            f[f"{k}/obs"] = np.concatenate([obs, obs[:, :1]], 1)
    built = []
    monkeypatch.setattr(vector_env, "make_envs", lambda *a, **k: built.append(a))
    monkeypatch.chdir(tmp_path)
    msg = one_line(lambda: rfcl.main(rfcl.parse_args([*SMALL, "--exp-name", "w", "--dataset-path", str(bad)])))
    assert msg.startswith(f"error: {bad} has observations of dim 43 but PickCube-v1 has 42") and not built
    monkeypatch.undo()
    proc = run_script([str(ROOT / "rlpd.py"), *SMALL, "--exp-name", "w2", "--dataset-path", str(bad)], tmp_path,
                      check=False)  # as a user runs it: the line is the last one, nothing after it
    assert error_line(proc).startswith(f"error: {bad} has observations of dim 43") and "Traceback" not in proc.stderr


def test_control_modes_the_env_or_the_conversion_lacks_are_one_line_before_any_demo_is_made(demo_path, tmp_path,
                                                                                           monkeypatch):
    planned = []
    monkeypatch.setattr(demo_making, "_run", lambda *a: planned.append(a))
    monkeypatch.setattr(demo_making, "_download_demos", lambda *a: planned.append(a))
    monkeypatch.chdir(tmp_path)
    msg = one_line(lambda: rfcl.main(rfcl.parse_args([*SMALL, "--exp-name", "c", "--control-mode", "pd_foo"])))
    assert msg.startswith("error: PickCube-v1 has no --control-mode pd_foo; its robot has ['pd_joint_delta_pos'")
    msg = one_line(lambda: rfcl.main(rfcl.parse_args([*SMALL, "--exp-name", "c", "--control-mode",
                                                      "pd_joint_pos_vel"])))
    assert msg.startswith("error: ManiSkill's replay_trajectory cannot convert pd_joint_pos demos to --control-mode "
                          "pd_joint_pos_vel")
    assert not planned and not (tmp_path / "runs").exists()


# ---- every entry point's flags and files --------------------------------------------------------------------------
@pytest.mark.parametrize("script", [rfcl, rlpd], ids=["rfcl", "rlpd"])
def test_more_bad_flags_of_the_scripts_are_one_line_before_anything_is_written(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = one_line(lambda: script.main(script.parse_args(["--exp-name", "b", "--seed", "-1"])))
    assert msg == "error: --seed must be in [0, 2**32), got -1"
    assert not (tmp_path / "runs").exists()
    # a budget that ends before the first update is allowed (a smoke test of the envs) but never silent
    script.check_args(script.parse_args(["--total-timesteps", "1000"]))
    assert capsys.readouterr().out.endswith("warning: --total-timesteps 1000 is not above --num-seed-steps 5000: the "
                                            "run ends before its first update, and its checkpoints hold untrained "
                                            "networks\n")


def test_bad_flags_and_files_of_collect_demos_frontier_and_suite_are_one_line(tmp_path):
    import jax

    args = rfcl.Args(max_episode_steps=5)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "c.ckpt"
    run_files.save_checkpoint(ckpt, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    for flags, start in [({"max_attempts": 0}, "error: --max-attempts must be >= 1, got 0"),
                         ({"seed": -5}, "error: --seed must be >= 0, got -5"),
                         ({"num_videos": -1}, "error: --num-videos must be >= 0, got -1"),
                         ({"output_dir": "/proc/none"}, "error: cannot write in --output-dir /proc/none")]:
        msg = one_line(lambda: collect_demos.main(collect_demos.Args(checkpoint=str(ckpt), **flags)))
        assert msg.startswith(start), (flags, msg)
    msg = one_line(lambda: frontier.main(frontier.Args(checkpoint=str(ckpt), out="/proc/none/x")))
    assert msg.startswith("error: cannot write --out /proc/none/x")
    for flags, start in [({"budgets": ["PickCube-v1"]}, "error: --budgets takes ENV_ID=STEPS"),
                         ({"budgets": ["PickCube-v1=1e6"]}, "error: --budgets takes ENV_ID=STEPS"),
                         ({"parallel": 0}, "error: --parallel must be >= 1, got 0"),
                         ({"target_success": 2.0}, "error: --target-success is an eval success rate in [0, 1]"),
                         ({"prefix": "a/b"}, "error: --prefix is part of a folder name under runs/"),
                         ({"seeds": [-1]}, "error: --seeds takes one or more seeds >= 0")]:
        assert one_line(lambda: suite.grid(suite.Args(**flags))).startswith(start), flags


def test_checkpoints_carry_a_format_version_checked_like_the_resume_states(tmp_path):
    import jax
    from flax import serialization

    args = rfcl.Args(max_episode_steps=5)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    path = tmp_path / "c.ckpt"
    run_files.save_checkpoint(path, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    ckpt = run_files.load_checkpoint(str(path))
    assert (ckpt["format"], ckpt["version"]) == ("rfcl-jax checkpoint", 2)
    for change, start in [({"version": 3}, f"error: {path} was written by checkpoint version 3; these scripts read "
                                           f"versions up to 2: use it with the version of the code that wrote it"),
                          ({"format": "other"}, f"error: {path} is not a checkpoint of these scripts")]:
        path.write_bytes(serialization.msgpack_serialize({**ckpt, **change}))
        assert one_line(lambda: run_files.load_checkpoint(str(path))).startswith(start)
    # version 1 kept the four networks beside the meta; written before checkpoints carried a format: version 1
    nets = ckpt.pop("networks")
    del ckpt["format"], ckpt["version"]
    path.write_bytes(serialization.msgpack_serialize({**ckpt, **nets}))
    old = run_files.load_checkpoint(str(path))
    assert old["algorithm"] == "rfcl" and set(old["networks"]) == set(nets) == set(run_files.V1_NETWORKS)
    assert np.array_equal(old["networks"]["actor_params"]["Dense_0"]["kernel"], nets["actor_params"]["Dense_0"]["kernel"])


def test_a_write_into_a_missing_folder_says_to_create_it_not_to_free_space(tmp_path):
    import common

    path = tmp_path / "gone" / "report.json"
    with pytest.raises(SystemExit) as e:
        common.write_json(path, {})
    assert str(e.value) == (f"error: could not write {path} (No such file or directory): report.json was not written. "
                            f"Create the folder {path.parent} or write elsewhere; stopped here")
