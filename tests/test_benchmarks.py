"""benchmarks/learning.py: log parsing, time-to-threshold and plotting on synthetic runs (real tensorboard writer)."""

import json
import shutil
import signal
import sys

import numpy as np
import pytest
import tyro

from conftest import ROOT, interrupted

sys.path.insert(0, str(ROOT / "benchmarks"))
import learning  # noqa: E402


def write_run(path, successes, step=10_000, t0=1_000_000.0, seconds_per_eval=100.0, once=None, stopped=(0, 0.0)):
    """Evals every `step` env steps, `seconds_per_eval` of training apart; SPS as the scripts log it (env steps over
    the run's own clock). stopped=(i, s): the run was stopped for s seconds after eval i, then resumed."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(path))
    w.add_scalar("charts/SPS", 0.0, 0, walltime=t0)
    for i, s in enumerate(successes, 1):
        wall = t0 + i * seconds_per_eval + (stopped[1] if stopped[0] and i > stopped[0] else 0.0)
        w.add_scalar("eval/success_at_end", s, i * step, walltime=wall)
        if once is not None:
            w.add_scalar("eval/success_once", once[i - 1], i * step, walltime=wall)
        w.add_scalar("charts/SPS", i * step / (i * seconds_per_eval + 0.5 * i), i * step, walltime=wall)
    w.close()
    return path


def test_read_run_and_first_reach(tmp_path):
    c = learning.read_run(write_run(tmp_path / "a", [0.0, 0.3, 0.6, 0.95, 0.88]))
    assert c["steps"].tolist() == [10_000, 20_000, 30_000, 40_000, 50_000]
    np.testing.assert_allclose(c["wall_s"], [100.5, 201, 301.5, 402, 502.5], atol=1e-3)  # the run's own clock
    assert c["sps"] == pytest.approx(10_000 / 100.5)
    assert learning.first_reach(c["steps"], c["success"], c["wall_s"], 0.5) == (30_000, pytest.approx(301.5, abs=1e-3))
    assert learning.first_reach(c["steps"], c["success"], c["wall_s"], 0.9)[0] == 40_000
    assert learning.first_reach(c["steps"], c["success"], c["wall_s"], 0.99) == (None, None)


def test_the_time_a_run_was_stopped_is_not_training_time(tmp_path):
    resumed = learning.read_run(write_run(tmp_path / "a", [0.1, 0.5, 0.9], stopped=(1, 86_400.0)))
    np.testing.assert_allclose(resumed["wall_s"], [100.5, 201, 301.5], atol=1e-3)


def test_summary_and_table_count_seeds_that_reach_the_target(tmp_path):
    curves = [learning.read_run(write_run(tmp_path / "a", [0.2, 0.9, 1.0])),
              learning.read_run(write_run(tmp_path / "b", [0.0, 0.4, 0.6]))]
    s = learning.summarise(curves)
    assert s["seeds_reaching_0.9"] == 1 and s["num_runs"] == 2
    assert s["mean_final_success"] == pytest.approx(0.8)
    assert s["runs"][1]["steps_to_0.5"] == 30_000 and s["runs"][1]["steps_to_0.9"] is None
    md = learning.markdown(s, "rfcl")
    assert "| a | 20,000 | 20,000 | 201 s | 1.00 at 30,000 | 100 |" in md
    assert "| b | 30,000 | not reached | not reached | 0.60 at 30,000 | 100 |" in md


def test_both_success_metrics_are_tabulated_where_the_runs_logged_both(tmp_path):
    curves = [learning.read_run(write_run(tmp_path / "a", [0.2, 0.6, 0.8], once=[0.5, 0.9, 1.0]))]
    s = learning.summarise(curves)
    r = s["runs"][0]
    assert (r["steps_to_0.5"], r["steps_to_0.9"], r["once_steps_to_0.5"], r["once_steps_to_0.9"]) == \
        (20_000, None, 10_000, 20_000)
    assert r["final_success_once"] == 1.0
    md = learning.markdown(s, "rfcl")
    assert "success_once: steps to 0.5 | to 0.9 | final |" in md
    assert "| a | 20,000 | not reached | not reached | 0.80 at 30,000 | 10,000 | 20,000 | 1.00 | 100 |" in md


def test_a_run_without_evals_is_a_clear_error(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "empty"))
    w.add_scalar("charts/SPS", 1.0, 0)
    w.close()
    with pytest.raises(ValueError, match="has no eval/success_at_end events"):
        learning.read_run(tmp_path / "empty")


def test_plot_writes_a_png_of_the_expected_size(tmp_path):
    from PIL import Image

    curves = [learning.read_run(write_run(tmp_path / f"r{i}", np.linspace(0, 1, 8) ** (i + 1))) for i in range(3)]
    out = tmp_path / "plot.png"
    learning.plot({"rfcl": curves, "rlpd": curves[:1]}, out)
    img = Image.open(out)
    assert img.size == (1100, 400)
    assert len(np.unique(np.asarray(img.convert("L")))) > 10, "not a blank image"


def test_throughput_loop_split_uses_only_the_window_after_warmup(tmp_path):
    """The scripts log cumulative time fractions; the split must be that of the window, not since the start."""
    import throughput
    from torch.utils.tensorboard import SummaryWriter

    # 0..10k steps: 100 s, all simulation (seed steps). 10k..20k: 200 s = 50 s sim, 140 s updates, 10 s other
    w = SummaryWriter(str(tmp_path / "run"))
    for step, elapsed, sim, upd in ((5_000, 50.0, 50.0, 0.0), (10_000, 100.0, 100.0, 0.0),
                                    (20_000, 300.0, 150.0, 140.0)):
        w.add_scalar("charts/SPS", step / elapsed, step)
        w.add_scalar("time/simulation_frac", sim / elapsed, step)
        w.add_scalar("time/update_frac", upd / elapsed, step)
        w.add_scalar("time/eval_frac", 0.0, step)
    w.close()
    split = throughput.loop_split(tmp_path / "run", warmup_steps=10_000)
    assert (split["from_step"], split["to_step"]) == (10_000, 20_000)
    assert split["env_steps_per_s"] == pytest.approx(50.0)
    assert split["simulation_frac"] == pytest.approx(0.25)
    assert split["update_frac"] == pytest.approx(0.70)
    assert split["other_frac"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="fewer than two log points"):
        throughput.loop_split(tmp_path / "run", warmup_steps=15_000)


def test_compare_draws_configs_in_one_figure(tmp_path):
    write_run(tmp_path / "a", [0.2, 0.9])
    write_run(tmp_path / "b", [0.0, 0.4])
    args = learning.Args(compare=[f"one={tmp_path / 'a'}", f"two={tmp_path / 'b'}"], out=str(tmp_path / "out"),
                         name="cmp")
    learning.main(args)
    md = (tmp_path / "out" / "cmp.md").read_text()
    assert "### one" in md and "### two" in md and (tmp_path / "out" / "cmp.png").stat().st_size > 10_000
    kept = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert kept["two"]["curves"][0]["success"] == pytest.approx([0.0, 0.4]), "the curves survive the runs"
    with pytest.raises(SystemExit, match="LABEL=RUN"):
        learning.parse_compare(["no-equals-sign"])


def test_compare_draws_curves_kept_in_reports_of_runs_whose_folders_are_gone(tmp_path):
    write_run(tmp_path / "a", [0.2, 0.9])
    write_run(tmp_path / "b", [0.0, 0.4])
    learning.main(learning.Args(compare=[f"one={tmp_path / 'a'}", f"two={tmp_path / 'b'}"], out=str(tmp_path),
                                name="cmp"))
    suite = {"rows": [], "curves": {"StackCube-v1 rfcl:5": learning.curves_json([learning.read_run(tmp_path / "a")])}}
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    for d in ("a", "b"):
        shutil.rmtree(tmp_path / d)
    learning.main(learning.Args(compare=[f"first={tmp_path / 'suite.json'}#StackCube-v1 rfcl:5",
                                         f"second={tmp_path / 'cmp.json'}#two"], out=str(tmp_path), name="again"))
    kept = json.loads((tmp_path / "again.json").read_text())
    assert kept["first"]["curves"][0]["success"] == pytest.approx([0.2, 0.9])
    assert kept["second"]["curves"][0]["success"] == pytest.approx([0.0, 0.4])
    assert "### first" in (tmp_path / "again.md").read_text()
    with pytest.raises(SystemExit, match="keeps no curves under 'three'; it has: 'one', 'two'"):
        learning.main(learning.Args(compare=[f"x={tmp_path / 'cmp.json'}#three"], out=str(tmp_path), name="bad"))
    with pytest.raises(SystemExit, match="kept eval/success_at_end, not --tag charts/SPS"):
        learning.main(learning.Args(compare=[f"x={tmp_path / 'suite.json'}#StackCube-v1 rfcl:5"], tag="charts/SPS",
                                    out=str(tmp_path), name="bad"))


def test_each_extra_flag_reaches_the_scripts_command_line(tmp_path, monkeypatch):
    """--extra is repeatable, one token each: `--extra=--preset --extra=sample-efficient` passes both (a plain list
    flag keeps only its last value, and the script would get a stray positional)."""
    args = tyro.cli(learning.Args, args=["--seeds", "1", "--name", f"no_such_run_{tmp_path.name}",
                                         "--extra=--preset", "--extra=sample-efficient"])
    ran = []

    def fake_run(cmd, **kw):
        ran.append(cmd)
        raise KeyboardInterrupt  # stop before reading a run that was never made

    monkeypatch.setattr(learning.subprocess, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        learning.main(args)
    assert ran[0][-2:] == ["--preset", "sample-efficient"]


def test_frontier_probe_replaying_a_demo_succeeds_exactly_where_the_demo_does(demo_path, tmp_path):
    """benchmarks/frontier.py resets to demo states as stage 1 does: the demo's own actions from start t must first
    succeed after s* - t + 1 steps (s* = the demo's first successful step), when the time limit allows it."""
    import jax

    import common
    import frontier
    import rfcl
    import run_files

    args = rfcl.Args(num_demos=1, dataset_path=str(demo_path))
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "fresh.ckpt"
    run_files.save_checkpoint(ckpt, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    out = frontier.main(frontier.Args(str(ckpt), dataset_path=str(demo_path), every=3, demo_actions=True,
                                      out=str(tmp_path / "probe")))
    demos = common.load_demos(demo_path, 1)
    T, s_star = int(demos.lengths[0]), int(np.flatnonzero(demos.rewards[: demos.lengths[0]])[0])
    rows = out["rows"]
    assert [r["start"] for r in rows] == list(range(0, T, 3))
    for r in rows:
        need = max(s_star - r["start"], 0) + 1
        assert r["horizon"] == 16 + (T - r["start"]) // 3
        assert r["once"] == (need <= r["horizon"]), r
        assert r["first"] == (need if r["once"] else None), r
    assert any(r["once"] for r in rows) and not all(r["once"] for r in rows), "both cases are exercised"
    assert (tmp_path / "probe.md").read_text().count("\n| 0 |") == len(rows)
    # the run trained on this demo's scene, so every start is a seen one, pooled by quarter of the demo
    assert out["trained_seeds"] == [demos.episodes[0]["episode_seed"]]
    parts = frontier.by_part(out)
    assert [p["scene"] for p in parts] == ["seen"] * 4 and sum(p["starts"] for p in parts) == len(rows)
    assert parts[-1]["once"] == 1.0 and "| seen | 75-100% |" in (tmp_path / "probe.md").read_text()
    # all three demos of the file: the run's scene and two new ones, each measured from the seen one, in two halves
    out = frontier.main(frontier.Args(str(ckpt), dataset_path=str(demo_path), num_demos=3, every=40,
                                      demo_actions=True, out=str(tmp_path / "probe3")))
    near = {r["demo"]: r["nearest_seen"] for r in out["rows"]}
    assert near[0] == 0.0 and near[1] > 0 and near[2] > 0, near
    md = (tmp_path / "probe3.md").read_text()
    assert "| new, nearer half |" in md and "| new, farther half |" in md


def test_frontier_probe_pools_starts_by_part_of_the_demo_and_by_scene():
    """by_part: a start belongs to the quarter of its demo that start / T falls in, and to the run's seen scenes
    when its demo's seed is one the run trained on; the fractions are over exactly those starts."""
    import frontier

    def row(demo, seed, start, once, lined_up):
        return {"demo": demo, "seed": seed, "T": 100, "start": start, "once": once,
                "flags": {"is_peg_lined_up": lined_up}, "sto_once": 0.5 * once, "sto_flags": {"is_peg_lined_up": 1.0}}

    rows = [row(0, 7, 0, False, False), row(0, 7, 24, False, True), row(0, 7, 25, True, True), row(0, 7, 99, True, True),
            row(1, 9, 80, False, False), row(1, 9, 90, True, False), row(2, 11, 75, False, True)]
    parts = frontier.by_part({"rows": rows, "trained_seeds": [7]})
    got = {(p["scene"], p["part"]): (p["demos"], p["starts"], p["once"], p["flags"]["is_peg_lined_up"], p["sto_once"])
           for p in parts}
    assert got == {("seen", "0-25%"): (1, 2, 0.0, 0.5, 0.0), ("seen", "25-50%"): (1, 1, 1.0, 1.0, 0.5),
                   ("seen", "75-100%"): (1, 1, 1.0, 1.0, 0.5), ("new", "75-100%"): (2, 3, 1 / 3, 1 / 3, 1 / 6)}
    assert [p["scene"] for p in parts] == ["seen", "seen", "seen", "new"], "seen scenes first, parts in order"
    assert {p["scene"] for p in frontier.by_part({"rows": rows, "trained_seeds": None})} == {"all"}


def test_frontier_probe_splits_new_scenes_by_how_near_they_are_to_a_seen_one():
    """nearest_seen: the distance of each scene's first observation to the nearest seen scene's, each varying
    dimension scaled to unit spread (a constant one ignored); by_part pools the new scenes again in a nearer and a
    farther half by it."""
    import frontier

    first = np.array([[0.0, 5.0, 0.0], [0.0, 5.0, 2.0], [3.0, 5.0, 0.0], [0.0, 5.0, 8.0], [1.0, 5.0, 1.0]])
    near = frontier.nearest_seen(first, [7, 8, 9, 10, 11], seen=[7, 8])
    spread = first.std(0)
    assert near[0] == near[1] == 0.0
    assert np.allclose(near[2:], [3 / spread[0], 6 / spread[2], np.hypot(1 / spread[0], 1 / spread[2])])
    assert frontier.nearest_seen(first, [7, 8, 9, 10, 11], seen=[1]) is None, "no seen scene: nothing to measure"
    assert frontier.nearest_seen(first, [7, 8, 9, 10, 11], seen=None) is None

    def row(demo, seed, once):
        return {"demo": demo, "seed": seed, "T": 10, "start": 9, "once": once, "flags": {},
                "nearest_seen": [0.0, 0.0, near[2], near[3], near[4]][demo]}

    rows = [row(0, 7, True), row(2, 9, False), row(3, 10, False), row(4, 11, True), row(4, 11, True)]
    got = {p["scene"]: (p["demos"], p["starts"], p["once"]) for p in frontier.by_part({"rows": rows,
                                                                                     "trained_seeds": [7, 8]})}
    # new scenes 9 (the farthest), 10 and 11 (the nearest): one nearer, two farther
    assert got == {"seen": (1, 1, 1.0), "new": (3, 4, 0.5), "new, nearer half": (1, 2, 1.0),
                   "new, farther half": (2, 2, 0.0)}


def test_frontier_probe_gives_an_rlpd_checkpoint_the_runs_episode_horizon(demo_path, tmp_path):
    """An rlpd.py checkpoint is probed from the same demo states with its run's horizon as every start's time limit:
    the demo's own actions from t succeed exactly when the s* - t + 1 steps they need fit in it."""
    import jax

    import common
    import frontier
    import rlpd
    import run_files

    args = rlpd.Args(num_demos=1, max_episode_steps=7)
    _, _, state = rlpd.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "fresh.ckpt"
    run_files.save_checkpoint(ckpt, rlpd.checkpoint_meta(args, 42, 8), rlpd.networks(state), 0)
    out = frontier.main(frontier.Args(str(ckpt), dataset_path=str(demo_path), every=2, demo_actions=True))
    demos = common.load_demos(demo_path, 1)
    s_star = int(np.flatnonzero(demos.rewards[: demos.lengths[0]])[0])
    assert out["algorithm"] == "rlpd"
    for r in out["rows"]:
        assert r["horizon"] == 7
        assert r["once"] == (max(s_star - r["start"], 0) + 1 <= 7), r
        assert r["once"] or not r["at_end"], "success at the last step is a success"
    assert any(r["once"] for r in out["rows"]) and not all(r["once"] for r in out["rows"]), "both cases are exercised"


def test_frontier_probe_of_initial_states_uses_eval_seeds_and_horizon_without_demos(tmp_path):
    """--initial-states N probes the env's own initial states of eval's seeds 10**6 + k for the run's horizon, needs
    no demos (the checkpoint's dataset path may be gone), and sums the seeds up in an `all` row; --demo-actions, which
    needs demo states, is refused with one line."""
    import jax

    import frontier
    import rlpd
    import run_files

    args = rlpd.Args(num_demos=1, max_episode_steps=4, dataset_path=str(tmp_path / "gone.h5"))
    _, _, state = rlpd.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "fresh.ckpt"
    run_files.save_checkpoint(ckpt, rlpd.checkpoint_meta(args, 42, 8), rlpd.networks(state), 0)
    out = frontier.main(frontier.Args(str(ckpt), initial_states=3, stochastic=1, out=str(tmp_path / "init")))
    assert [r["seed"] for r in out["rows"]] == [10**6, 10**6 + 1, 10**6 + 2]
    assert all(r["horizon"] == 4 for r in out["rows"]) and out["dataset"] is None
    assert {"is_grasped", "is_obj_placed", "is_robot_static"} <= set(out["rows"][0]["flags"])
    md = (tmp_path / "init.md").read_text()
    assert md.count("\n| 100000") == 3 and "initial states of eval seeds" in md
    placed = np.mean([r["flags"]["is_obj_placed"] for r in out["rows"]])
    all_row = next(line for line in md.splitlines() if line.startswith("| **all** | 4 |")).split(" | ")
    assert float(all_row[2]) == np.mean([r["once"] for r in out["rows"]])
    assert float(all_row[2 + 2 + sorted(out["rows"][0]["flags"]).index("is_obj_placed")]) == pytest.approx(placed)
    with pytest.raises(SystemExit, match="leave out --initial-states"):
        frontier.main(frontier.Args(str(ckpt), initial_states=3, demo_actions=True))


@pytest.mark.parametrize("env_id, flags", [("PullCubeTool-v1", ("is_tool_grasped", "is_tool_behind_cube")),
                                           ("PegInsertionSide-v1", ("is_peg_grasped", "is_peg_lined_up"))])
def test_frontier_probe_reports_the_dense_reward_stages(asset_dir, tmp_path, env_id, flags):
    """PullCubeTool's and PegInsertionSide's evaluate() report no stage flag, so frontier.py adds the stages of their
    dense rewards: a planner demo replayed from its first state passes each stage (tool grasped, hook behind the
    cube; peg grasped, peg lined up with the hole) before it succeeds; a fresh policy passes none in 4 steps from an
    eval seed's initial state."""
    import jax

    import common
    import demo_making
    import frontier
    import rlpd
    import run_files

    path = demo_making.get_demos(env_id, "state", "pd_joint_delta_pos", 1)
    args = rlpd.Args(env_id=env_id, num_demos=1, max_episode_steps=400, dataset_path=str(path))
    demos = common.load_demos(path, 1)
    dims = (demos.obs.shape[1], demos.actions.shape[1])
    _, _, state = rlpd.init_sac(args, *dims, jax.random.PRNGKey(0))
    ckpt = tmp_path / "fresh.ckpt"
    run_files.save_checkpoint(ckpt, rlpd.checkpoint_meta(args, *dims), rlpd.networks(state), 0)
    (row,) = frontier.main(frontier.Args(str(ckpt), every=10_000, demo_actions=True))["rows"]
    assert row["once"] and row["flags"] == dict.fromkeys(flags, True), row
    args.max_episode_steps = 4
    run_files.save_checkpoint(ckpt, rlpd.checkpoint_meta(args, *dims), rlpd.networks(state), 0)
    out = frontier.main(frontier.Args(str(ckpt), initial_states=1, out=str(tmp_path / "probe")))
    assert out["rows"][0]["flags"] == dict.fromkeys(flags, False)
    assert flags[1] in (tmp_path / "probe.md").read_text()


def test_ctrl_c_stops_the_frontier_probe_at_once_with_one_line(demo_path, tmp_path):
    """Mid-probe, Ctrl-C to the process group (as a terminal sends it): one line, exit 130, no --out half written."""
    import jax

    import rfcl
    import run_files

    args = rfcl.Args(num_demos=1)
    _, _, state = rfcl.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "fresh.ckpt"
    run_files.save_checkpoint(ckpt, rfcl.checkpoint_meta(args, 42, 8), rfcl.networks(state), 0)
    code, lines = interrupted([str(ROOT / "benchmarks" / "frontier.py"), str(ckpt), "--dataset-path", str(demo_path),
                               "--every", "1", "--stochastic", "3", "--out", str(tmp_path / "probe")], tmp_path,
                              signal.SIGINT, once="'start': 1}", within=20)
    assert code == 130 and lines[-1] == "stopped by SIGINT", lines
    assert not [line for line in lines if "Traceback" in line or "Error" in line], lines
    assert not list(tmp_path.glob("probe*"))


def write_stage2_run(path, exp_name, grad_updates, switch, train, evals, fork=None, actor_update_freq=1):
    """A run directory as rfcl.py leaves it: args.json, tensorboard (training success every 1k env steps, evals), and
    for a fork the record of its parent in summary.json. train/evals: {env step: value}."""
    from torch.utils.tensorboard import SummaryWriter

    path.mkdir()
    (path / "args.json").write_text(json.dumps({"exp_name": exp_name, "num_envs": 8, "steps_per_env": 4,
                                                "grad_updates_per_step": grad_updates,
                                                "actor_update_freq": actor_update_freq}))
    w = SummaryWriter(str(path))
    if fork is None:
        w.add_scalar("curriculum/stage1_end_step", switch, switch)
    for step, v in train.items():
        w.add_scalar("charts/success_once", v, step)
        w.add_scalar("charts/success_at_end", v / 2, step)
    for step, v in evals.items():
        w.add_scalar("eval/success_at_end", v, step)
        w.add_scalar("eval/success_once", min(1.0, 2 * v), step)
    w.close()
    if fork is not None:
        (path / "summary.json").write_text(json.dumps({"forked_from": fork}))
    return path


def test_forks_table_counts_windows_from_the_switch_and_refuses_a_fork_of_another_state(tmp_path):
    import forks
    import run_files

    switch = 100_000
    parent = write_stage2_run(tmp_path / "parent", "parent", 16, switch,
                              {s: (0.9 if s <= switch else 0.1) for s in range(1_000, 200_001, 1_000)},
                              {s: 0.0 for s in range(10_000, 200_001, 10_000)})
    record = {"parent": "parent", "global_step": switch, "changed": {"grad_updates_per_step": [16, 64]}}
    fork = write_stage2_run(tmp_path / "fork", "fork", 64, switch,
                            {s: (0.2 if s <= switch + 50_000 else 0.6) for s in range(101_000, 200_001, 1_000)},
                            {s: (s - switch) / 100_000 for s in range(110_000, 200_001, 10_000)}, record, 4)
    report = forks.main(forks.Args(runs=[str(parent), str(fork)], window=50_000, out=str(tmp_path / "out"),
                                   name="f"))
    assert report["switch_step"] == switch
    p, f = report["runs"]
    assert (p["critic_updates_per_step"], f["critic_updates_per_step"], f["actor_updates_per_step"]) == (0.5, 2, 0.5)
    # stage 1's logs (0.9) stay out: the parent's windows hold stage 2 only
    assert [(w["from"], w["logs"], round(w["charts/success_once"], 3)) for w in p["windows"]] == [
        (0, 50, 0.1), (50_000, 50, 0.1)]
    assert [round(w["charts/success_once"], 3) for w in f["windows"]] == [0.2, 0.6]
    assert [round(w["charts/success_at_end"], 3) for w in f["windows"]] == [0.1, 0.3]
    assert [(w["eval/success_at_end"], w["eval/success_at_end@"]) for w in f["windows"]] == [(0.5, 50_000),
                                                                                            (1.0, 100_000)]
    md = (tmp_path / "out" / "f.md").read_text()
    assert "| fork | 2 / 0.5 | 50,000-100,000 | 0.600 | 0.300 | 1.000 (100,000) | 1.000 |" in md
    assert (tmp_path / "out" / "f.png").stat().st_size > 10_000

    # a fork still before its first save point: its record comes from the state its args.json names
    (tmp_path / "runs").mkdir()
    early = write_stage2_run(tmp_path / "runs" / "early", "early", 32, switch, {switch + 1_000: 0.3}, {}, {})
    (early / "summary.json").unlink()
    (tmp_path / "parent" / "stage2_start.state").write_bytes(json.dumps(
        {"format": run_files.RESUME_FORMAT, "version": run_files.RESUME_VERSION, "algorithm": "rfcl",
         "global_step": switch, "args": {"exp_name": "parent", "grad_updates_per_step": 16}}).encode() + b"\npayload")
    config = json.loads((early / "args.json").read_text())
    (early / "args.json").write_text(json.dumps({**config, "fork": "parent/stage2_start.state"}))
    report = forks.main(forks.Args(runs=[str(parent), str(early)], out=str(tmp_path / "out"), name="e"))
    assert report["runs"][1]["changed"] == {"grad_updates_per_step": [16, 32]}

    other = write_stage2_run(tmp_path / "other", "other", 64, switch, {switch + 1_000: 0.0}, {},
                             {**record, "global_step": 60_000})
    with pytest.raises(SystemExit, match="forked from parent at env step 60,000, not from parent's stage switch"):
        forks.main(forks.Args(runs=[str(parent), str(other)], out=str(tmp_path / "out"), name="g"))
    with pytest.raises(SystemExit, match="has not switched to stage 2"):
        forks.main(forks.Args(runs=[str(fork)], out=str(tmp_path / "out"), name="h"))


def test_planner_report_folder_is_made_before_planning_and_a_bad_one_stops_before_it(tmp_path, monkeypatch):
    """benchmarks/planner.py makes its --out folder first (a report that could not be written after minutes of
    planning was lost), and an --out it cannot write stops it with one line before any planning."""
    import common
    import planner

    planned = []

    def fake_generate(*args, **kw):
        planned.append(args)
        raise common.DemoError("no planner in this test")

    monkeypatch.setattr(planner.demo_making, "generate_demos", fake_generate)
    out = tmp_path / "new" / "report"
    planner.main(planner.Args(env_ids=["PushCube-v1"], num_demos=2, out=str(out)))
    assert json.loads((out / "planner.json").read_text())["PushCube-v1"]["error"] == "no planner in this test"
    assert (out / "planner.md").exists() and len(planned) == 1
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"cannot write --out .*a_file/report .*pass a writable folder"):
        planner.main(planner.Args(env_ids=["PushCube-v1"], out=str(tmp_path / "a_file" / "report")))
    assert len(planned) == 1, "nothing planned for an --out that cannot be written"
