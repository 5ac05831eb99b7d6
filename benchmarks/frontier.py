"""Where along each demo can a policy solve the task? A probe of RFCL's stage 1 (the reverse curriculum).

    python benchmarks/frontier.py runs/<run>/checkpoints/step_00100000.ckpt --every 4 --stochastic 5

For each demo and each start step t = 0, every, 2*every, ... it resets the env to the demo's state t (as stage 1
does), then runs the policy for the stage-1 time limit 16 + (T - t) // ratio, and records whether the episode
succeeded at some step and at its last step, the step of the first success, and which of the task's own flags (the
booleans its evaluate() reports besides success, e.g. PickCube's is_grasped, is_obj_placed, is_robot_static;
StackCube's is_cubeA_grasped, is_cubeA_on_cubeB, is_cubeA_static; for a task whose evaluate() reports no such flag,
PullCubeTool and PegInsertionSide, the stages of its own dense reward, see TASK_FLAGS) were ever true. Deterministic
(policy mean) once per start, since CPU simulation repeats exactly; with --stochastic N also N sampled-action
episodes, as training episodes act. On PickCube a start that fails with is_grasped never true failed to grasp; with
is_grasped but not is_obj_placed it dropped or never carried the cube; with is_obj_placed it never held still. Prints
a markdown table; --out also writes it with a json. Above it, for demo states, the same by quarter of the demo (start
t / T) and by scene: the ones the run trained on (the episode seeds of its first --num-demos demos, in the file
training finds) and new ones, so that a file of more planner demos (--dataset-path, --num-demos) tells how far along a
demo a policy that solves its own scenes still solves others, and (new scenes split by how near each is to a seen
one) whether it solves the new scenes near its own more often.

The policy is built by the script that wrote the checkpoint (a copy of rfcl.py or rlpd.py with an edited Actor
included; --script names another). An rlpd.py checkpoint is probed the same way, with the run's episode horizon (--max-episode-steps) as the time limit
of every start: it shows how far from the goal along the demos an RLPD policy that fails from the env's own initial
states can still solve the task.

With --initial-states N it probes the env's own initial states instead, the ones eval starts from (seeds 10**6 + k,
k < N), each for the run's eval horizon: where a policy that has left the demos behind (RFCL's stage 2, RLPD) fails.

    python benchmarks/frontier.py runs/<run>/checkpoints/final.ckpt --initial-states 50 --stochastic 3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import stop_signals  # noqa: E402  first: from here a stop signal exits with one line, the slow imports too

import json  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import tyro  # noqa: E402

NOT_FLAGS = ("success", "fail", "success_once", "success_at_end")  # success is its own column; fail is the env's


def _pull_cube_tool_flags(u) -> dict:
    """PullCubeTool's dense reward stages: the tool grasped, then its hook within 5 cm of its place behind the cube
    (the planner's demos get there 100-130 steps after the grasp, and succeed 34-50 steps later)."""
    cube, tool = u.cube.pose.p, u.l_shape_tool.pose.p
    hook = cube + cube.new_tensor([-(u.hook_length + u.cube_half_size), -0.067, 0])
    return {"is_tool_grasped": u.agent.is_grasping(u.l_shape_tool, max_angle=20),
            "is_tool_behind_cube": (tool - hook).norm(dim=1) < 0.05}


def _peg_insertion_side_flags(u) -> dict:
    """PegInsertionSide's dense reward stages: the peg grasped (within 20 degrees, as the reward asks), then grasped
    with its head and its centre both within 1 cm of the hole's axis (the reward's "pre-inserted": from there only
    the push along the axis is left)."""
    grasped = u.agent.is_grasping(u.peg, max_angle=20)
    to_goal = u.goal_pose.inv()  # the hole's frame: its axis is x, so y and z are the distances off it
    head = (to_goal * u.peg_head_pose).p[:, 1:].norm(dim=1)
    centre = (to_goal * u.peg.pose).p[:, 1:].norm(dim=1)
    return {"is_peg_grasped": grasped, "is_peg_lined_up": grasped & (head < 0.01) & (centre < 0.01)}


# Stage flags for tasks whose evaluate() reports none, computed from the env after every step
TASK_FLAGS = {"PullCubeTool-v1": _pull_cube_tool_flags, "PegInsertionSide-v1": _peg_insertion_side_flags}


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a checkpoint of rfcl.py, rlpd.py or a copy of either"""
    script: Optional[str] = None
    """the script whose networks, flags and stage-1 time limit to use (default: the one that wrote the checkpoint)"""
    dataset_path: Optional[str] = None
    """demos to probe (default: the ones the script finds for the checkpoint's env, as in training)"""
    num_demos: Optional[int] = None
    """first N demos of the file (default: the checkpoint's --num-demos)"""
    every: int = 4
    """probe start steps 0, every, 2*every, ... of each demo"""
    stochastic: int = 0
    """also run this many sampled-action episodes per start"""
    seed: int = 0
    """key of the sampled actions"""
    demo_actions: bool = False
    """replay the demo's own actions from t instead of the policy, until the demo ends: checks the resets, and
    shows which starts the time limit leaves the demo's own pace (it needs T - t steps)"""
    initial_states: int = 0
    """probe the env's own initial states of the first N eval seeds (10**6 + k), with the eval horizon, instead of
    demo states"""
    out: Optional[str] = None
    """write <out>.md and <out>.json too"""


def probe(a: Args) -> dict:
    import jax
    import jax.numpy as jnp

    import demo_making
    import run_files
    import vector_env

    stop_signals.exit_if_signalled()  # a Ctrl-C during these imports whose exit a library dropped
    ckpt = run_files.load_checkpoint(a.checkpoint)
    script = run_files.checkpoint_script(ckpt, a.checkpoint, a.script)
    targs = script.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(ckpt["args"]).items()})
    limit = targs.max_episode_steps or vector_env.registered_horizon(targs.env_id)
    physics = run_files.checkpoint_sim_config(ckpt)  # the probe simulates as training did
    demos = path = reverse = None
    seen, seen_file = None, None
    if not a.initial_states:
        seen, seen_file = trained_seeds(targs, physics)
        demos, path = demo_making.get_and_load_demos(targs.env_id, targs.obs_mode, targs.control_mode,
                                                a.num_demos or targs.num_demos, a.dataset_path or targs.dataset_path,
                                                True, physics)
        # the time limit of training itself (an RFCL script: stage 1's; rlpd.py: every episode has the task's
        # horizon, resolved in a checkpoint's args.json), so the probe resets and times out exactly as training
        if hasattr(script, "ReverseCurriculum"):
            reverse = script.ReverseCurriculum(demos.lengths, targs.reverse_step_size, targs.per_demo_buffer_size,
                                               targs.demo_horizon_to_max_steps_ratio, targs.reverse_solved_frac,
                                               np.random.default_rng(0))
    env = vector_env.CPUWorkerEnv(targs.env_id, vector_env.env_kwargs(targs.obs_mode, targs.control_mode, 1,
                                                                      "physx_cpu", sim_config=physics))
    det, sample = script.load_actor(ckpt)
    key = jax.random.PRNGKey(a.seed)
    stage_flags = TASK_FLAGS.get(targs.env_id, lambda u: {})
    first_row = np.concatenate([[0], np.cumsum(demos.lengths)[:-1]]) if demos else None  # of each demo's rows

    def episode(i: Optional[int], t: int, key=None) -> dict:
        """Demo i from its step t, or (i None) the env's initial state of seed t."""
        if i is None:
            obs, _ = env.reset(seed=t)
            horizon = limit
        else:
            # as RFCL's stage 1 starts an episode: the demo's scene from its seed, then its state at step t
            obs, _ = env.reset(seed=demos.episodes[i]["episode_seed"], options={"states": [(
                jax.tree_util.tree_map(lambda x: x[t], demos.env_states[i]), demos.traj_obs[i][t])]})
            horizon = int(reverse.horizon(i, t)) if reverse else limit
        r = dict(once=False, at_end=False, first=None)
        flags = {}  # the task's boolean evaluate() (or TASK_FLAGS) flags: ever true in this episode
        steps = min(horizon, int(demos.lengths[i]) - t) if a.demo_actions else horizon
        for step in range(steps):
            o = jnp.asarray(obs[None], jnp.float32)
            if a.demo_actions:
                act = demos.actions[None, first_row[i] + t + step]
            elif key is None:
                act = det(o)
            else:
                key, k = jax.random.split(key)
                act = sample(o, k)
            obs, _, _, _, info = env.step(np.asarray(act)[0])
            info = {**info, **{k: v.cpu().numpy()[0] for k, v in stage_flags(env.unwrapped).items()}}
            for name, v in info.items():
                if name not in NOT_FLAGS and np.asarray(v).dtype == bool:
                    flags[name] = flags.get(name, False) or bool(v)
            if info["success"] and r["first"] is None:
                r["first"] = step + 1
            r["once"] |= bool(info["success"])
            r["at_end"] = bool(info["success"])  # of the last step: eval's success_at_end
        return {**r, "horizon": horizon, "flags": flags}

    if a.initial_states:  # eval's seeds (common.evaluate)
        starts = [(None, 10**6 + k, {"seed": 10**6 + k}) for k in range(a.initial_states)]
    else:
        seeds = [int(e["episode_seed"]) for e in demos.episodes[: demos.num_trajectories]]
        near = nearest_seen(np.stack([demos.traj_obs[i][0] for i in range(len(seeds))]), seeds, seen)
        starts = [(i, t, {"demo": i, "seed": seeds[i], "T": int(demos.lengths[i]), "start": t,
                          **({"nearest_seen": near[i]} if near else {})})
                  for i in range(len(seeds)) for t in range(0, int(demos.lengths[i]), a.every)]
    rows = []
    for i, t, where in starts:
        stop_signals.exit_if_signalled()  # a Ctrl-C whose exit was dropped ends it here
        row = {**where, **episode(i, t)}
        if a.stochastic and not a.demo_actions:
            key, *ks = jax.random.split(key, a.stochastic + 1)
            eps = [episode(i, t, k) for k in ks]
            row["sto_once"] = float(np.mean([e["once"] for e in eps]))
            row["sto_at_end"] = float(np.mean([e["at_end"] for e in eps]))
            row["sto_flags"] = {k: float(np.mean([e["flags"].get(k, False) for e in eps]))
                                for k in set(row["flags"]).union(*(e["flags"] for e in eps))}
        rows.append(row)
        print(f"{where}: success_once {int(row['once'])}", file=sys.stderr, flush=True)
    env.close()
    return {"checkpoint": a.checkpoint, "algorithm": ckpt["algorithm"], "global_step": int(ckpt["global_step"]),
            "dataset": str(path) if path else None, "demo_actions": a.demo_actions,
            "initial_states": a.initial_states, "trained_seeds": seen, "trained_file": seen_file, "rows": rows}


