"""rfcl.py end to end on real ManiSkill (CPU), run as a user runs it."""

import importlib.util
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, error_line, interrupted, read_scalars, run_script

TINY = ["--num-demos", "2", "--total-timesteps", "480", "--num-seed-steps", "160", "--num-envs", "2",
        "--num-eval-envs", "2", "--num-eval-episodes", "2", "--eval-freq", "240", "--log-freq", "64",
        "--save-freq", "320", "--max-episode-steps", "20", "--steps-per-env", "4", "--grad-updates-per-step", "4",
        "--render-size", "64", "--num-seeds", "20"]


@pytest.fixture(scope="module")
def tiny_run(demo_path, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("rfcl_run")
    proc = run_script([str(ROOT / "rfcl.py"), "--exp-name", "tiny", *TINY], cwd)
    return cwd, cwd / "runs" / "tiny", proc


def test_short_run_writes_events_video_args_and_checkpoints(tiny_run):
    cwd, run_dir, proc = tiny_run
    args = json.loads((run_dir / "args.json").read_text())
    assert args["env_id"] == "PickCube-v1" and args["num_demos"] == 2
    scalars = read_scalars(run_dir)
    for tag in ("charts/SPS", "charts/episodic_return", "losses/qf_loss", "losses/actor_loss", "losses/alpha",
                "eval/success_once", "eval/success_at_end", "eval/return", "curriculum/stage",
                "curriculum/reverse_solved_frac", "curriculum/start_step_frac_mean", "curriculum/seeds_on_edge_frac"):
        assert tag in scalars, f"missing tensorboard tag {tag}"
    assert [s for s, _ in scalars["eval/success_at_end"]] == [240, 480], "eval against env steps"
    assert scalars["curriculum/start_step_frac_mean"][0][1] == 1.0, "the frontier starts at the demos' ends"
    videos = sorted((run_dir / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["eval_00000240.mp4", "eval_00000480.mp4"]
    assert all(v.stat().st_size > 1000 for v in videos)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["final.ckpt", "step_00000320.ckpt"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 480


def test_evaluate_loads_the_checkpoint_and_reports_success(tiny_run):
    cwd, run_dir, _ = tiny_run
    proc = run_script([str(ROOT / "rfcl.py"), "--evaluate", "--checkpoint", str(run_dir / "checkpoints/final.ckpt"),
                       "--exp-name", "tiny_eval", "--num-eval-envs", "2", "--num-eval-episodes", "2",
                       "--max-episode-steps", "10", "--render-size", "64"], cwd)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"eval/success_once", "eval/success_at_end", "eval/return"}
    assert 0.0 <= metrics["eval/success_at_end"] <= 1.0 and metrics["eval/episodes"] == 2
    assert (cwd / "runs" / "tiny_eval" / "videos" / "eval.mp4").exists()


def test_an_existing_run_directory_is_never_overwritten(tiny_run):
    cwd, run_dir, _ = tiny_run
    before = {p: p.stat().st_mtime for p in run_dir.rglob("*")}
    proc = run_script([str(ROOT / "rfcl.py"), "--exp-name", "tiny", *TINY], cwd, check=False)
    assert proc.returncode != 0
    assert error_line(proc) == ("error: run directory runs/tiny already exists; pass another --exp-name "
                                "(nothing was overwritten)")
    assert {p: p.stat().st_mtime for p in run_dir.rglob("*")} == before


def test_bad_input_errors_are_one_line(tiny_run, demo_path, tmp_path, monkeypatch):
    """Each case as `python rfcl.py ...` would run it, in this process (the message is what sys.exit prints;
    the subprocess test above shows the same path ends in one line on stderr)."""
    import rfcl

    cwd, run_dir, _ = tiny_run
    monkeypatch.chdir(cwd)
    cases = [
        (["--env-id", "PickCub-v1"], "error: unknown env id 'PickCub-v1': Environment `PickCub` doesn't exist. "
                                     "Did you mean: `PickCube`?"),
        (["--env-id", "CartPole-v1"], "error: CartPole-v1 is a gymnasium env but not a ManiSkill one"),
        (["--dataset-path", str(demo_path), "--num-demos", "500"], "error: --num-demos 500 but"),
        (["--dataset-path", str(tmp_path / "missing.h5")], "error: demo file"),
        (["--evaluate", "--checkpoint", str(tmp_path / "none.ckpt")], "error: checkpoint"),
        (["--evaluate", "--checkpoint", str(run_dir / "checkpoints/final.ckpt"), "--env-id", "StackCube-v1"],
         "error: " + str(run_dir / "checkpoints/final.ckpt") + " was trained with --env-id PickCube-v1"),
        (["--exp-name", "../../escaped"], "error: --exp-name must be a plain name (a folder under runs/)"),
        (["--exp-name", str(tmp_path / "abs")], "error: --exp-name must be a plain name (a folder under runs/)"),
        (["--total-timesteps", "0"], "error: --total-timesteps must be >= 1, got 0"),
        (["--num-envs", "0"], "error: --num-envs must be >= 1, got 0"),
        (["--eval-freq", "0"], "error: --eval-freq must be >= 1, got 0"),
        (["--gamma", "1.5"], "error: --gamma must be in [0, 1), got 1.5"),
        (["--gamma", "-0.1"], "error: --gamma must be in [0, 1), got -0.1"),
        (["--tau", "0"], "error: --tau must be in (0, 1], got 0.0"),
        (["--learning-rate", "0"], "error: --learning-rate must be > 0, got 0.0"),
        (["--init-temperature", "0"], "error: --init-temperature must be > 0, got 0.0"),
        (["--hidden-dims"], "error: --hidden-dims takes one or more values, each >= 1, got none"),
        (["--hidden-dims", "64", "0"], "error: --hidden-dims takes one or more values, each >= 1, got 64 0"),
        (["--buffer-size", "10"], "error: --buffer-size 10 is smaller than --num-seed-steps 5000: updates start only"),
        (["--render-size", "0"], "error: --render-size must be >= 1 with videos, got 0 (or pass --no-capture-video)"),
        (["--demo-horizon-to-max-steps-ratio", "0"], "error: --demo-horizon-to-max-steps-ratio must be > 0, got 0.0"),
        (["--num-seeds", "0"], "error: --num-seeds must be >= 1, got 0"),
        (["--preset", "sample-efficient", "--num-qs", "1"], "error: --num-min-qs must be in 1..--num-qs (1), got 2 "
                                                            "(--preset sample-efficient's value unless given); pass "
                                                            "--num-min-qs with a value up to 1"),
        (["--plr-staleness-coef", "1.5"], "error: --plr-staleness-coef must be in [0, 1], got 1.5"),
        (["--env-id", "PickSingleYCB-v1", "--sim-backend", "gpu", "--num-envs", "4"],
         "error: PickSingleYCB-v1 draws each episode's scene (objects, sizes) from its seed, while a GPU-batched env"),
        (["--env-id", "PegInsertionSide-v1", "--sim-backend", "gpu", "--num-envs", "4"],  # its peg and hole sizes
         "error: PegInsertionSide-v1 draws each episode's scene (objects, sizes) from its seed"),
    ]
    if not torch.cuda.is_available():  # with CUDA this would start a real 1M-step GPU run
        cases.append((["--sim-backend", "gpu"], "error: GPU simulation needs CUDA; use --sim-backend cpu"))
    if importlib.util.find_spec("wandb") is None:
        cases.append((["--track"], "error: --track needs Weights & Biases: pip install wandb"))
    for i, (extra, start) in enumerate(cases):
        with pytest.raises(SystemExit) as e:
            rfcl.main(rfcl.parse_args(["--exp-name", f"bad{i}", *extra]))
        line = str(e.value.code)
        assert line.startswith(start) and "\n" not in line, (extra, line)
        assert not (cwd / "runs" / f"bad{i}").exists(), "a rejected command leaves no run directory behind"
    assert {p.name for p in (cwd / "runs").iterdir()} <= {"tiny", "tiny_eval"}
    assert not (tmp_path / "abs").exists() and not (cwd.parent / "escaped").exists()


def test_reset_to_a_demo_state_gives_the_demo_observation(demo_path):
    """The CPU worker starts from the (demo, t) state rfcl.demo_state gives it and returns the demo's recorded
    observation; the simulator state matches it (all but the contact flag, which the next physics step refreshes)."""
    import common
    import rfcl
    import vector_env

    demos = common.load_demos(demo_path, 2)
    env = vector_env.CPUWorkerEnv("PickCube-v1", vector_env.env_kwargs("state", "pd_joint_delta_pos", 1, "physx_cpu"), 1)
    try:
        for i in range(2):
            for t in (0, 10, len(demos.traj_obs[i]) - 1):
                obs, _ = env.reset(seed=demos.episodes[i]["episode_seed"],
                                   options={"states": [None, rfcl.demo_state(demos, i, t)]})
                np.testing.assert_array_equal(obs, demos.traj_obs[i][t])
                sim_obs = env.unwrapped.get_obs().cpu().numpy()[0]
                diff = np.abs(sim_obs - demos.traj_obs[i][t])
                diff[18] = 0  # is_grasped
                assert diff.max() < 1e-4
                # one demo action from here reproduces the demo's next observation
                if t < len(demos.traj_obs[i]) - 1:
                    k = int(np.flatnonzero(demos.traj_end)[i - 1] + 1 if i else 0) + t
                    nxt, *_ = env.step(demos.actions[k])
                    np.testing.assert_allclose(nxt, demos.traj_obs[i][t + 1], atol=2e-3)
    finally:
        env.close()


def test_ctrl_c_sigterm_and_sighup_are_the_same_stop_request_and_a_third_one_stops_at_once():
    import stop_signals

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        stop = stop_signals.StopRequest()
        try:
            assert not stop
            os.kill(os.getpid(), sig)
            assert stop and stop.name == sig.name and stop.exit_code == 128 + sig
            os.kill(os.getpid(), sig)  # the second: the save goes on
            assert stop.count == 2
            with pytest.raises(SystemExit) as e:
                os.kill(os.getpid(), sig)
            assert e.value.code == 128 + sig
        finally:
            stop.restore()


def test_the_render_device_warning_is_printed_once_at_most(tiny_run):
    """Only eval env 0 renders (the videos); the other env processes have no renderer, so no warning of its own."""
    _, _, proc = tiny_run
    assert proc.stderr.count("Requested to use render device") <= 1, proc.stderr[-2000:]


def started(proc, path, timeout=240) -> None:
    """Wait for `path` to appear while `proc` runs."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


def stopped(proc, sig, within=60) -> tuple[int, str]:
    """Send `sig` and return (exit code, last stderr line) once it exits, which must be within `within` seconds."""
    import subprocess

    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{sig.name} did not stop it within {within} s") from None
    return proc.returncode, [line for line in err.splitlines() if line.strip()][-1]


def spawn(args, cwd):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, str(ROOT / "rfcl.py"), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "kill"])
@pytest.mark.parametrize("after", [1.0, 8.0], ids=["imports", "env-workers"])
def test_a_stop_signal_during_start_up_exits_at_once_with_one_line_and_leaves_nothing(sig, group, after, tiny_run):
    """During the imports (1 s in: JAX, torch and ManiSkill take seconds, and they used to turn Ctrl-C into a
    traceback or drop it, training on) and while the env workers are being built (8 s in): nothing is written yet,
    so it exits at once with one line, its env workers with it, and the name is free for the rerun. Ctrl-C goes to
    the whole process group, as a terminal sends it; `kill` to the process."""
    cwd, _, _ = tiny_run
    name = f"early_{sig.name}_{after:.0f}"
    code, lines = interrupted([str(ROOT / "rfcl.py"), "--exp-name", name, *TINY], cwd, sig, after=after, group=group,
                              within=30)
    assert (code, [line for line in lines if "WARNING" not in line]) == (128 + sig, [f"stopped by {sig.name}"])
    assert not (cwd / "runs" / name).exists()


def test_ctrl_c_stops_an_evaluation_and_leaves_no_half_made_run(tiny_run):
    """--evaluate used to ignore Ctrl-C and SIGTERM (gymnasium builds one env in the main process, whose worker
    set-up ignored both there); now it stops at once and removes the run directory it had begun."""
    cwd, run_dir, _ = tiny_run
    proc = spawn(["--evaluate", "--checkpoint", str(run_dir / "checkpoints/final.ckpt"), "--exp-name", "long_eval",
                  "--num-eval-envs", "2", "--num-eval-episodes", "400", "--no-capture-video"], cwd)
    started(proc, cwd / "runs" / "long_eval" / "args.json")
    time.sleep(1)  # into the episodes: a step is mostly pending in the workers, and closing them used to warn of it
    code, line = stopped(proc, signal.SIGINT, within=30)
    assert (code, line) == (130, "stopped by SIGINT")
    assert not (cwd / "runs" / "long_eval").exists()


def test_a_run_directory_has_one_writer(tiny_run, tmp_path, monkeypatch):
    """A second process meets the first's lock with one line naming it (a requeued Slurm job whose predecessor has
    not exited, a run started twice); the lock goes with the process that held it."""
    import subprocess
    import sys

    import rfcl
    import run_files

    cwd, run_dir, _ = tiny_run
    holder = subprocess.Popen([sys.executable, "-c", f"import run_files, pathlib, time; "
                               f"run_files.lock_run_dir(pathlib.Path({str(run_dir)!r})); print('locked', flush=True); "
                               f"time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as e:
            rfcl.main(rfcl.parse_args(["--resume", str(run_dir), "--total-timesteps", "960"]))
        assert str(e.value.code).startswith(f"error: {run_dir} is in use by pid {holder.pid} on ")
        assert str(e.value.code).endswith("wait for it to end or stop it (Ctrl-C or kill: it saves and exits), "
                                          "then run this again")
    finally:
        holder.kill()
        holder.wait()
    # two new runs with one name: the one that finds the directory made meanwhile stops with one line
    made = tmp_path / "runs" / "twice"
    made.mkdir(parents=True)
    with pytest.raises(SystemExit, match="was just made by another process; pass another --exp-name"):
        run_files.make_run_dir(made, {})
    run_files.lock_run_dir(run_dir)  # the holder's lock went with it
    run_files._LOCKS.pop().close()
