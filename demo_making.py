"""Making demos when none are cached: ManiSkill's download, else its motion planners (offline), then conversion to the
requested obs and control modes. Read it to change where demos come from; get_demos finds a cached file or makes one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

import common
import vector_env
from common import DemoError, demo_dir

# ManiSkill's motion-planning solutions (mani_skill.examples.motionplanning.panda.run.MP_SOLUTIONS in 3.0.1).
MOTION_PLANNING_ENVS = (
    "DrawTriangle-v1", "PickCube-v1", "StackCube-v1", "PegInsertionSide-v1", "PlugCharger-v1",
    "PlaceSphere-v1", "PushCube-v1", "PullCubeTool-v1", "LiftPegUpright-v1", "PullCube-v1",
    "DrawSVG-v1", "StackPyramid-v1",
)


# The controllers ManiSkill's replay_trajectory converts pd_joint_pos demos (the planners' and the downloads') to
# (mani_skill.trajectory.utils.actions.conversion.from_pd_joint_pos in 3.0.1), besides pd_joint_pos itself
JOINT_TARGETS = ("pd_joint_pos", "pd_joint_delta_pos", "pd_joint_target_delta_pos", "pd_joint_vel")


def check_convertible(control_mode: str) -> None:
    """Before anything is planned, downloaded or converted: a DemoError if ManiSkill cannot convert pd_joint_pos demos
    to control_mode (its end-effector modes, pd_ee_*, it converts by inverse kinematics)."""
    if control_mode not in JOINT_TARGETS and not (control_mode.startswith("pd_ee_") and "vel" not in control_mode):
        raise DemoError(f"ManiSkill's replay_trajectory cannot convert pd_joint_pos demos to --control-mode "
                        f"{control_mode} (it converts to {', '.join(JOINT_TARGETS)} and the pd_ee_* modes); train "
                        f"with one of those, or record demos in {control_mode} and pass --dataset-path")


def _network_ok(url: str = "https://huggingface.co", timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable network"
        return False


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    # ManiSkill's own progress bars go straight to the terminal
    print(f"[demos] {what}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd)
    if proc.returncode != 0:
        raise DemoError(f"{what} failed (exit {proc.returncode}, output above): python {' '.join(cmd[1:])}")


def _convert(raw_h5: Path, obs_mode: str, control_mode: str, cwd: Path) -> Path:
    """Replay pd_joint_pos trajectories into the requested obs/control mode, keeping env states."""
    _run([sys.executable, "-m", "mani_skill.trajectory.replay_trajectory",
          "--traj-path", str(raw_h5), "--use-first-env-state", "-c", control_mode, "-o", obs_mode,
          "--save-traj", "--record-rewards", "--num-envs", "1"], cwd, "converting demos")
    out = raw_h5.with_name(f"{raw_h5.stem}.{obs_mode}.{control_mode}.physx_cpu.h5")
    if not out.exists():
        raise DemoError(f"conversion of {raw_h5} wrote no {out.name}; convert it by hand with "
                        "python -m mani_skill.trajectory.replay_trajectory and pass --dataset-path")
    return out


def generate_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int,
                   sim_config: dict | None = None) -> Path:
    """Generate >= num_demos successful demos offline with ManiSkill's motion planner under the physics sim_config
    ({} or None: the task's own; both files record it in their env_kwargs, and the conversion replays under it),
    convert them, and cache them in demo_dir()/env_id/motionplanning/. Files appear atomically (json last)."""
    if env_id not in MOTION_PLANNING_ENVS:
        raise DemoError(f"no demos for {env_id} on disk, none downloadable here, and ManiSkill has no motion "
                        f"planner for it; record demos (ManiSkill trajectory .h5) and pass --dataset-path")
    check_convertible(control_mode)
    final_dir = demo_dir() / env_id / "motionplanning"
    final_dir.mkdir(parents=True, exist_ok=True)
    # A few extra: a planner trajectory can fail to convert to a delta controller.
    n_gen = num_demos + max(2, num_demos // 10)
    name = f"generated_{n_gen}_{time.strftime('%Y%m%d_%H%M%S')}"
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".tmp", dir=final_dir) as tmp:
        tmp = Path(tmp)
        stats_path = tmp / "planner_stats.json"
        _run([sys.executable, str(Path(__file__).resolve()), "plan-demos", env_id, str(n_gen),
              str(planner_attempts(n_gen)), str(tmp / name), str(stats_path), json.dumps(sim_config or {})],
             tmp, f"generating {n_gen} demos with the motion planner")
        stats = common.read_json(stats_path)
        print(f"[demos] planner: {stats['successes']}/{stats['attempts']} attempts solved "
              f"{env_id}, {stats['seconds_per_success']:.1f} s per demo", flush=True)
        if stats["successes"] < n_gen:
            raise DemoError(f"ManiSkill's motion planner solved {env_id} only {stats['successes']} times in "
                            f"{stats['attempts']} attempts (budget 3 per demo + 10); record demos another way "
                            "and pass --dataset-path, or ask for fewer with --num-demos")
        raw = tmp / f"{name}.h5"
        out = _convert(raw, obs_mode, control_mode, tmp)
        n_ok = len(common.read_json(out.with_suffix(".json"))["episodes"])
        common.write_json(final_dir / f"{name}.planner.json", {**stats, "converted": n_ok})
        # the raw pd_joint_pos file is kept too: it is the source the converted one came from. Both are kept also
        # when too few converted: minutes of planning, and a smaller --num-demos finds them in the cache.
        for src in (raw, raw.with_suffix(".json"), out, out.with_suffix(".json")):
            os.replace(src, final_dir / src.name)
    if n_ok < num_demos:
        fewer = f"ask for fewer (--num-demos {n_ok}: cached, used without planning again) or" if n_ok else "use"
        raise DemoError(f"only {n_ok}/{n_gen} planner demos of {env_id} converted to {control_mode}; "
                        f"{fewer} another --control-mode")
    print(f"[demos] {n_ok} demos of {env_id} cached in {final_dir} ({time.time() - t0:.1f} s)", flush=True)
    return final_dir / out.name


def planner_attempts(num_demos: int) -> int:
    """Retry budget of the motion planner: 3 attempts per demo + 10, then a clear error instead of a hang
    (ManiSkill's own runner retries forever on a task its planner cannot solve)."""
    return 3 * num_demos + 10


def plan_demos(env_id: str, num_demos: int, max_attempts: int, out_stem: str, sim_config: dict | None = None) -> dict:
    """Run ManiSkill's motion-planning solution of env_id on seeds 0, 1, ... until num_demos succeed or
    max_attempts are spent; record the successful ones (pd_joint_pos, env states) to out_stem.h5/.json like
    mani_skill.examples.motionplanning.panda.run does. Returns the planner's statistics. Run in a subprocess
    (generate_demos): the planners' native code can crash its process."""
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS
    from mani_skill.utils.wrappers.record import RecordEpisode

    env = vector_env.make_env(env_id, obs_mode="none", control_mode="pd_joint_pos", render_mode="rgb_array",
                              sim_backend="cpu", **({"sim_config": sim_config} if sim_config else {}))
    out = Path(out_stem)
    env = RecordEpisode(env, output_dir=str(out.parent), trajectory_name=out.name, save_video=False,
                        source_type="motionplanning",
                        source_desc="official motion planning solution from ManiSkill contributors",
                        record_reward=False, save_on_reset=False)
    lengths, attempts, t_all = [], 0, time.time()
    with tqdm(total=num_demos, desc=f"planning {env_id}") as bar:
        while len(lengths) < num_demos and attempts < max_attempts:
            try:
                res = MP_SOLUTIONS[env_id](env, seed=attempts, debug=False, vis=False)
            except Exception as e:  # noqa: BLE001 - a failed plan is one failed attempt, as in ManiSkill's runner
                print(f"planner error on seed {attempts}: {e}", flush=True)
                res = -1
            attempts += 1
            if res != -1 and bool(res[-1]["success"].item()):
                env.flush_trajectory()
                lengths.append(int(res[-1]["elapsed_steps"].item()))
                bar.update(1)
            else:
                env.flush_trajectory(save=False)
    env.close()
    total = time.time() - t_all
    return dict(env_id=env_id, attempts=attempts, successes=len(lengths), success_rate=len(lengths) / attempts,
                seconds_total=total, seconds_per_success=total / max(len(lengths), 1),
                seconds_per_attempt=total / attempts, lengths=lengths)


def _download_demos(env_id: str, obs_mode: str, control_mode: str) -> Path | None:
    if not _network_ok():
        print("[demos] no network for ManiSkill's demo download; generating demos offline instead", flush=True)
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "mani_skill.utils.download_demo", env_id, "-o", str(demo_dir())],
                 Path(tmp), "downloading demos")
    except DemoError as e:
        print(f"[demos] download failed ({e}); generating demos offline instead", flush=True)
        return None
    raws = [p for p in (demo_dir() / env_id).rglob("trajectory.h5")]
    for raw in raws:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return _convert(raw, obs_mode, control_mode, Path(tmp))
            except DemoError as e:
                print(f"[demos] {e}", flush=True)
    return None



