"""Flags of a run, shared by rfcl.py, rlpd.py and their copies: read it to change how defaults are layered (the Args
class, the per-task table, --preset, the command line), what --resume and --fork accept, or how a flag's range is
checked. Every function takes explicit values, never a script's Args: a copy may rename any flag but --preset,
--resume and --fork, which are read by name.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import tyro

import run_files
import run_log
import vector_env
from common import fail


def parse_args(args_cls, presets: dict, description: str, task_layer: Callable[[object], dict],
               resume_flags: tuple[str, ...], algorithm: str, script: str, argv=None, fork_fixed: tuple[str, ...] = ()):
    """Defaults in layers, each overriding the one before: the Args class; task_layer(args), the per-task values
    (the env's registered horizon, the script's table); the values `--preset X` sets; every flag given on the
    command line. Prints the per-task values it applied; args.json records the result. With --resume DIR the run's
    args.json is the source of truth instead, and only `resume_flags` may be given beside it (resume_args); the run
    must be one of `algorithm`, written by a script of the same file name as `script`. With --fork SOURCE the flags
    of the resume state there, and any flag given but `fork_fixed` (fork_args)."""
    argv = sys.argv[1:] if argv is None else argv
    preset = next(iter(presets))
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    default = presets.get(preset, presets[next(iter(presets))])  # tyro rejects an unknown name itself
    given = {a[2:].split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}
    if "resume" in given:
        return resume_args(args_cls, argv, given, description, resume_flags, algorithm, script)
    if "fork" in given:
        return fork_args(args_cls, argv, given, description, fork_fixed, algorithm)
    args = tyro.cli(args_cls, default=default, args=argv, description=description)
    base = dataclasses.asdict(args_cls())
    set_by_preset = {k for k, v in dataclasses.asdict(default).items() if v != base[k]}
    applied = {}
    for name, value in task_layer(args).items():
        if name.replace("_", "-") in given or name in set_by_preset or value is None:
            continue
        if getattr(args, name) != value:
            applied[name] = value
        setattr(args, name, value)
    if applied:
        print("per-task defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items()) +
              " (a flag on the command line overrides each)", flush=True)
    return args


def resume_args(args_cls, argv, given: set, description: str, resume_flags: tuple[str, ...], algorithm: str,
                script: str):
    """--resume DIR: the run's args.json, plus only the resume_flags given on the command line."""
    for flag in sorted(given - {"resume", *resume_flags}):
        fail(f"--{flag} cannot be given with --resume: the run's args.json fixes it; only "
             f"{', '.join('--' + f for f in resume_flags)} may change")
    run_dir = Path(flag_value(argv, "resume"))
    if not run_dir.is_dir():
        fail(f"--resume {run_dir}: no such run directory; pass runs/<exp-name> of the run to continue")
    header = run_files.read_resume_header(run_dir / run_files.RESUME_FILE, algorithm, script)
    try:
        base = args_from_json(args_cls, json.loads((run_dir / "args.json").read_text()))
    except Exception as e:  # noqa: BLE001 - missing, unreadable or from another version of the script
        fail(f"{run_dir / 'args.json'} is missing or does not match this script's flags ({type(e).__name__}: {e})")
    args = tyro.cli(args_cls, default=base, args=argv, description=description)
    args.resume = str(run_dir)
    for k, v in header["args"].items():
        if k not in ("resume", *(f.replace("-", "_") for f in resume_flags)) and json.dumps(v) != json.dumps(
                getattr(args, k, None), default=list):
            fail(f"{run_dir / 'args.json'} says --{k.replace('_', '-')} {getattr(args, k, None)} but the run's resume "
                 f"state was written with {v}; restore args.json (nothing was changed)")
    return args


def flag_value(argv, flag: str) -> str:
    """The value of --flag in argv (--flag V or --flag=V; '' if none follows)."""
    i = next(i for i, a in enumerate(argv) if a.replace("_", "-").split("=", 1)[0] == f"--{flag}")
    return argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")


