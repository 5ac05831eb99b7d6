"""How strong is the test suite? Break rfcl.py or rlpd.py on purpose (a fixed list of plausible mistakes in the
curricula, the SAC update, the training loop, the data it stores, what makes each script its algorithm, and how a
stop signal ends a script) and count the mistakes that no test catches.

    python benchmarks/mutation.py                                  # this checkout
    python benchmarks/mutation.py --repo /path/to/older/checkout   # the same mistakes, an older suite

Each mutant is one text substitution in rfcl.py, rlpd.py, vector_env.py or stop_signals.py (the first of its
alternatives that the file contains, so the same mistake can be planted in older versions of the code), run against
a copy of the repository with `pytest -x` on the test files of its group: "caught" when pytest fails (the table names
the first failing test; the json keeps pytest's line with the error), "SURVIVED" when it passes, "TIMEOUT" when it
outlives --timeout (not counted as caught). A hand-picked list, not a mutation tool's exhaustive one: mutmut's
thousands of mutants times a minute of tests each do not fit a 2-core machine.
Writes a markdown table to stdout and, with --out, to <out>.md and <out>.json.

With --together the selected mutants are tested as a group (for an old suite that misses most of them, where one
run per mutant would take hours): all of them planted at once; if the tests pass, each is reported "SURVIVED
(with the others)"; if they fail, the group is split in halves and each half tested again, down to single mutants.
A mutant that alone would be caught but is masked by another of its group would be misreported; the mutants sit on
separate lines of code, so that needs one slip to undo another's effect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]

# (name, group, [(old, new[, marker]), ...][, file]): alternatives for different versions of the file (default rfcl.py);
# the first applies whose `old` (and `marker`, if given) the file contains
MUTANTS = [
    ("frontier moves before the window is full", "unit",
     [("if len(win) == self.window and all(win):", "if all(win):")]),
    ("frontier moves by step - 1", "unit",
     [("self.t[i] = max(self.t[i] - self.step, 0)", "self.t[i] = max(self.t[i] - self.step + 1, 0)")]),
    ("stage 1 ends at exactly the solved fraction", "unit",
     [("return self.solved.mean() > self.solved_frac", "return self.solved.mean() >= self.solved_frac")]),
    ("demo weights favour solved demos", "unit",
     [("w = np.where(self.solved, 1e-3, (self.t + 1) / (self.T + 1))",
       "w = np.where(self.solved, 1e-3, (self.T - self.t + 1) / (self.T + 1))")]),
    ("stage-1 time limit multiplies by the ratio", "unit",
     [("return 16 + int((self.T[i] - start) // self.ratio)", "return 16 + int((self.T[i] - start) * self.ratio)")]),
    ("episodes past the frontier are judged", "unit",
     [("return start == self.t[i] and not self.solved[i]", "return start <= self.t[i] + 1 and not self.solved[i]")]),
    ("the success window is not cleared after a move", "unit", [("            win.clear()", "            pass")]),
    ("a seed at 75% counts as on the edge", "unit",
     [("return 3.0 if np.mean(history) < 0.75 else 1.0", "return 3.0 if np.mean(history) <= 0.75 else 1.0")]),
    ("ties do not share the smallest rank", "unit",
     [("ranks = 1 + (values[None, :] > values[:, None]).sum(1)",
       "ranks = 1 + (values[None, :] >= values[:, None]).sum(1)")]),
    ("staleness counted backwards", "unit",
     [("staleness = (self.num_sampled - self.last_sampled).astype(float)",
       "staleness = (self.last_sampled - self.num_sampled).astype(float)")]),
    ("sampling does not record staleness", "unit",
     [("        self.last_sampled[k] = self.num_sampled\n", "")]),
    ("critic target from the online critics", "unit",
     [('next_q = critic.apply({"params": s.target_params}', 'next_q = critic.apply({"params": s.critic.params}')]),
    ("critic target ignores the mask", "unit",
     [('target = batch["rewards"] + args.gamma * batch["masks"] * next_v',
       'target = batch["rewards"] + args.gamma * next_v')]),
    ("entropy backup with the wrong sign", "unit",
     [("next_v -= alpha * next_logp", "next_v += alpha * next_logp")]),
    ("Polyak step towards the old target", "unit",
     [("optax.incremental_update(new_critic.params, s.target_params, args.tau)",
       "optax.incremental_update(s.target_params, new_critic.params, args.tau)")]),
    ("actor maximises the ensemble min, not the mean", "unit",
     [('q = critic.apply({"params": s.critic.params}, batch["obs"], a).mean(0)',
       'q = critic.apply({"params": s.critic.params}, batch["obs"], a).min(0)')]),
    ("temperature loss with the wrong sign", "unit",
     [('return jnp.exp(p["log_alpha"]) * (entropy - target_entropy)',
       'return jnp.exp(p["log_alpha"]) * (target_entropy - entropy)')]),
    ("target subset drawn with replacement", "unit",
     [("jax.random.choice(key, q.shape[0], (num_min_qs,), replace=False)",
       "jax.random.choice(key, q.shape[0], (num_min_qs,), replace=True)")]),
    ("offline half drawn with the online size", "unit",
     [("i_off = jax.random.randint(k_off, (half,), 0, offline_size)",
       "i_off = jax.random.randint(k_off, (half,), 0, online_size)")]),
    ("actor cadence off by one", "unit",
     [("actor_turn = s.critic.step % args.actor_update_freq == 0",
       "actor_turn = (s.critic.step + 1) % args.actor_update_freq == 0"),
      ("jax.lax.cond((i + 1) % args.actor_update_freq == 0", "jax.lax.cond(i % args.actor_update_freq == 0")]),
    ("tanh log-prob correction with the wrong sign", "unit",
     [("logp -= 2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))",
       "logp += 2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))")]),
    ("env gets the pool index, not its seed", "loop",
     [("eps.seed_idx[j], eps.horizon[j], seeds[j] = k, args.max_episode_steps, forward.seeds[k]",
       "eps.seed_idx[j], eps.horizon[j], seeds[j] = k, args.max_episode_steps, k"),
      ("ep_seed_idx[j], ep_horizon[j], seeds[j] = k, args.max_episode_steps, forward.seeds[k]",
       "ep_seed_idx[j], ep_horizon[j], seeds[j] = k, args.max_episode_steps, k")]),
    ("stage-1 data not handed to the offline buffer", "loop",
     [("offline, online = switch_to_stage2(", "_, online = switch_to_stage2("),
      ("offline, online = online, ReplayBuffer(args.buffer_size, obs_dim, act_dim)",
       "online = ReplayBuffer(args.buffer_size, obs_dim, act_dim)")]),
    ("curriculum always judges success once", "loop",
     [('judged = eps.success_once if curriculum_success == "once" else success', "judged = eps.success_once"),
      ('judged = eps.success_once if args.curriculum_success == "once" else success', "judged = eps.success_once"),
      ('judged = eps.once if args.curriculum_success == "once" else success', "judged = eps.once"),
      ('ep_success = ep_once if args.curriculum_success == "once" else success', "ep_success = ep_once")]),
    ("stage-2 seeding with uniform actions", "loop",
     [("if stage == 1 and global_step < args.num_seed_steps:", "if online.size < args.num_seed_steps:")]),
]
# what each online and offline row holds, in both scripts
for _script in ("rfcl.py", "rlpd.py"):
    MUTANTS += [
        (f"{_script}: online obs is the next observation", "data",
         [('online.add({"obs": obs, "actions": actions,', 'online.add({"obs": next_obs, "actions": actions,')], _script),
        (f"{_script}: online actions are not the ones sent", "data",
         [('"actions": actions, "rewards": success', '"actions": np.clip(actions, -0.5, 0.5), "rewards": success')],
         _script),
        (f"{_script}: online reward is success so far", "data",
         [('"rewards": success.astype(np.float32),', '"rewards": eps.success_once.astype(np.float32),', "success_once"),
          ('"rewards": success.astype(np.float32),', '"rewards": eps.once.astype(np.float32),')], _script),
        (f"{_script}: online next_obs is the observation before", "data",
         [('"next_obs": next_obs, "masks"', '"next_obs": obs, "masks"')], _script),
        (f"{_script}: online mask ignores terminations", "data",
         [('"masks": bootstrap_masks(terminated, args.bootstrap_at_done)})', '"masks": np.ones(n, np.float32)})')],
         _script),
        (f"{_script}: demo masks ignore --bootstrap-at-done", "data",
         [("demo_buffer(demos, bootstrap_masks(demos.terminated, args.bootstrap_at_done))",
           'demo_buffer(demos, bootstrap_masks(demos.terminated, "always"))')], _script),
    ]
MUTANTS.append(("rfcl.py: demo actions scaled but not clipped", "data",
                [("np.clip(demos.actions * args.demo_action_scale, -1.0, 1.0)", "(demos.actions * args.demo_action_scale)")]))
# how a stop signal before the loop ends a script (stop_signals.py)
MUTANTS += [
    ("env workers left alive at a stop", "signals", [("        worker.kill()", "        pass")], "stop_signals.py"),
    ("a signal during the imports raises like any other", "signals",
     [("    if not _IMPORTS_DONE:", "    if False:")], "stop_signals.py"),
    ("env workers get the stop handler too", "signals",
     [('elif _IMPORTER == "__mp_main__":', "elif False:")], "stop_signals.py"),
    ("a signal inside a gc callback is not delivered again", "signals",
     [("    if _dropped_there(frame):", "    if False:")], "stop_signals.py"),
    ("an exit a library dropped is not honoured", "signals",
     [("    if _SIGNALLED:\n        _exit()", "    pass")], "stop_signals.py"),
    ("the handler installed by any importer", "signals",
     [('if _IMPORTER == "__main__":', "if True:")], "stop_signals.py"),
    ("env workers start with the stop signals unblocked", "signals",
     [("signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)", "signal.pthread_sigmask(signal.SIG_BLOCK, [])")],
     "stop_signals.py"),
]

# what makes each script its algorithm, and the protocol its numbers depend on (tests/test_properties.py's list):
# slips a researcher could make while editing a copy, in both scripts and in vector_env.py
MUTANTS += [
    # stage 1 starts from the demo state asked for
    ("CPU envs drop the demo states: episodes start from the task's own initial states", "start",
     [('            options["states"] = list(states)\n', "            pass\n")], "vector_env.py"),
    ("the CPU worker returns the demo observation without restoring the demo state", "start",
     [("        self.env.unwrapped.set_state_dict(state)\n", "")], "vector_env.py"),
    ("the demo state one step after the observation handed out", "start",
     [("lambda x: x[t], demos.env_states[i]), demos.traj_obs[i][t]",
       "lambda x: x[min(t + 1, len(x) - 1)], demos.env_states[i]), demos.traj_obs[i][t]")]),
    ("the demo's scene built from the demo index, not its seed", "start",
     [('seeds[j], states[j] = demos.episodes[i]["episode_seed"], demo_state(demos, i, t)',
       "seeds[j], states[j] = i, demo_state(demos, i, t)")]),
    ("stage-2 episodes keep a frontier episode's policy-mean flag", "start",
     [("            eps.policy_mean[j] = False\n", ""), ("            eps.det[j] = False\n", "")]),
    # rlpd.py: half of every batch from the demo file
    ("rlpd.py: the offline half drawn from the online buffer", "offline",
     [("update_many(state, online.data, online.size, offline.data, offline.size, k,",
       "update_many(state, online.data, online.size, online.data, online.size, k,")], "rlpd.py"),
    ("rlpd.py: demo rows stored without their rewards", "offline",
     [('buf.add({"obs": demos.obs, "actions": demos.actions, "rewards": demos.rewards,',
       'buf.add({"obs": demos.obs, "actions": demos.actions, "rewards": 0 * demos.rewards,')], "rlpd.py"),
    ("rlpd.py: the offline rows drawn with the online rows' key", "offline",
     [("i_off = jax.random.randint(k_off, (half,), 0, offline_size)",
       "i_off = jax.random.randint(k_on, (half,), 0, offline_size)")], "rlpd.py"),
    # eval: the policy mean of the current weights, on eval seeds
    ("rlpd.py: eval acts with sampled actions", "eval",
     [("run.evaluate(eval_envs, partial(policy_det, state.actor.params), global_step)",
       "run.evaluate(eval_envs, lambda o: policy_sample(state.actor.params, jnp.asarray(o), key)[0], global_step)")],
     "rlpd.py"),
    ("rfcl.py: eval acts as training episodes do (sampled actions)", "eval",
     [("run.evaluate(eval_envs, partial(policy_det, state.actor.params), global_step)",
       "run.evaluate(eval_envs, lambda o: policy_train(state.actor.params, jnp.asarray(o), key, "
       "jnp.zeros(len(o), bool)), global_step)")]),
    ("rlpd.py: training seeds overlap the demos' seeds", "eval",
     [("seeds = rng.integers(10_000, 10**6, size=len(mask))", "seeds = rng.integers(0, 10**6, size=len(mask))")],
     "rlpd.py"),
    # every flag that enters the loss reaches the update
    ("rfcl.py: --learning-rate ignored", "flags",
     [("tx = lambda: optax.adam(args.learning_rate)", "tx = lambda: optax.adam(3e-4)")]),
    ("rlpd.py: --tau ignored", "flags",
     [("optax.incremental_update(new_critic.params, s.target_params, args.tau)",
       "optax.incremental_update(new_critic.params, s.target_params, 0.005)")], "rlpd.py"),
    ("rlpd.py: --batch-size ignored", "flags", [("half = args.batch_size // 2", "half = 128")], "rlpd.py"),
    ("rfcl.py: --target-entropy-scale ignored", "flags",
     [("target_entropy = -args.target_entropy_scale * act_dim", "target_entropy = -0.5 * act_dim")]),
    ("rlpd.py: --init-temperature ignored", "flags",
     [('params={"log_alpha": jnp.log(args.init_temperature)}', 'params={"log_alpha": jnp.log(0.01)}')], "rlpd.py"),
    ("rfcl.py: --grad-updates-per-step ignored by the loop", "flags",
     [("offline.data, offline.size, k,\n                                          args.grad_updates_per_step)",
       "offline.data, offline.size, k,\n                                          16)")]),
    ("rlpd.py: --gamma ignored", "flags",
     [('target = batch["rewards"] + args.gamma * batch["masks"] * next_v',
       'target = batch["rewards"] + 0.9 * batch["masks"] * next_v')], "rlpd.py"),
    # time limits truncate, never terminate, at exactly --max-episode-steps
    ("rlpd.py: episodes one step longer than --max-episode-steps", "limits",
     [("ended = self.length >= horizon", "ended = self.length > horizon"),
      ("ended = eps.length >= args.max_episode_steps", "ended = eps.length > args.max_episode_steps")], "rlpd.py"),
    ("rlpd.py: a time limit stops bootstrapping", "limits",
     [('"masks": bootstrap_masks(terminated, args.bootstrap_at_done)})',
       '"masks": bootstrap_masks(terminated | (eps.length >= args.max_episode_steps), args.bootstrap_at_done)})')],
     "rlpd.py"),
    ("rfcl.py: a time limit stops bootstrapping", "limits",
     [('"masks": bootstrap_masks(terminated, args.bootstrap_at_done)})',
       '"masks": bootstrap_masks(terminated | (eps.length >= eps.horizon), args.bootstrap_at_done)})')]),
    # a checkpoint holds the weights the run had at that step
    ("rlpd.py: checkpoints hold the networks the run started with", "checkpoints",
     [("lambda name: save_checkpoint(run, meta, state, name",
       "lambda name, state=init_sac(args, obs_dim, act_dim, k_init)[2]: save_checkpoint(run, meta, state, name"),
      ("lambda name: save_checkpoint(run, args, state, name",
       "lambda name, state=init_sac(args, obs_dim, act_dim, k_init)[2]: save_checkpoint(run, args, state, name"),
      ("    def save_checkpoint(name: str) -> None:", "    def save_checkpoint(name: str, state=state) -> None:")],
     "rlpd.py"),
    ("rfcl.py: checkpoints store the target critics as the critics", "checkpoints",
     [('"critic_params": s.critic.params, "target_params": s.target_params',
       '"critic_params": s.target_params, "target_params": s.target_params')]),
    # per-episode bookkeeping starts afresh with each episode, and the charts report it
    ("rfcl.py: success-so-far carried into the next episode", "episodes",
     [("eps.length[mask], eps.episode_return[mask], eps.success_once[mask] = 0, 0.0, False",
       "eps.length[mask], eps.episode_return[mask] = 0, 0.0"),
      ("eps.length[mask], eps.ret[mask], eps.once[mask] = 0, 0.0, False", "eps.length[mask], eps.ret[mask] = 0, 0.0")]),
    ("rlpd.py: the return carried into the next episode", "episodes",
     [("eps.length[mask], eps.episode_return[mask], eps.success_once[mask] = 0, 0.0, False",
       "eps.length[mask], eps.success_once[mask] = 0, False"),
      ("eps.length[mask], eps.ret[mask], eps.once[mask] = 0, 0.0, False", "eps.length[mask], eps.once[mask] = 0, False")],
     "rlpd.py"),
    ("rlpd.py: charts swap success_once and success_at_end", "episodes",
     [("run.episode_ended(eps.episode_return[j], success[j], eps.success_once[j])",
       "run.episode_ended(eps.episode_return[j], eps.success_once[j], success[j])"),
      ("run.episode_ended(eps.ret[j], success[j], eps.once[j])", "run.episode_ended(eps.ret[j], eps.once[j], success[j])")],
     "rlpd.py"),
    ("CPU envs restart every env when some finish", "episodes",
     [('        options = {"reset_mask": np.asarray(mask, bool)}\n', "        options = {}\n")], "vector_env.py"),
]
PROPERTY_GROUPS = ("start", "offline", "eval", "flags", "limits", "checkpoints", "episodes")


@dataclass
class Args:
    repo: Optional[str] = None
    """checkout whose rfcl.py and tests to use (default: this one)"""
    unit_tests: list[str] = field(default_factory=lambda: [
        "tests/test_rfcl_units.py", "tests/test_sac_core.py", "tests/test_presets_and_checkpoints.py"])
    """test files run against the curricula and SAC mutants (missing ones are skipped)"""
    loop_tests: list[str] = field(default_factory=lambda: ["tests/test_loop_seams.py",
                                                           "tests/test_rfcl_integration.py"])
    """test files run against the training-loop mutants (missing ones are skipped)"""
    data_tests: list[str] = field(default_factory=lambda: ["tests/test_data_path.py"])
    """test files run against the mutants of what the buffers store (missing ones are skipped)"""
    signal_tests: list[str] = field(default_factory=lambda: [
        "tests/test_stop_signals.py", "tests/test_rfcl_integration.py", "tests/test_collect_demos.py",
        "tests/test_benchmarks.py", "-k", "signal or ctrl_c or handler"])
    """pytest arguments run against the mutants of stop_signals.py (missing test files are skipped)"""
    property_tests: list[str] = field(default_factory=lambda: [
        "tests/test_properties.py", "tests/test_loop_seams.py", "tests/test_data_path.py", "tests/test_sac_core.py",
        "tests/test_rfcl_units.py", "tests/test_gpu_path.py", "tests/test_presets_and_checkpoints.py",
        "tests/test_rfcl_integration.py", "tests/test_rlpd_integration.py", "tests/test_resume.py"])
    """test files run against the mutants of what makes each script its algorithm (PROPERTY_GROUPS; missing ones are
    skipped)"""
    groups: list[str] = field(default_factory=list)
    """run only these groups (default: all)"""
    only: list[str] = field(default_factory=list)
    """run only mutants whose name contains one of these"""
    timeout: int = 900
    together: bool = False
    """test the selected mutants as a group, split in halves where it is caught (see the module docstring)"""
    out: Optional[str] = None


def run_mutant(repo: Path, file: str, old: str, new: str, tests: list[str], timeout: int,
               env: Optional[dict] = None, more: tuple = ()) -> tuple[str, float, str]:
    """(result, seconds, the test that failed): pytest -x on `tests` in a copy of `repo` whose `file` has `old`
    replaced by `new` (and each (file, old, new) of `more` planted too). result: "caught" (pytest failed), "SURVIVED"
    or "TIMEOUT" (not counted as caught: a slow machine is not a failing test)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.png"))
        for f, o, n in ((file, old, new), *more):
            path = copy / f
            text = path.read_text()
            if o not in text:
                raise SystemExit(f"mutants overlap: {f} no longer contains {o!r} once the others are planted")
            path.write_text(text.replace(o, n, 1))
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return "TIMEOUT", time.time() - t0, ""
        # pytest's summary line: "FAILED <test> - <first line of the error>" ("ERROR": in a fixture)
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        return ("caught" if proc.returncode else "SURVIVED"), time.time() - t0, (failed or [""])[0][:300]


