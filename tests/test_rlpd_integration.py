"""rlpd.py end to end on real ManiSkill (CPU): both presets, then --evaluate on what they saved."""

import json

import pytest

from conftest import ROOT, read_scalars, run_script

COMMON = ["--num-demos", "2", "--num-eval-envs", "2", "--num-eval-episodes", "2", "--log-freq", "32",
          "--render-size", "64", "--max-episode-steps", "20"]
PRESETS = {
    "walltime": ["--num-envs", "2", "--total-timesteps", "320", "--num-seed-steps", "128", "--eval-freq", "160",
                 "--grad-updates-per-step", "4", "--save-freq", "160"],
}
# the sample-efficient preset's values are checked one by one (test_presets_and_checkpoints.py) and its 10-critic
# update by value (test_sac_core.py); an end-to-end run of it adds minutes and no other code path


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_run_writes_events_video_and_a_checkpoint_that_evaluates(preset, demo_path, tmp_path, monkeypatch,
                                                                        capsys):
    name = f"rlpd_{preset}"
    run_script([str(ROOT / "rlpd.py"), "--preset", preset, "--exp-name", name, *COMMON, *PRESETS[preset]], tmp_path)
    run_dir = tmp_path / "runs" / name
    args = json.loads((run_dir / "args.json").read_text())
    assert args["preset"] == preset
    if preset == "sample-efficient":
        assert (args["num_envs"], args["grad_updates_per_step"], args["num_qs"], args["num_min_qs"]) == (1, 16, 10, 2)
    scalars = read_scalars(run_dir)
    for tag in ("charts/SPS", "charts/episodic_return", "losses/qf_loss", "losses/actor_loss", "losses/alpha",
                "eval/success_once", "eval/success_at_end", "eval/return"):
        assert tag in scalars, tag
    assert not any(t.startswith("curriculum/") for t in scalars)
    assert len(list((run_dir / "videos").glob("eval_*.mp4"))) == 2
    assert (run_dir / "checkpoints" / "final.ckpt").exists()

    import rfcl
    import rlpd

    monkeypatch.chdir(tmp_path)  # --evaluate in this process (rfcl's runs as a subprocess in its own tests)
    rlpd.main(rlpd.parse_args([
        "--evaluate", "--checkpoint", str(run_dir / "checkpoints/final.ckpt"), "--exp-name", f"{name}_eval",
        "--num-eval-envs", "2", "--num-eval-episodes", "2", "--max-episode-steps", "5", "--no-capture-video"]))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/episodes"] == 2

    # rfcl.py evaluates it too, with the networks of the script that wrote it (rlpd.py): the same metrics
    rfcl.main(rfcl.parse_args([
        "--evaluate", "--checkpoint", str(run_dir / "checkpoints/final.ckpt"), "--exp-name", f"{name}_by_rfcl",
        "--num-eval-envs", "2", "--num-eval-episodes", "2", "--max-episode-steps", "5", "--no-capture-video"]))
    assert (json.loads((tmp_path / "runs" / f"{name}_by_rfcl" / "eval.json").read_text()) ==
            json.loads((tmp_path / "runs" / f"{name}_eval" / "eval.json").read_text()))