def args_from_json(args_cls, saved: dict):
    """Args from a run's flags as JSON (args.json, a resume state's header): lists back to tuples."""
    return args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def fork_args(args_cls, argv, given: set, description: str, fork_fixed: tuple[str, ...], algorithm: str):
    """--fork SOURCE: a new run that starts from another run's resume state (any script of `algorithm`) with the flags
    that state was written with, and the flags given here changed, except `fork_fixed`: those whose values the state
    itself holds (the networks' shapes, the buffers and what fills them, the generators, the demos), which would
    otherwise be ignored without a word. The parent's files are only read."""
    for flag in ("resume", "checkpoint", "evaluate", "preset"):
        if flag in given:
            fail(f"--fork cannot be given with --{flag}: a fork takes the networks, buffers and flags of the state it "
                 f"starts from" + ("; give the changed flags themselves" if flag == "preset" else ""))
    path = run_files.fork_state_path(flag_value(argv, "fork"))
    if not path.is_file():
        fail(f"--fork {flag_value(argv, 'fork')}: no resume state there; pass a run directory (runs/<exp-name>) or a "
             f"resume-state file such as runs/<exp-name>/stage2_start.state")
    header = run_files.read_resume_header(path, algorithm)
    try:
        base = args_from_json(args_cls, header["args"])
    except TypeError as e:
        fail(f"{path} was written with flags this script does not have ({e}); fork it with "
             f"{Path(header.get('script') or algorithm + '.py').name}")
    # how the parent was started is not inherited: a resumed parent's --resume would make this run resume (and write)
    # the parent, and its --checkpoint's networks are in the state already
    base = dataclasses.replace(base, resume=None, checkpoint=None)
    args = tyro.cli(args_cls, default=base, args=argv, description=description)
    for name in fork_fixed:
        old, new = (json.dumps(getattr(a, name), default=list) for a in (base, args))
        if old != new:
            fail(f"--{name.replace('_', '-')} cannot change in a fork: the resume state holds what it made (networks' "
                 f"shapes, buffers, generators or demos); {path} was written with {old}")
    args.fork = str(path)
    if "exp-name" not in given:
        args.exp_name = f"{base.exp_name}__fork{header['global_step']}__{int(time.time())}"
    return args


def check_run_flags(env_id: str, max_episode_steps, total_timesteps: int, num_seed_steps: int, buffer_size: int,
                    capture_video: bool, render_size: int, evaluate: bool, checkpoint) -> None:
    """The checks between the flags every training script has (the env's horizon, the warm-up, videos,
    --evaluate): one line for the first that fails, a warning for a run that never updates."""
    if max_episode_steps is None:
        fail(f"{env_id} registers no max_episode_steps; give the episode horizon with --max-episode-steps")
    if total_timesteps <= num_seed_steps:  # allowed (a smoke test of the envs, random actions), but said
        print(f"warning: --total-timesteps {total_timesteps} is not above --num-seed-steps {num_seed_steps}: the run "
              f"ends before its first update, and its checkpoints hold untrained networks", flush=True)
    if buffer_size < num_seed_steps:
        fail(f"--buffer-size {buffer_size} is smaller than --num-seed-steps {num_seed_steps}: updates start only once "
             f"the online buffer holds that many transitions, so they would never start")
    if capture_video and render_size < 1:
        fail(f"--render-size must be >= 1 with videos, got {render_size} (or pass --no-capture-video)")
    if evaluate and not checkpoint:
        fail("--evaluate needs --checkpoint PATH")


def check_machine(sim_backend: str, track: bool) -> None:
    """What the machine must have: GPU simulation for --sim-backend gpu, Weights & Biases for --track."""
    if sim_backend == "gpu":
        vector_env.check_gpu_simulation()
    if track:
        run_log.check_wandb()


def check_ranges(args, ranges: dict) -> None:
    """One line for the first flag outside its range. `ranges` maps a flag's field name to ">= x", "> x" or an
    interval "[a, b)" (brackets include the bound, parentheses exclude it; a bound may be written 2**32). A flag left
    at None is not checked; a tuple flag needs one or more values, each in the range."""
    for name, spec in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if values and all(in_range(v, spec) for v in values):
            continue
        flag, where = f"--{name.replace('_', '-')}", spec if spec[0] in "<>" else f"in {spec}"
        if isinstance(value, tuple):
            fail(f"{flag} takes one or more values, each {where}, got {' '.join(map(str, value)) or 'none'}")
        fail(f"{flag} must be {where}, got {value}")


def in_range(value, spec: str) -> bool:
    """Whether `value` is in `spec` (check_ranges)."""
    def number(text):
        base, _, power = text.strip().partition("**")
        return float(base) ** float(power) if power else float(base)

    if spec.startswith(">="):
        return value >= number(spec[2:])
    if spec.startswith(">"):
        return value > number(spec[1:])
    low, high = (number(x) for x in spec[1:-1].split(","))
    return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)
