"""Throughput on the machine it runs on: jitted updates, the critic ensemble, the vector env, the training loop.

    python benchmarks/throughput.py                      # everything (~15 min on 2 CPU cores)
    python benchmarks/throughput.py --parts updates ensemble

Every figure is the median over --repeats timed repetitions after --warmup untimed ones (the first call
compiles). Prints a markdown table and writes <out>/throughput_<machine>.{json,md}.

- updates:  one `update_many` call (the jitted lax.scan of `grad_updates_per_step` SAC updates) per preset of
            rfcl.py and rlpd.py: ms per call and updates/s.
- ensemble: the same call for the rfcl fast preset with num_qs = 2, 5, 10: ms per update.
- envs:     env steps/s of the CPU vector env (one process per env) at 1, 2, 4, 8 envs, random actions,
            a reset every 50 steps as in training; on a CUDA machine also the GPU backend at 64..1024 envs. With
            --control-mode and --sim-config (rfcl.py's physics flag): what a step costs under other physics.
- resets:   the cost of one round of GPU resets in which every env finishes, at 16, 256 and 1024 envs: ManiSkill
            rebuilds the generators of all envs at each seeded reset call (timed here: BatchedRNG.from_seeds);
            one call per env (the old GPUEnvs) against GPUEnvs' batched resets (no seeded call for seeds with a
            fixed initial state, one for the others). Runs without a GPU.
- rebuilds: one seeded reset of a CPU env of --env-id in this process (as in an env worker: torch, JAX and ManiSkill
            loaded), built by plain gym.make and by vector_env.make_env, which freezes the heap so that the gc pass
            ManiSkill makes at every scene rebuild skips it (PegInsertionSide rebuilds its scene at every reset).
- loop:     a real rfcl.py / rlpd.py run (fast / walltime preset) in a temporary directory; env steps/s and
            the split of its wall-clock between simulation, jitted updates, eval and everything else, measured
            between two log points after warm-up (compilation and random seed steps excluded).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
Part = Literal["updates", "ensemble", "envs", "loop", "resets", "rebuilds"]


@dataclass
class Args:
    parts: list[Part] = field(default_factory=lambda: ["updates", "ensemble", "envs", "loop"])
    """what to measure"""
    env_id: str = "PickCube-v1"
    repeats: int = 20
    """timed repetitions per update figure"""
    warmup: int = 3
    """untimed repetitions first (compilation)"""
    env_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """CPU vector env sizes"""
    gpu_env_counts: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    """GPU backend sizes (only where CUDA exists)"""
    env_steps: int = 200
    """timed steps per env for each env figure"""
    control_mode: str = "pd_joint_delta_pos"
    """controller of the env figures"""
    sim_config: Optional[str] = None
    """physics of the env figures (rfcl.py's --sim-config: ms2 or a JSON object)"""
    loop_steps: int = 20_000
    """env steps of each training-loop run; the figures cover the steps after --loop-warmup"""
    loop_warmup: int = 10_000
    """env steps not counted (5000 random seed steps and compilation)"""
    out: str = "benchmarks/results"
    name: str = ""
    """output file stem (default: throughput_cpu or throughput_gpu)"""


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch without CUDA support at all
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "python": platform.python_version()}


