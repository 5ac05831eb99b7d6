"""benchmarks/suite.py: a tiny grid through submitit's local executor (the Slurm path's code), reuse of finished
runs, and the checkpoint-and-requeue path that a Slurm time limit takes: a run stopped by SIGTERM to its process
group mid-stage-1 saves, says how to go on, and the requeued job resumes it to its budget with continuous tags."""

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tyro

from conftest import ROOT, read_scalars

sys.path.insert(0, str(ROOT / "benchmarks"))
import suite  # noqa: E402

TINY = ["--num-envs=1", "--num-eval-envs=1", "--num-eval-episodes=1", "--eval-freq=64", "--log-freq=32",
        "--num-seed-steps=64", "--grad-updates-per-step=2", "--batch-size=32", "--hidden-dims", "32", "32",
        "--no-capture-video"]


def test_a_tiny_grid_runs_through_submitit_then_is_reused(demo_path, tmp_path):
    args = suite.Args(configs=["rlpd:2"], env_ids=["PickCube-v1", "PushCube-v1"], seeds=[1], total_timesteps=128,
                      budgets=["PushCube-v1=192"], extra=TINY, executor="submitit-local", root=str(tmp_path),
                      out=str(tmp_path / "out"), name="tiny")
    rows = suite.main(args)["rows"]
    assert [(r["task"], r["final_step"]) for r in rows] == [("PickCube-v1", 128), ("PushCube-v1", 192)]
    for env, total in (("PickCube", 128), ("PushCube", 192)):
        summary = json.loads((tmp_path / "runs" / f"suite_{env}_rlpd_d2_s1" / "summary.json").read_text())
        assert summary["global_step"] == total and summary["stopped_by"] is None
    md = (tmp_path / "out" / "tiny.md").read_text()
    assert "| PickCube-v1 | rlpd:2 | suite_PickCube_rlpd_d2_s1 |" in md and "| PushCube-v1 | rlpd:2 |" in md
    assert md.count(" | budget | ") == 2 and md.count(" CPU cores, JAX on cpu |") == 2  # how it ended, where it ran
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 10_000
    assert set(json.loads((tmp_path / "out" / "tiny.json").read_text())["curves"]) == {"PickCube-v1 rlpd:2",
                                                                                        "PushCube-v1 rlpd:2"}
    # the same grid again: nothing is rerun or touched
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("suite_*/**/*") if p.is_file()}
    suite.run_grid(args, suite.grid(args))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("suite_*/**/*") if p.is_file()} == before
    # a run folder gone (another machine, a wiped disk): its row and curve stay, from the previous report
    shutil.rmtree(tmp_path / "runs" / "suite_PushCube_rlpd_d2_s1")
    again = suite.report(args, suite.grid(args))["rows"]
    assert [{k: r[k] for k in ("task", "final_step", "final_success", "ended", "machine")} for r in again] == \
        [{k: r[k] for k in ("task", "final_step", "final_success", "ended", "machine")} for r in rows]
    assert (tmp_path / "out" / "tiny.md").read_text() == md
    (tmp_path / "out" / "tiny.json").unlink()  # and without a previous report it drops out
    assert [r["task"] for r in suite.report(args, suite.grid(args))["rows"]] == ["PickCube-v1"]


