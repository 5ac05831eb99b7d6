"""A copy of a script, renamed and edited as a researcher starting a variant would, works with every tool: training,
--resume, --evaluate, collect_demos.py and benchmarks/frontier.py all build the copy's edited Actor."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest

import bookkeeping
import collect_demos
import common
import rfcl
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import frontier  # noqa: E402

TINY = ["--num-demos", "2", "--num-envs", "1", "--num-eval-envs", "1", "--num-eval-episodes", "1",
        "--eval-freq", "1000", "--log-freq", "16", "--num-seed-steps", "16", "--steps-per-env", "8",
        "--grad-updates-per-step", "1", "--batch-size", "8", "--hidden-dims", "16", "16", "--no-capture-video",
        "--max-episode-steps", "8", "--save-freq", "32"]
# the edit: a LayerNorm after every hidden layer of the Actor, and a line in a file each time the Actor is traced
# with real parameters, naming them (so a test sees which Actor a tool built)
EDITED_LAYER = '''            x = nn.relu(nn.LayerNorm()(nn.Dense(h)(x)))
        if not self.is_initializing():
            with open(__import__("os").environ["EDITED_ACTOR_TRACES"], "a") as f:
                f.write(" ".join(sorted(self.variables["params"])) + "\\n")'''


def make_copy(original: str, name: str, algorithm: str, folder) -> tuple:
    """folder/name.py: `original` with ALGORITHM = algorithm and the Actor edited; imported as a module."""
    src = (ROOT / original).read_text()
    actor = src.index("class Actor(nn.Module):")
    layer = "            x = nn.relu(nn.Dense(h)(x))"
    at = src.index(layer, actor)
    src = src[:at] + EDITED_LAYER + src[at + len(layer):]
    src = re.sub(r'^ALGORITHM = "\w+"', f'ALGORITHM = "{algorithm}"', src, count=1, flags=re.M)
    path = folder / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, path


@pytest.mark.parametrize("original,name,algorithm", [("rfcl.py", "rfcl_ln", "rfcl_ln"), ("rlpd.py", "rlpd_ln", "rlpd_ln"),
                                                     ("rfcl.py", "rfcl_same_name", "rfcl")],
                         ids=["rfcl-copy", "rlpd-copy", "rfcl-copy-keeping-its-ALGORITHM"])
def test_a_renamed_and_edited_copy_works_with_every_tool(original, name, algorithm, demo_path, tmp_path, monkeypatch):
    traces = tmp_path / "traces"
    monkeypatch.setenv("EDITED_ACTOR_TRACES", str(traces))
    monkeypatch.chdir(tmp_path)
    copy, path = make_copy(original, name, algorithm, tmp_path)
    edited = {"Dense_0", "Dense_1", "Dense_2", "Dense_3", "LayerNorm_0", "LayerNorm_1"}

    def traced_by(what: str) -> None:
        """The edited Actor was built and called with the edited parameter tree since the last check."""
        lines = traces.read_text().splitlines() if traces.exists() else []
        assert lines and all(set(line.split()) == edited for line in lines), f"{what} did not use the edited Actor"
        traces.unlink()

    # train, stop at 32 (a save point), then resume to 64
    copy.main(copy.parse_args([*TINY, "--exp-name", "v", "--total-timesteps", "32"]))
    traced_by("training")
    run = tmp_path / "runs" / "v"
    ckpt = bookkeeping.load_checkpoint(str(run / "checkpoints" / "final.ckpt"))
    assert (ckpt["algorithm"], ckpt["script"]) == (algorithm, str(path.resolve())) and set(ckpt["actor_params"]) == edited
    copy.main(copy.parse_args(["--resume", str(run), "--total-timesteps", "64"]))
    traced_by("--resume")
    assert json.loads((run / "summary.json").read_text())["global_step"] == 64
    final = str(run / "checkpoints" / "final.ckpt")

    # the original script's --evaluate on the copy's checkpoint builds the copy's Actor
    rfcl.main(rfcl.parse_args(["--evaluate", "--checkpoint", final, "--exp-name", "e", "--num-eval-envs", "1",
                               "--num-eval-episodes", "1", "--max-episode-steps", "4", "--no-capture-video"]))
    traced_by("--evaluate")
    assert json.loads((tmp_path / "runs" / "e" / "eval.json").read_text())["eval/episodes"] == 1

    # collect_demos.py: and the recorded actions are the edited Actor's on the recorded observations
    collect_demos.main(collect_demos.Args(checkpoint=final, num_envs=1, num_episodes=1, only_successful=False,
                                          max_episode_steps=4, output_dir=str(tmp_path / "demos")))
    traced_by("collect_demos.py")
    (h5,) = (tmp_path / "demos").glob("*.h5")
    demos = common.load_demos(h5, 1)
    act = copy.load_actor(bookkeeping.load_checkpoint(final))[0]
    np.testing.assert_allclose(demos.actions, np.asarray(act(demos.obs)), atol=1e-5)
    traces.unlink()

    # benchmarks/frontier.py, from demo states and from eval's initial states
    out = frontier.main(frontier.Args(final, dataset_path=str(demo_path), num_demos=1, every=1000, stochastic=1))
    traced_by("frontier.py")
    assert out["algorithm"] == algorithm and out["rows"]

    # another script refuses to resume the copy's run, with one line naming the copy
    other = rfcl if original == "rlpd.py" else __import__("rlpd")
    with pytest.raises(SystemExit, match=f"is a run of {name}.py"):
        other.main(other.parse_args(["--resume", str(run), "--total-timesteps", "96"]))
    if algorithm == "rfcl":  # the same ALGORITHM name: refused by the script's file name
        with pytest.raises(SystemExit, match=f"is a run of {name}.py .algorithm rfcl.; resume it with that script"):
            rfcl.main(rfcl.parse_args(["--resume", str(run), "--total-timesteps", "96"]))


def test_a_checkpoint_whose_script_is_gone_names_the_flag_that_points_at_it(tmp_path, monkeypatch):
    """A checkpoint carried to a machine without the copy that wrote it: one line naming the path and --script;
    with --script, the copy given is used."""
    copy, path = make_copy("rfcl.py", "rfcl_gone", "rfcl_gone", tmp_path)
    import jax

    args = copy.Args(hidden_dims=(16, 16))
    _, _, state = copy.init_sac(args, 42, 8, jax.random.PRNGKey(0))
    ckpt = tmp_path / "c.ckpt"
    meta = {**copy.checkpoint_meta(args, 42, 8), "script": "/elsewhere/rfcl_gone.py"}
    bookkeeping.save_checkpoint(ckpt, meta, copy.networks(state), 0)
    with pytest.raises(SystemExit, match=r"written by /elsewhere/rfcl_gone.py, which is not here .* pass --script PATH"):
        collect_demos.main(collect_demos.Args(checkpoint=str(ckpt), output_dir=str(tmp_path / "d")))
    monkeypatch.setenv("EDITED_ACTOR_TRACES", str(tmp_path / "traces"))
    loaded = bookkeeping.checkpoint_script(bookkeeping.load_checkpoint(str(ckpt)), str(ckpt), str(path))
    assert loaded is copy