def compiles(source: str) -> bool:
    try:
        compile(source, "mutant", "exec")
        return True
    except SyntaxError:
        return False


def run_together(repo: Path, planted: list[dict], tests: list[str], timeout: int, env: dict) -> None:
    """Group testing of `planted` (rows with file, old, new): sets each row's result (see the module docstring)."""
    result, secs, by = run_mutant(repo, *planted[0]["hit"], tests, timeout, env, tuple(r["hit"] for r in planted[1:]))
    print(f"{result} with {len(planted)} planted together ({secs:.0f} s)", file=sys.stderr, flush=True)
    if result != "caught" or len(planted) == 1:
        for r in planted:
            r.update(result=result + ("" if len(planted) == 1 else " (with the others)"), seconds=round(secs),
                     caught_by=by)
        return
    half = len(planted) // 2
    run_together(repo, planted[:half], tests, timeout, env)
    run_together(repo, planted[half:], tests, timeout, env)


def main(a: Args) -> list[dict]:
    repo = Path(a.repo or ROOT).resolve()
    # one JAX compilation cache for all the mutants of this process (the tests' conftest uses a given one): a mutant
    # compiles only what its mutation changed (the cache is keyed by the compiled program), not every network again
    cache = tempfile.TemporaryDirectory(prefix="mutation-jax-cache-")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache.name, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    rows = []
    for name, group, alternatives, *file in MUTANTS:
        if (a.only and not any(o in name for o in a.only)) or (a.groups and group not in a.groups):
            continue
        file = file[0] if file else "rfcl.py"
        source = (repo / file).read_text() if (repo / file).exists() else ""
        tests = [t for t in {"unit": a.unit_tests, "loop": a.loop_tests, "data": a.data_tests, "signals": a.signal_tests,
                             **dict.fromkeys(PROPERTY_GROUPS, a.property_tests)}[group]
                 if not t.endswith(".py") or (repo / t).exists()]
        hit = next(((o, n) for o, n, *marker in alternatives if o in source and all(m in source for m in marker)), None)
        if hit is None or not any(t.endswith(".py") for t in tests):
            rows.append({"mutant": name, "group": group, "result": "not applicable"})
        elif not compiles(source.replace(*hit, 1)):  # a test run would fail on the syntax, not on the mistake
            rows.append({"mutant": name, "group": group, "result": "INVALID (does not compile)"})
        elif a.together:  # tested below, as a group
            rows.append({"mutant": name, "group": group, "result": "pending", "hit": (file, *hit), "tests": tests})
            continue
        else:
            result, secs, by = run_mutant(repo, file, *hit, tests, a.timeout, env)
            rows.append({"mutant": name, "group": group, "result": result, "seconds": round(secs), "caught_by": by})
        print(f"{rows[-1]['result']:14s} {name}", file=sys.stderr, flush=True)
    planted = [r for r in rows if r["result"] == "pending"]
    if planted:
        if len({tuple(r["tests"]) for r in planted}) > 1:
            raise SystemExit("--together needs mutants that run the same tests: select groups of one kind")
        run_together(repo, planted, planted[0]["tests"], a.timeout, env)
        for r in planted:
            del r["hit"], r["tests"]
            print(f"{r['result']:14s} {r['mutant']}", file=sys.stderr, flush=True)
    applied = [r for r in rows if r["result"].split(" (")[0] in ("caught", "SURVIVED", "TIMEOUT")]
    count = {k: sum(r["result"].startswith(k) for r in applied) for k in ("caught", "SURVIVED", "TIMEOUT")}
    md = [f"Mutants of `{repo.name}`: {len(applied)} applied, {count['caught']} caught, {count['SURVIVED']} survived"
          + (f", {count['TIMEOUT']} timed out (not counted as caught)" if count["TIMEOUT"] else ""), "",
          "| mutant | group | result | caught by |", "| --- | --- | --- | --- |"]
    md += [f"| {r['mutant']} | {r['group']} | {r['result']} | {(r.get('caught_by') or '').split(' - ')[0]} |"
           for r in rows]
    print("\n".join(md))
    if a.out:
        Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
