import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Most tests jit the same networks at the same shapes, in this process and in the scripts they start: one
# compilation cache for the session (set before jax is imported; subprocesses inherit it) compiles each once.
# Under pytest -n each worker gets its own: JAX writes cache files in place, so one could read another's half-written.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or os.environ.get("PYTEST_XDIST_WORKER"):
    _cache = tempfile.mkdtemp(prefix="rfcl-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

ENV_ID, OBS_MODE, CONTROL_MODE = "PickCube-v1", "state", "pd_joint_delta_pos"
PICKCUBE_OBS_DIM, PICKCUBE_ACT_DIM = 42, 8


@pytest.fixture(scope="session")
def asset_dir(tmp_path_factory):
    """A fresh ManiSkill asset dir for the whole session (demos are generated into it once)."""
    d = tmp_path_factory.mktemp("ms_assets")
    old = os.environ.get("MS_ASSET_DIR")
    os.environ["MS_ASSET_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("MS_ASSET_DIR", None)
    else:
        os.environ["MS_ASSET_DIR"] = old


@pytest.fixture(scope="session")
def demo_path(asset_dir):
    """3 PickCube demos generated offline by ManiSkill's motion planner (real simulator)."""
    import demo_making

    return demo_making.get_demos(ENV_ID, OBS_MODE, CONTROL_MODE, 3)


def run_script(args, cwd, timeout=600, check=True):
    """Run a repo script like a user would; returns CompletedProcess with text output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def interrupted(args, cwd, sig, after: float = 0.0, once: str = "", group: bool = True, within: float = 60):
    """Run a repo script as a user would and stop it as a terminal's Ctrl-C does (the signal to its whole process
    group, env workers included; group=False: to the process only, as `kill` does), `after` seconds from its start
    or once its stderr shows `once`. Returns (exit code, the non-empty stderr lines, tqdm's included)."""
    import signal
    import threading
    import time

    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    t0 = time.time()
    try:
        while time.time() - t0 < after or once not in "".join(err):
            assert proc.poll() is None, f"{args} ended ({proc.returncode}) before the signal:\n{''.join(err)[-3000:]}"
            assert time.time() - t0 < 300, f"{once!r} never appeared:\n{''.join(err)[-3000:]}"
            time.sleep(0.05)
        (os.killpg if group else os.kill)(proc.pid, sig)
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{signal.Signals(sig).name} did not stop {args} within {within} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    for _ in range(100):  # its env workers end with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"processes of {args} outlived it")
    lines = "".join(err).replace("\r", "\n").splitlines()
    return proc.returncode, [line.strip() for line in lines if line.strip()]


def one_line(fn) -> str:
    """The message of the user error that fn() exits with: one line starting 'error: '."""
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def error_line(proc) -> str:
    """The last stderr line of a failed run: our one-line user errors start with 'error: '."""
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class FakeBatchedEnv:
    """Stands in for a ManiSkill GPU-batched env (no CUDA here), with ManiSkill's reset semantics: a seeded call
    draws every env it resets from one stream seeded with the first env's seed (here: observation = 1000 * that
    seed + the env's rank in the call); a call with reset_to_env_states sets the given states (observation =
    the state's x). Every call returns all envs' observations; get_state_dict returns all envs' states."""

    def __init__(self, n):
        import torch

        self.obs, self.calls = torch.zeros(n, 3), []

    def reset(self, seed=None, options=None):
        import torch

        idx = options["env_idx"].tolist()
        if "reset_to_env_states" in options:
            self.calls.append(("states", idx))
            self.obs[idx] = options["reset_to_env_states"]["env_states"]["x"]
        else:
            self.calls.append(("seeded", idx))
            first = -1 if seed is None else int(np.atleast_1d(seed)[0])
            self.obs[idx] = (1000.0 * first + torch.arange(len(idx), dtype=torch.float32))[:, None]
        return self.obs.clone(), {}

    def get_state_dict(self):
        return {"x": self.obs.clone()}


def fake_gpu_envs(n):
    """vector_env.GPUEnvs around a FakeBatchedEnv, built without CUDA: (envs, fake)."""
    import vector_env

    fake = FakeBatchedEnv(n)
    g = vector_env.GPUEnvs.__new__(vector_env.GPUEnvs)
    g.env = g.base = fake
    g.num_envs, g.device, g.seeds, g.obs, g.table = n, "cpu", np.zeros(n, np.int64), None, {}
    return g, fake
