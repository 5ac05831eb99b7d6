"""A copy of a script, renamed and edited as a researcher starting a variant would, works with every tool: training,
--resume, --evaluate, collect_demos.py and benchmarks/frontier.py all build the copy's edited Actor."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest

import collect_demos
import common
import rfcl
import run_files
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
    ckpt = run_files.load_checkpoint(str(run / "checkpoints" / "final.ckpt"))
    assert (ckpt["algorithm"], ckpt["script"]) == (algorithm, str(path.resolve())) and set(ckpt["networks"]["actor_params"]) == edited
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
    act = copy.load_actor(run_files.load_checkpoint(final))[0]
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
    run_files.save_checkpoint(ckpt, meta, copy.networks(state), 0)
    with pytest.raises(SystemExit, match=r"written by /elsewhere/rfcl_gone.py, which is not here .* pass --script PATH"):
        collect_demos.main(collect_demos.Args(checkpoint=str(ckpt), output_dir=str(tmp_path / "d")))
    monkeypatch.setenv("EDITED_ACTOR_TRACES", str(tmp_path / "traces"))
    loaded = run_files.checkpoint_script(run_files.load_checkpoint(str(ckpt)), str(ckpt), str(path))
    assert loaded is copy


# the edit of a copy that adds a network: a second actor head with its own parameters in the learner's state, stored
# by networks() and read back by with_networks(); the copy's tools (load_actor) act with the added head
ADD_NETWORK = [
    ('    temp: TrainState  # params = {"log_alpha": scalar}\n',
     '    temp: TrainState  # params = {"log_alpha": scalar}\n    aux: TrainState  # the added network\n'),
    ('        temp=TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(args.init_temperature)}, tx=tx()),\n',
     '        temp=TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(args.init_temperature)}, tx=tx()),\n'
     '        aux=TrainState.create(apply_fn=None, params=actor.init(jax.random.fold_in(k_a, 1), obs)["params"], '
     'tx=tx()),\n'),
    ('"log_alpha": s.temp.params["log_alpha"]}', '"log_alpha": s.temp.params["log_alpha"], "aux_params": s.aux.params}'),
    ('temp=s.temp.replace(params={"log_alpha": jnp.asarray(nets["log_alpha"])}))',
     'temp=s.temp.replace(params={"log_alpha": jnp.asarray(nets["log_alpha"])}), aux=s.aux.replace(params=nets["aux_params"]))'),
    ('    params = ckpt["networks"]["actor_params"]\n', '    params = ckpt["networks"]["aux_params"]\n'),
]


def test_a_copy_that_adds_a_network_keeps_it_in_every_checkpoint_and_tool(demo_path, tmp_path, monkeypatch):
    """The shared code stores whatever networks() returns: the added head is in every .ckpt, a run started from one
    (--checkpoint) loads it, --evaluate and collect_demos.py act with it, and a checkpoint without it is one line."""
    import jax

    monkeypatch.chdir(tmp_path)
    src = (ROOT / "rfcl.py").read_text()
    for old, new in ADD_NETWORK:
        assert src.count(old) == 1, f"rfcl.py no longer has the text this edit changes: {old}"
        src = src.replace(old, new)
    path = tmp_path / "rfcl_aux.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("rfcl_aux", path)
    copy = importlib.util.module_from_spec(spec)
    sys.modules["rfcl_aux"] = copy
    spec.loader.exec_module(copy)
    flags = [*TINY, "--dataset-path", str(demo_path), "--total-timesteps", "32"]

    copy.main(copy.parse_args([*flags, "--exp-name", "a"]))
    final = str(tmp_path / "runs" / "a" / "checkpoints" / "final.ckpt")
    nets = run_files.load_checkpoint(final)["networks"]
    payload = run_files.load_resume_state(tmp_path / "runs" / "a" / common.RESUME_FILE, "rfcl")[1]
    saved = payload["sac"]["aux"]["params"]
    assert set(nets) == {"actor_params", "critic_params", "target_params", "log_alpha", "aux_params"}
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(nets["aux_params"]), leaves(saved)))

    # --checkpoint with another seed: the new run holds the loaded head, not its own fresh one
    copy.main(copy.parse_args([*flags, "--exp-name", "b", "--seed", "7", "--checkpoint", final, "--total-timesteps",
                               "16"]))  # no update: the head is the one loaded
    again = run_files.load_checkpoint(str(tmp_path / "runs" / "b" / "checkpoints" / "final.ckpt"))["networks"]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(again["aux_params"]), leaves(nets["aux_params"])))
    obs_dim = nets["actor_params"]["Dense_0"]["kernel"].shape[0]
    fresh = copy.networks(copy.init_sac(copy.Args(hidden_dims=(16, 16)), obs_dim, 8, jax.random.PRNGKey(7))[2])
    kernel = lambda n: n["aux_params"]["Dense_0"]["kernel"]  # noqa: E731
    assert kernel(fresh).shape == kernel(nets).shape and not np.array_equal(kernel(fresh), kernel(nets))

    # --evaluate and collect_demos.py act with the added head (the copy's load_actor), not the first one
    copy.main(copy.parse_args(["--evaluate", "--checkpoint", final, "--exp-name", "e", "--num-eval-envs", "1",
                               "--num-eval-episodes", "1", "--max-episode-steps", "4", "--no-capture-video"]))
    assert json.loads((tmp_path / "runs" / "e" / "eval.json").read_text())["eval/episodes"] == 1
    collect_demos.main(collect_demos.Args(checkpoint=final, num_envs=1, num_episodes=1, only_successful=False,
                                          max_episode_steps=4, output_dir=str(tmp_path / "demos")))
    (h5,) = (tmp_path / "demos").glob("*.h5")
    demos = common.load_demos(h5, 1)
    actor = copy.Actor(8, (16, 16))
    np.testing.assert_allclose(demos.actions, np.asarray(copy.deterministic_action(actor, nets["aux_params"],
                                                                                   demos.obs)), atol=1e-5)
    assert not np.allclose(demos.actions, np.asarray(copy.deterministic_action(actor, nets["actor_params"],
                                                                                demos.obs)), atol=1e-3)

    # a checkpoint of the unedited script lacks the head: one line naming it
    args = rfcl.Args(hidden_dims=(16, 16))
    plain = tmp_path / "plain.ckpt"
    run_files.save_checkpoint(plain, rfcl.checkpoint_meta(args, obs_dim, 8),
                              rfcl.networks(rfcl.init_sac(args, obs_dim, 8, jax.random.PRNGKey(0))[2]), 0)
    with pytest.raises(SystemExit, match=r"\['aux_params'\].*absent in the checkpoint"):
        copy.main(copy.parse_args([*flags, "--exp-name", "c", "--checkpoint", str(plain)]))
