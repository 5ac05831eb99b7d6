"""--sim-config: ManiSkill's simulation settings as a run setting. It reaches every env a run builds (training, eval,
the demos' planner and their conversion, --evaluate, collect_demos.py, frontier.py), is recorded in the run's args,
checkpoints and demo files, and demos or checkpoints of other physics are refused with one line, never mixed in."""

import json
import shutil

import jax
import pytest

import common
import demo_making
import rfcl
import run_files
import vector_env
from conftest import CONTROL_MODE, ENV_ID, OBS_MODE, ROOT, error_line, one_line, run_script

FAST = {"sim_freq": 200, "scene_config": {"solver_position_iterations": 20},
        "default_materials_config": {"static_friction": 0.8, "dynamic_friction": 0.8}}


def test_names_and_json_are_checked_as_maniskill_checks_them():
    assert vector_env.sim_config(None) == {} == vector_env.sim_config("default")
    assert vector_env.sim_config("ms2") == {"sim_freq": 500, "scene_config": {"solver_position_iterations": 25},
                                            "default_materials_config": {"static_friction": 1.0,
                                                                         "dynamic_friction": 1.0}}
    assert vector_env.sim_config(json.dumps(FAST)) == FAST
    assert one_line(lambda: vector_env.sim_config("ms3")).startswith(
        "error: --sim-config takes default or ms2 or a JSON object of ManiSkill's SimConfig fields")
    assert one_line(lambda: vector_env.sim_config("[500]")).startswith("error: --sim-config takes")
    assert "sim_frq" in one_line(lambda: vector_env.sim_config('{"sim_frq": 500}'))
    assert "solver_iterations" in one_line(
        lambda: vector_env.sim_config('{"scene_config": {"solver_iterations": 25}}'))
    assert one_line(lambda: vector_env.sim_config('{"sim_freq": 130}')) == (
        "error: --sim-config: sim_freq (130) must be a positive multiple of control_freq (20)")


def test_the_settings_reach_the_simulator():
    env = vector_env.CPUWorkerEnv(ENV_ID, vector_env.env_kwargs(OBS_MODE, CONTROL_MODE, 1, "physx_cpu",
                                                                sim_config=vector_env.sim_config("ms2")))
    try:
        u = env.unwrapped
        assert (u.sim_freq, u.control_freq) == (500, 20)
        assert u.sim_config.scene_config.solver_position_iterations == 25
        assert u.sim_config.default_materials_config.static_friction == 1.0
        assert env.spec.kwargs["sim_config"] == vector_env.sim_config("ms2")  # what a recorded demo file keeps
    finally:
        env.close()
    assert "sim_config" not in vector_env.env_kwargs(OBS_MODE, CONTROL_MODE, 1, "physx_cpu", sim_config={})


@pytest.fixture(scope="module")
def fast_demos(asset_dir):
    """PickCube demos planned and converted under FAST physics, into the session's demo folder."""
    return demo_making.get_demos(ENV_ID, OBS_MODE, CONTROL_MODE, 1, sim_config=FAST)


def test_demos_are_planned_converted_recorded_and_found_per_physics(fast_demos, demo_path):
    raw = fast_demos.with_name(fast_demos.name.split(".")[0] + ".h5")
    for f in (raw, fast_demos):  # the planner's file and the converted one: both made, and recorded, under FAST
        assert common.file_sim_config(json.loads(f.with_suffix(".json").read_text())) == FAST
    assert common.find_demo_file(ENV_ID, OBS_MODE, CONTROL_MODE, 1, FAST) == fast_demos
    assert common.find_demo_file(ENV_ID, OBS_MODE, CONTROL_MODE, 1) == demo_path  # the task's own physics
    assert common.find_demo_file(ENV_ID, OBS_MODE, CONTROL_MODE, 1, vector_env.sim_config("ms2")) is None
    common.load_demos(fast_demos, 1, ENV_ID, OBS_MODE, CONTROL_MODE, sim_config=FAST)
    with pytest.raises(common.DemoError) as e:
        common.load_demos(demo_path, 1, ENV_ID, OBS_MODE, CONTROL_MODE, sim_config=FAST)
    assert str(e.value).startswith(f"{demo_path} was recorded under the physics the task's own (no --sim-config), the "
                                   f"run simulates {json.dumps(FAST, sort_keys=True)}: demos of other physics are not "
                                   f"mixed in")