def test_a_checkpointed_job_stops_its_run_and_the_requeued_job_resumes_it(demo_path, tmp_path):
    """What submitit does shortly before a Slurm time limit: job.checkpoint() (the run gets SIGTERM, saves its
    resume state), then the returned submission runs again in a new job and resumes the run to its budget."""
    spec = suite.RunSpec("rfcl", "PickCube-v1", 2, 1, 1200, [*TINY, "--num-seed-steps=100000", "--eval-freq=300"])
    run_dir = tmp_path / "runs" / "suite_job"
    job = suite.Job(spec, run_dir, tmp_path / "job.log")
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, job)))
    thread.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list(run_dir.glob("events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(0.5)
    t0 = time.time()
    requeued = job.checkpoint()  # SIGTERM to the run's process group, env workers included, as Slurm sends it
    stop_seconds = time.time() - t0
    thread.join(timeout=120)
    assert "exited 143" in str(errors[0].value), "the run stopped on SIGTERM"
    assert stop_seconds < 30, stop_seconds
    stopped = json.loads((run_dir / "summary.json").read_text())
    step = stopped["global_step"]
    assert stopped["stopped_by"] == "SIGTERM" and 0 < step < 1200 and stopped["stage"] == 1
    first = (tmp_path / "job.log").read_text()
    assert "Traceback" not in first
    assert f"stopped by SIGTERM at env step {step}; continue with: python rfcl.py --resume runs/suite_job" in first
    assert (run_dir / "checkpoints" / f"step_{step:08d}.ckpt").exists() and (run_dir / "resume.state").exists()
    assert requeued.function.spec.command(run_dir)[2:4] == ["--resume", str(run_dir)]
    requeued.function()  # the new job
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["global_step"] == 1200 and done["stopped_by"] is None
    log = (tmp_path / "job.log").read_text()
    assert log.count("\n$ ") == 2 and "--resume" in log.split("\n$ ")[2] and "Traceback" not in log
    assert json.loads((run_dir / "args.json").read_text())["total_timesteps"] == 1200
    scalars = read_scalars(run_dir)
    for tag in ("charts/SPS", "curriculum/start_step_frac_mean", "eval/success_at_end"):
        steps = [s for s, _ in scalars[tag]]
        assert steps == sorted(set(steps)) and steps[-1] > step, f"{tag}: a step twice, out of order, or none after"
        if tag != "eval/success_at_end":  # eval every 300 steps may not have come before the stop
            assert any(s <= step for s in steps), tag
    log_steps = [s for s, _ in scalars["charts/SPS"]]
    assert max(np.diff(log_steps)) <= 32 + 1, "no gap in the logged series across the resume"


def test_a_run_that_fails_is_one_line_and_the_others_still_report(demo_path, tmp_path, capsys, monkeypatch):
    """The local executor: a run that exits non-zero (here: a flag its script does not know) is named in one line
    with its log, the grid's other run still runs and the report is still drawn; then suite.py exits with an error."""
    args = suite.Args(configs=["rlpd:2"], env_ids=["PickCube-v1"], seeds=[1, 2], total_timesteps=128, extra=TINY,
                      root=str(tmp_path), out=str(tmp_path / "out"), name="tiny")
    good, bad = suite.grid(args)
    bad.extra = [*bad.extra, "--no-such-flag"]
    monkeypatch.setattr(suite, "grid", lambda a: [good, bad])
    with pytest.raises(SystemExit) as stop:
        suite.main(args)
    out = capsys.readouterr().out
    assert "Traceback" not in out and "done: suite_PickCube_rlpd_d2_s1" in out
    assert str(stop.value) == (f"error: 1 of 2 runs did not finish:\n  suite_PickCube_rlpd_d2_s2: PickCube_rlpd_d2_s2 "
                               f"exited 2; see {tmp_path}/runs/suite_logs/suite_PickCube_rlpd_d2_s2.log")
    assert "--no-such-flag" in (tmp_path / "runs" / "suite_logs" / "suite_PickCube_rlpd_d2_s2.log").read_text()
    assert "| PickCube-v1 | rlpd:2 | suite_PickCube_rlpd_d2_s1 |" in (tmp_path / "out" / "tiny.md").read_text()


def test_the_papers_numbers_are_set_beside_each_seeds_and_marked_on_the_figure(tmp_path):
    """--paper: per task, each seed's steps to 0.9 (and their median), success at 1M and 2M, and stage-1 end beside
    the published numbers; only for the configs the paper's numbers are for; a bad file is one line."""
    from torch.utils.tensorboard import SummaryWriter

    def fake_run(seed, successes, stage1_end, ended_at):  # evals every 100k env steps
        run = tmp_path / "runs" / f"cpu_PickCube_rfcl_d5_s{seed}"
        w = SummaryWriter(str(run))
        w.add_scalar("curriculum/stage1_end_step", stage1_end, stage1_end)
        for i, s in enumerate(successes, 1):
            w.add_scalar("eval/success_at_end", s, i * 100_000)
            w.add_scalar("eval/success_once", s, i * 100_000)
            w.add_scalar("charts/SPS", 100.0, i * 100_000)
        w.close()
        if ended_at:  # else still running: no summary yet
            (run / "summary.json").write_text(json.dumps({"global_step": ended_at, "stopped_by": None}))

    fake_run(1, [0.1, 0.5, 0.9, 0.95, 0.9, 0.9, 0.95, 0.95, 0.9, 0.97], 120_000, 1_000_000)
    fake_run(2, [0.0, 0.2, 0.4, 0.6, 0.92, 0.8, 0.9, 0.9, 0.93, 0.88, 0.9, 0.9, 0.9, 0.9, 0.96], 210_000, None)
    args = suite.Args(configs=["rfcl:5", "rlpd:100"], env_ids=["PickCube-v1"], seeds=[1, 2], prefix="cpu",
                      total_timesteps=2_000_000, executor="none", root=str(tmp_path), out=str(tmp_path / "out"),
                      name="vs", paper=str(ROOT / "benchmarks" / "paper_rfcl.json"))
    suite.main(args)
    md = (tmp_path / "out" / "vs.md").read_text()
    assert ("| PickCube-v1 | rfcl:5 | 2 | 300k, 500k; median 400k | ~300k | 0.97, 0.88 | ~0.98 | "
            "ended: 0.97 at 1.00M, not yet: 0.96 at 1.50M | ~0.98 | 120k, 210k; median 165k | ~120k |") in md, md
    beside = json.loads((tmp_path / "out" / "vs.json").read_text())["paper"]
    assert [(b["task"], b["config"]) for b in beside] == [("PickCube-v1", "rfcl:5")]
    assert (tmp_path / "out" / "vs.png").stat().st_size > 10_000

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"label": "x", "source": "y", "configs": [], "tasks": {"PickCube-v1": {"at_1M": 1}}}))
    with pytest.raises(SystemExit, match=r"^error: --paper .*bad.json: not a readable file of published numbers "
                                         r"\(PickCube-v1 has \['at_1M'\], not"):
        suite.main(suite.Args(executor="none", paper=str(bad), root=str(tmp_path)))