def trained_seeds(targs, physics: dict) -> tuple[Optional[list[int]], Optional[str]]:
    """The episode seeds of the demos the run trained on (the first --num-demos of its --dataset-path, else of the
    file training finds on this machine; none is made) and that file; (None, None) where there is none."""
    import common

    path = Path(targs.dataset_path) if targs.dataset_path else common.find_demo_file(
        targs.env_id, targs.obs_mode, targs.control_mode, targs.num_demos, physics)
    if path is None or not path.with_suffix(".json").is_file():
        return None, None
    episodes = common.read_json(path.with_suffix(".json")).get("episodes", [])[: targs.num_demos]
    return [int(e["episode_seed"]) for e in episodes], str(path)


def nearest_seen(first_obs: np.ndarray, seeds: list[int], seen: Optional[list[int]]) -> Optional[list[float]]:
    """How far each demo's scene is from the nearest scene the run trained on: the distance between their first
    observations, each dimension that varies over the file's first observations scaled to unit spread (0 for a
    seen scene). A crude measure (the robot's own small start noise counts as much as the hole's pose), enough to
    ask whether a policy solves new scenes near its demos' more often than far ones. None without seen and new."""
    is_seen = np.isin(seeds, seen if seen is not None else [])
    if is_seen.all() or not is_seen.any():
        return None
    spread = first_obs.std(0)
    z = first_obs[:, spread > 1e-6] / spread[spread > 1e-6]
    dist = np.linalg.norm(z[:, None, :] - z[None, is_seen, :], axis=-1).min(1)
    return [float(d) for d in dist]