def test_a_run_its_checkpoint_and_every_tool_keep_the_physics(fast_demos, demo_path, tmp_path, monkeypatch):
    """A run under FAST: training and eval envs built with it, its args and checkpoint record it; --evaluate,
    collect_demos.py and frontier.py simulate with the checkpoint's physics; other physics is one line."""
    built = []
    make_envs = vector_env.make_envs

    def spy(*a, **k):
        built.append(k.get("sim_config", a[6] if len(a) > 6 else None))
        return make_envs(*a, **k)

    monkeypatch.setattr(vector_env, "make_envs", spy)
    monkeypatch.chdir(tmp_path)
    flags = ["--num-demos", "1", "--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1",
             "--total-timesteps", "40", "--num-seed-steps", "20", "--eval-freq", "40", "--log-freq", "20",
             "--grad-updates-per-step", "1", "--batch-size", "8", "--hidden-dims", "16", "--max-episode-steps", "10",
             "--no-capture-video", "--num-seeds", "5"]
    rfcl.main(rfcl.parse_args([*flags, "--exp-name", "fast", "--sim-config", json.dumps(FAST)]))
    assert built == [FAST, FAST], "training and eval envs"
    run_dir = tmp_path / "runs" / "fast"
    assert json.loads((run_dir / "args.json").read_text())["sim_config"] == json.dumps(FAST)
    ckpt_path = run_dir / "checkpoints" / "final.ckpt"
    assert run_files.checkpoint_sim_config(run_files.load_checkpoint(str(ckpt_path))) == FAST

    # other physics than the demos' or the checkpoint's: one line, nothing built or written
    assert one_line(lambda: rfcl.main(rfcl.parse_args([*flags, "--exp-name", "x", "--dataset-path",
                                                            str(demo_path), "--sim-config", json.dumps(FAST)]))
                         ).startswith(f"error: {demo_path} was recorded under the physics the task's own")
    assert one_line(lambda: rfcl.main(rfcl.parse_args(["--evaluate", "--checkpoint", str(ckpt_path),
                                                            "--exp-name", "y"]))) == (
        f"error: {ckpt_path} was trained under the physics {json.dumps(FAST, sort_keys=True)}, not the task's own (no "
        f"--sim-config); pass the same --sim-config")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fast"]
    built.clear()
    rfcl.main(rfcl.parse_args(["--evaluate", "--checkpoint", str(ckpt_path), "--exp-name", "ev", "--sim-config",
                               json.dumps(FAST), "--num-eval-envs", "1", "--num-eval-episodes", "1",
                               "--no-capture-video"]))
    assert built == [FAST]
    monkeypatch.undo()

    # collect_demos.py: its file records the checkpoint's physics, so common finds it only for that physics
    out = tmp_path / "collected"
    run_script([str(ROOT / "collect_demos.py"), str(ckpt_path), "--num-envs", "1", "--num-episodes", "1",
                "--no-only-successful", "--output-dir", str(out)], tmp_path)
    (h5,) = out.glob("*.h5")
    assert common.file_sim_config(json.loads(h5.with_suffix(".json").read_text())) == FAST
    # frontier.py: the checkpoint's physics and its demos (a default-physics file is refused)
    probe = run_script([str(ROOT / "benchmarks" / "frontier.py"), str(ckpt_path), "--every", "60", "--out",
                        str(tmp_path / "probe")], tmp_path)
    assert json.loads((tmp_path / "probe.json").read_text())["dataset"] == str(fast_demos), probe.stdout[-500:]
    bad = run_script([str(ROOT / "benchmarks" / "frontier.py"), str(ckpt_path), "--dataset-path", str(demo_path)],
                     tmp_path, check=False)
    assert bad.returncode != 0 and error_line(bad).startswith(f"error: {demo_path} was recorded under the physics")


def test_a_checkpoint_from_before_the_flag_is_the_tasks_own_physics(tmp_path):
    args = rfcl.Args(max_episode_steps=12)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    meta = rfcl.checkpoint_meta(args, 42, 8)
    assert meta["sim_config"] == {}
    del meta["sim_config"]
    run_files.save_checkpoint(tmp_path / "old.ckpt", meta, rfcl.networks(state), 0)
    ckpt = run_files.load_run_checkpoint(str(tmp_path / "old.ckpt"), ENV_ID, OBS_MODE, CONTROL_MODE, {},
                                           rfcl.SCRIPT)
    assert run_files.checkpoint_sim_config(ckpt) == {}
    shutil.rmtree(tmp_path)