def make_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int, sim_config: dict | None = None) -> Path:
    """A trajectory file with >= num_demos demos of env_id in the requested modes: downloaded if the network allows
    (ManiSkill's own demos, recorded under the task's own physics: not with a sim_config), else generated offline with
    the motion planner; cached in demo_dir()/env_id."""
    check_convertible(control_mode)
    path = None if sim_config else _download_demos(env_id, obs_mode, control_mode)
    if path is not None and len(common.read_json(path.with_suffix(".json"))["episodes"]) >= num_demos:
        return path
    return generate_demos(env_id, obs_mode, control_mode, num_demos, sim_config)


def get_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int,
              dataset_path: str | None = None, sim_config: Optional[dict] = None) -> Path:
    """Path of a trajectory file with >= num_demos demos: `dataset_path` if given, else cached, else made
    (demo_making: downloaded, else generated offline), under the physics `sim_config` ({} or None: the task's own)."""
    if dataset_path:
        return Path(dataset_path)
    found = common.find_demo_file(env_id, obs_mode, control_mode, num_demos, sim_config)
    if found is not None:
        return found
    print(f"[demos] no cached {env_id} demos ({obs_mode}, {control_mode}, >= {num_demos}"
          f"{', --sim-config ' + json.dumps(sim_config) if sim_config else ''}) in {demo_dir()}", flush=True)
    return make_demos(env_id, obs_mode, control_mode, num_demos, sim_config or {})