def by_part(result: dict, parts: int = 4) -> list[dict]:
    """Demo-state rows pooled by scene (seen: a seed the run trained on; new; or all, where the run's demos are
    unknown) and by part of the demo the start lies in (start / T in [k / parts, (k + 1) / parts)): the fraction of
    starts that succeeded (deterministic, and sampled where probed) and that raised each flag. The new scenes are
    pooled again in two halves, nearer and farther from a seen scene (nearest_seen), where the rows record it."""
    rows, seen = result["rows"], result.get("trained_seeds")
    # the new scenes split at the median of their distance to the nearest seen one (nearest_seen), where recorded
    new = sorted({(r["nearest_seen"], r["demo"]) for r in rows if "nearest_seen" in r and r["seed"] not in seen}
                 ) if seen is not None else []
    nearer = {demo for _, demo in new[: len(new) // 2]}
    groups: dict[tuple, list] = {}
    for r in rows:
        scene = "all" if seen is None else "seen" if r["seed"] in seen else "new"
        k = min(parts * r["start"] // r["T"], parts - 1)
        groups.setdefault((scene, k), []).append(r)
        if scene == "new" and len(new) >= 2:
            groups.setdefault(("new, nearer half" if r["demo"] in nearer else "new, farther half", k), []).append(r)
    out = []
    order = {"seen": 0, "new": 1, "new, nearer half": 2, "new, farther half": 3, "all": 4}
    for (scene, k), rs in sorted(groups.items(), key=lambda g: (order[g[0][0]], g[0][1])):
        flags = sorted({f for r in rs for f in (*r["flags"], *r.get("sto_flags", {}))})
        row = {"scene": scene, "part": f"{100 * k // parts}-{100 * (k + 1) // parts}%",
               "demos": len({r["demo"] for r in rs}), "starts": len(rs),
               "once": float(np.mean([r["once"] for r in rs])),
               "flags": {f: float(np.mean([r["flags"].get(f, False) for r in rs])) for f in flags}}
        if all("sto_once" in r for r in rs):
            row["sto_once"] = float(np.mean([r["sto_once"] for r in rs]))
            row["sto_flags"] = {f: float(np.mean([r["sto_flags"].get(f, 0) for r in rs])) for f in flags}
        out.append(row)
    return out


def part_table(result: dict) -> str:
    """by_part as markdown, with what `seen` means."""
    parts = by_part(result)
    flags = sorted({f for p in parts for f in p["flags"]})
    sampled = all("sto_once" in p for p in parts)
    cols = ["scenes", "start / T", "demos", "starts", "success_once", *flags]
    cols += ["sampled: success_once", *flags] if sampled else []
    seen = result.get("trained_seeds")
    lines = ["By part of the demo: " + (f"`seen` are the scenes the run trained on (episode seeds {seen}, the first "
             f"demos of `{result['trained_file']}`), `new` the others" + ("; the new ones also in two halves by how near "
             "their first observation is to a seen scene's (each varying dimension scaled to unit spread over the "
             "file)." if any(p["scene"].startswith("new,") for p in parts) else ".") if seen is not None else
             "the run's own demos were not found on this machine, so seen and new scenes are pooled."),
             "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for p in parts:
        c = [p["scene"], p["part"], p["demos"], p["starts"], f"{p['once']:.2f}",
             *(f"{p['flags'].get(f, 0):.2f}" for f in flags)]
        if sampled:
            c += [f"{p['sto_once']:.2f}", *(f"{p['sto_flags'].get(f, 0):.2f}" for f in flags)]
        lines.append("| " + " | ".join(map(str, c)) + " |")
    return "\n".join(lines) + "\n\n"


def table(result: dict, stochastic: bool) -> str:
    rows, initial = result["rows"], bool(result.get("initial_states"))
    flags = sorted({k for r in rows for k in (*r["flags"], *r.get("sto_flags", {}))})
    cols = [*(["seed"] if initial else ["demo", "seed", "T", "start"]), "time limit", "success_once", "success_at_end",
            *flags, "first success at"]
    if stochastic:
        cols += ["sampled: success_once", "success_at_end", *flags]
    who = ("the demos' own actions" if result["demo_actions"] else
           "deterministic policy" + (" and sampled actions" if stochastic else ""))
    where = (f"from the env's own initial states of eval seeds 10**6 + 0..{len(rows) - 1}" if initial else
             "from demo states")
    lines = [f"Checkpoint `{result['checkpoint']}` ({result['global_step']} env steps), {who}, {where}. A flag "
             "column says whether the task's evaluate() (or stage) flag was ever true in the episode (sampled: in "
             "which fraction).", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]

    def cells(r: dict, fmt) -> list:
        c = [fmt(r["once"]), fmt(r["at_end"]), *(fmt(r["flags"].get(k, False)) for k in flags),
             r["first"] if r["first"] is not None else "-"]
        if stochastic:
            c += [f"{r['sto_once']:.2f}", f"{r['sto_at_end']:.2f}", *(f"{r['sto_flags'].get(k, 0):.2f}" for k in flags)]
        return c

    for r in rows:
        head = [r["seed"]] if initial else [r["demo"], r.get("seed", "-"), r["T"], r["start"]]
        lines.append("| " + " | ".join(map(str, [*head, r["horizon"], *cells(r, int)])) + " |")
    if initial and rows:  # the fractions over all seeds, the figure to read first
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("once", "at_end")}
        mean["flags"] = {k: float(np.mean([r["flags"].get(k, False) for r in rows])) for k in flags}
        firsts = [r["first"] for r in rows if r["first"] is not None]
        mean["first"] = f"median {int(np.median(firsts))}" if firsts else "-"
        if stochastic:
            mean.update({k: float(np.mean([r[k] for r in rows])) for k in ("sto_once", "sto_at_end")})
            mean["sto_flags"] = {k: float(np.mean([r["sto_flags"].get(k, 0) for r in rows])) for k in flags}
        lines.append("| " + " | ".join(map(str, ["**all**", rows[0]["horizon"], *cells(mean, "{:.2f}".format)]))
                     + " |")
    return "\n".join(lines) + "\n"


def main(a: Args) -> dict:
    if a.every < 1 or a.stochastic < 0 or a.initial_states < 0:
        sys.exit("error: --every must be >= 1, --stochastic and --initial-states >= 0")
    if a.initial_states and a.demo_actions:
        sys.exit("error: --demo-actions replays demos from their own states; leave out --initial-states")
    if a.num_demos is not None and a.num_demos < 1:
        sys.exit(f"error: --num-demos must be >= 1, got {a.num_demos}")
    if a.out:  # before the probe, which can take an hour, not after it
        try:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=Path(a.out).parent).close()
        except OSError as e:
            sys.exit(f"error: cannot write --out {a.out} ({e.strerror or e}); pass a path in a writable folder")
    result = probe(a)
    md = table(result, a.stochastic > 0 and not a.demo_actions)
    if not a.initial_states and result["rows"]:  # the pooled table first, under the line that says what ran
        head, rest = md.split("\n\n", 1)
        md = head + "\n\n" + part_table(result) + rest
    print(md)
    if a.out:
        import common

        out = Path(a.out)
        common.write_atomic(out.with_suffix(".json"), json.dumps(result, indent=2).encode())
        common.write_atomic(out.with_suffix(".md"), md.encode())
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
