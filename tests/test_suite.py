"""benchmarks/suite.py: a tiny grid through submitit's local executor (the Slurm path's code), reuse of finished
runs, and the checkpoint-and-requeue path that a Slurm time limit takes."""

import json
import sys
import threading
import time

import pytest

from conftest import ROOT

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
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 10_000
    assert set(json.loads((tmp_path / "out" / "tiny.json").read_text())["curves"]) == {"PickCube-v1 rlpd:2",
                                                                                        "PushCube-v1 rlpd:2"}
    # the same grid again: nothing is rerun or touched
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("suite_*/**/*") if p.is_file()}
    suite.run_grid(args, suite.grid(args))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("suite_*/**/*") if p.is_file()} == before


def test_a_checkpointed_job_stops_its_run_and_the_requeued_job_resumes_it(demo_path, tmp_path):
    """What submitit does shortly before a Slurm time limit: job.checkpoint() (the run gets SIGTERM, saves its
    resume state), then the returned submission runs again in a new job and resumes the run to its budget."""
    spec = suite.RunSpec("rfcl", "PickCube-v1", 2, 1, 3000, [*TINY, "--num-seed-steps=100000"])
    run_dir = tmp_path / "runs" / "suite_job"
    job = suite.Job(spec, run_dir, tmp_path / "job.log")
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, job)))
    thread.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list(run_dir.glob("events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(0.5)
    requeued = job.checkpoint()
    thread.join(timeout=120)
    assert "exited 143" in str(errors[0].value), "the run stopped on SIGTERM"
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and 0 < stopped["global_step"] < 3000
    assert (run_dir / "resume.state").exists()
    assert requeued.function.spec.command(run_dir)[2:4] == ["--resume", str(run_dir)]
    requeued.function()  # the new job
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["global_step"] == 3000 and done["stopped_by"] is None
    log = (tmp_path / "job.log").read_text()
    assert log.count("\n$ ") == 2 and "--resume" in log.split("\n$ ")[2]