def test_a_run_whose_lock_holder_is_alive_here_is_reported_as_running(tmp_path):
    """A resumed run that is running now has the summary.json of its last stop: the report says "running now" from
    the lock file's holder (alive on this host, with the run's name on its command line), and goes back to the
    summary once that process is gone or the pid belongs to another command."""
    import socket
    import subprocess

    run = tmp_path / "runs" / "cpu_PickCube_rfcl_d5_s1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"global_step": 500, "stopped_by": "SIGTERM"}))
    (run / "resume.state").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--resume", str(run)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # until its exec, a child's command line is pytest's: wait for the holder's own (CI saw the race under load)
    deadline = time.time() + 30
    while str(run) not in Path(f"/proc/{holder.pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.time() < deadline, "the holder process never showed its command line"
        time.sleep(0.05)
    try:
        (run / ".lock").write_text(f"pid {holder.pid} on {socket.gethostname()} since 2026-11-30 10:00:00\n")
        assert suite.run_status(run)["ended"] == "running now"
        (run / ".lock").write_text(f"pid {other.pid} on {socket.gethostname()} since 2026-11-30 10:00:00\n")
        assert suite.run_status(run)["ended"] == "stopped (SIGTERM), resumable"
        (run / ".lock").write_text(f"pid {holder.pid} on another-host since 2026-11-30 10:00:00\n")
        assert suite.run_status(run)["ended"] == "stopped (SIGTERM), resumable"
    finally:
        for p in (holder, other):
            p.kill()
            p.wait()
    (run / ".lock").write_text(f"pid {holder.pid} on {socket.gethostname()} since 2026-11-30 10:00:00\n")
    assert suite.run_status(run)["ended"] == "stopped (SIGTERM), resumable"


def test_each_extra_flag_reaches_every_runs_command_line(tmp_path):
    """--extra is repeatable, one token each (a repeated list flag would otherwise keep only its last value and a run
    would silently go without the others): all of them, in order, end each new run's command line."""
    args = tyro.cli(suite.Args, args=["--configs", "rfcl:5", "--seeds", "1", "2", "--extra=--no-capture-video",
                                      "--extra=--control-mode", "--extra=pd_ee_delta_pose", "--target-success", "0.9",
                                      "--root", str(tmp_path)])
    for spec in suite.grid(args):
        cmd = spec.command(suite.run_dir(args, spec))
        assert cmd[-5:] == ["--no-capture-video", "--control-mode", "pd_ee_delta_pose", "--target-success", "0.9"]