def get_and_load_demos(env_id: str, obs_mode: str, control_mode: str, num_demos: int, dataset_path: Optional[str],
                       env_states: bool, sim_config: Optional[dict] = None,
                       dims: Optional[tuple[int, int]] = None) -> tuple[common.Demos, Path]:
    """The first num_demos demos (found, downloaded or generated) and their file, recorded under the physics
    sim_config ({} or None: the task's own), with the env's (obs_dim, act_dim) if given; a problem is a one-line
    error."""
    try:
        path = get_demos(env_id, obs_mode, control_mode, num_demos, dataset_path, sim_config)
        return common.load_demos(path, num_demos, env_id, obs_mode, control_mode, *(dims or (None, None)),
                          env_states=env_states, sim_config=sim_config or {}), path
    except DemoError as e:
        common.fail(str(e))


if __name__ == "__main__":
    # python demo_making.py plan-demos ENV_ID NUM_DEMOS MAX_ATTEMPTS OUT_STEM STATS_JSON SIM_CONFIG_JSON
    # (used by generate_demos)
    if len(sys.argv) == 8 and sys.argv[1] == "plan-demos":
        _, _, env_id_, n_, budget_, stem_, stats_, sim_ = sys.argv
        common.write_json(Path(stats_), plan_demos(env_id_, int(n_), int(budget_), stem_, json.loads(sim_)))
    else:
        common.fail("usage: python demo_making.py plan-demos ENV_ID NUM_DEMOS MAX_ATTEMPTS OUT_STEM STATS_JSON "
                    "SIM_CONFIG_JSON")