def timed(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() (fn must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- jitted updates -------------------------------------------------------------------------------------
def update_call_seconds(module, args, obs_dim: int, act_dim: int, repeats: int, warmup: int) -> float:
    """Median time of one update_many call with `grad_updates_per_step` updates on filled buffers."""
    import jax

    key = jax.random.PRNGKey(0)
    actor, critic, state = module.init_sac(args, obs_dim, act_dim, key)
    _, _, update_many = module.make_update(args, actor, critic, act_dim)
    rng = np.random.default_rng(0)
    bufs = []
    for size in (50_000, 5_000):  # online, offline
        buf = module.ReplayBuffer(size, obs_dim, act_dim)
        buf.add({"obs": rng.normal(size=(size, obs_dim)), "actions": rng.uniform(-1, 1, (size, act_dim)),
                 "rewards": (rng.random(size) < 0.1), "next_obs": rng.normal(size=(size, obs_dim)),
                 "masks": np.ones(size)})
        bufs.append(buf)
    online, offline = bufs
    box = {"state": state, "key": key}

    def call():
        box["key"], k = jax.random.split(box["key"])
        box["state"], info = update_many(box["state"], online.data, online.size, offline.data, offline.size, k,
                                         args.grad_updates_per_step)
        jax.block_until_ready(info)

    return timed(call, repeats, warmup)


def bench_updates(a: Args, obs_dim: int, act_dim: int) -> list[dict]:
    import rfcl
    import rlpd

    rows = []
    for name, module in (("rfcl", rfcl), ("rlpd", rlpd)):
        for preset, args in module.PRESETS.items():
            s = update_call_seconds(module, args, obs_dim, act_dim, a.repeats, a.warmup)
            rows.append({"algo": name, "preset": preset, "num_qs": args.num_qs,
                         "updates_per_call": args.grad_updates_per_step, "ms_per_call": 1e3 * s,
                         "updates_per_s": args.grad_updates_per_step / s,
                         "env_steps_per_call": args.num_envs * args.steps_per_env})
            print(f"updates  {name:4s} {preset:16s} {1e3 * s:8.1f} ms/call {rows[-1]['updates_per_s']:7.1f} updates/s",
                  flush=True)
    return rows


def bench_ensemble(a: Args, obs_dim: int, act_dim: int) -> list[dict]:
    import rfcl

    rows = []
    for num_qs in (2, 5, 10):
        args = replace(rfcl.PRESETS["fast"], num_qs=num_qs, num_min_qs=2)
        s = update_call_seconds(rfcl, args, obs_dim, act_dim, a.repeats, a.warmup)
        rows.append({"num_qs": num_qs, "ms_per_update": 1e3 * s / args.grad_updates_per_step,
                     "updates_per_s": args.grad_updates_per_step / s})
        print(f"ensemble num_qs={num_qs:2d} {rows[-1]['ms_per_update']:6.2f} ms/update", flush=True)
    return rows


# ---- environments ---------------------------------------------------------------------------------------
def env_steps_per_s(args, num_envs: int, steps: int, reset_every: int = 50) -> float:
    import vector_env

    envs = vector_env.make_envs(args.env_id, num_envs, args.sim_backend, args.obs_mode, args.control_mode,
                                sim_config=vector_env.sim_config(args.sim_config))
    try:
        rng = np.random.default_rng(0)
        all_envs = np.ones(num_envs, bool)
        envs.reset(all_envs, np.arange(num_envs))
        for _ in range(10):  # warm-up
            envs.step(rng.uniform(-1, 1, (num_envs, envs.act_dim)).astype(np.float32))
        t0 = time.perf_counter()
        for i in range(steps):
            envs.step(rng.uniform(-1, 1, (num_envs, envs.act_dim)).astype(np.float32))
            if (i + 1) % reset_every == 0:
                envs.reset(all_envs, np.arange(num_envs) + i)
        return num_envs * steps / (time.perf_counter() - t0)
    finally:
        envs.close()


def bench_envs(a: Args) -> list[dict]:
    import rfcl
    import torch

    backends = [("cpu", a.env_counts)]
    if torch.cuda.is_available():
        backends.append(("gpu", a.gpu_env_counts))
    else:
        print("envs     gpu backend skipped: no CUDA on this machine", flush=True)
    rows = []
    for backend, counts in backends:
        for n in counts:
            args = replace(rfcl.PRESETS["fast"], env_id=a.env_id, num_envs=n, sim_backend=backend,
                           control_mode=a.control_mode, sim_config=a.sim_config)
            sps = env_steps_per_s(args, n, a.env_steps)
            rows.append({"backend": backend, "num_envs": n, "env_steps_per_s": sps})
            print(f"envs     {backend} {n:5d} envs {sps:8.1f} env steps/s", flush=True)
    return rows


# ---- the training loop ----------------------------------------------------------------------------------
def loop_split(run_dir: Path, warmup_steps: int) -> dict:
    """SPS and time fractions between the first log point at or after warmup_steps and the last one.

    The scripts log cumulative fractions of elapsed time (time/*_frac) and the mean SPS since the start, so
    elapsed(step) = step / SPS and each component's seconds = frac * elapsed; differences give the window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series = {t: {e.step: e.value for e in acc.Scalars(t)} for t in
              ("charts/SPS", "time/simulation_frac", "time/update_frac", "time/eval_frac")}
    steps = sorted(s for s in series["charts/SPS"] if all(s in v for v in series.values()))
    after = [s for s in steps if s >= warmup_steps]
    if len(after) < 2:
        raise ValueError(f"{run_dir}: fewer than two log points after {warmup_steps} env steps")
    s0, s1 = after[0], after[-1]

    def seconds(step):
        elapsed = step / series["charts/SPS"][step]
        return elapsed, {k: series[f"time/{k}_frac"][step] * elapsed for k in ("simulation", "update", "eval")}

    e0, c0 = seconds(s0)
    e1, c1 = seconds(s1)
    window = e1 - e0
    fracs = {k: (c1[k] - c0[k]) / window for k in c0}
    fracs["other"] = 1 - sum(fracs.values())
    return {"from_step": s0, "to_step": s1, "env_steps_per_s": (s1 - s0) / window,
            **{f"{k}_frac": v for k, v in fracs.items()}}


def bench_loop(a: Args) -> list[dict]:
    rows = []
    for algo in ("rfcl", "rlpd"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / f"{algo}.py"), "--env-id", a.env_id, "--exp-name", "throughput",
                   "--total-timesteps", str(a.loop_steps), "--eval-freq", str(10 * a.loop_steps),
                   "--num-eval-episodes", "8", "--no-capture-video", "--save-freq", str(10 * a.loop_steps)]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            row = {"algo": algo, **loop_split(Path(tmp) / "runs" / "throughput", a.loop_warmup)}
        rows.append(row)
        print(f"loop     {algo} {row['env_steps_per_s']:6.1f} env steps/s: simulation {row['simulation_frac']:.0%}, "
              f"updates {row['update_frac']:.0%}, eval {row['eval_frac']:.0%}, other {row['other_frac']:.0%}",
              flush=True)
    return rows


def bench_resets(a: Args) -> list[dict]:
    from mani_skill.envs.utils.randomization.batched_rng import BatchedRNG

    rows = []
    for n in (16, 256, 1024):
        rebuild = timed(lambda n=n: BatchedRNG.from_seeds(np.arange(n), backend="numpy:random_state"), 3, 1)
        rows.append({"num_envs": n, "generator_rebuild_ms": 1000 * rebuild, "round_one_call_per_env_s": n * rebuild,
                     "round_batched_fixed_seeds_s": 0.0, "round_batched_other_seeds_s": rebuild})
        print(f"resets   {n:5d} envs: one call per env {n * rebuild:7.2f} s per round; batched: 0 (fixed initial "
              f"states) or {rebuild * 1000:.1f} ms (one seeded call)", flush=True)
    return rows


def bench_rebuilds(a: Args) -> list[dict]:
    import gc

    import gymnasium as gym

    import vector_env

    kwargs = vector_env.env_kwargs("state", "pd_joint_delta_pos", 1, "physx_cpu")
    rows = []
    for how, make in (("gym.make", lambda: gym.make(a.env_id, **kwargs)),
                      ("vector_env.make_env", lambda: vector_env.make_env(a.env_id, **kwargs))):
        env = make()
        seeds = iter(range(10**6))
        s = timed(lambda env=env, seeds=seeds: env.reset(seed=next(seeds)), a.repeats, a.warmup)
        rows.append({"how": how, "ms_per_reset": 1000 * s, "frozen_objects": gc.get_freeze_count(),
                     "tracked_objects": len(gc.get_objects())})
        env.close()
        print(f"rebuilds {a.env_id} {how:20s} {1000 * s:7.1f} ms per seeded reset "
              f"({gc.get_freeze_count()} objects frozen, {len(gc.get_objects())} tracked)", flush=True)
    gc.unfreeze()
    return rows


# ---- report ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, JAX backend: {m['jax_backend']}",
             f"Command: `{result['command']}`", ""]
    if "updates" in result:
        lines += ["| script | preset | critics | updates per call | ms per call | updates/s |", "|-|-|-|-|-|-|"]
        lines += [f"| {r['algo']} | {r['preset']} | {r['num_qs']} | {r['updates_per_call']} | {r['ms_per_call']:.1f} "
                  f"| {r['updates_per_s']:.0f} |" for r in result["updates"]] + [""]
    if "ensemble" in result:
        lines += ["| critics (num_qs) | ms per update | updates/s |", "|-|-|-|"]
        lines += [f"| {r['num_qs']} | {r['ms_per_update']:.2f} | {r['updates_per_s']:.0f} |"
                  for r in result["ensemble"]] + [""]
    if "envs" in result:
        lines += ["| backend | envs | env steps/s |", "|-|-|-|"]
        lines += [f"| {r['backend']} | {r['num_envs']} | {r['env_steps_per_s']:.0f} |" for r in result["envs"]] + [""]
    if "resets" in result:
        lines += ["| envs | one reset round, one call per env | batched, fixed seed states | batched, other seeds |",
                  "|-|-|-|-|"]
        lines += [f"| {r['num_envs']} | {r['round_one_call_per_env_s']:.2f} s | 0 generator rebuilds | "
                  f"{r['round_batched_other_seeds_s'] * 1000:.1f} ms |" for r in result["resets"]] + [""]
    if "rebuilds" in result:
        lines += [f"One seeded reset of a {result['env_id']} CPU env in one process:", "",
                  "| env built by | ms per reset | objects frozen | objects gc tracks |", "|-|-|-|-|"]
        lines += [f"| {r['how']} | {r['ms_per_reset']:.1f} | {r['frozen_objects']:,} | {r['tracked_objects']:,} |"
                  for r in result["rebuilds"]] + [""]
    if "loop" in result:
        lines += ["| script (default preset) | env steps/s | simulation | updates | eval | other |", "|-|-|-|-|-|-|"]
        lines += [f"| {r['algo']} | {r['env_steps_per_s']:.1f} | {r['simulation_frac']:.0%} | {r['update_frac']:.0%} "
                  f"| {r['eval_frac']:.0%} | {r['other_frac']:.0%} |" for r in result["loop"]] + [""]
    return "\n".join(lines)


def main(a: Args) -> dict:
    import mani_skill.envs  # noqa: F401
    import gymnasium as gym

    probe = gym.make(a.env_id, obs_mode="state", control_mode="pd_joint_delta_pos", num_envs=1)
    obs_dim, act_dim = probe.observation_space.shape[-1], probe.action_space.shape[-1]
    probe.close()
    result = {"machine": machine(), "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
              "env_id": a.env_id, "obs_dim": int(obs_dim), "act_dim": int(act_dim)}
    if "updates" in a.parts:
        result["updates"] = bench_updates(a, obs_dim, act_dim)
    if "ensemble" in a.parts:
        result["ensemble"] = bench_ensemble(a, obs_dim, act_dim)
    if "envs" in a.parts:
        result["envs"] = bench_envs(a)
    if "loop" in a.parts:
        result["loop"] = bench_loop(a)
    if "resets" in a.parts:
        result["resets"] = bench_resets(a)
    if "rebuilds" in a.parts:
        result["rebuilds"] = bench_rebuilds(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or "throughput_" + ("gpu" if result["machine"]["gpu"] else "cpu")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
