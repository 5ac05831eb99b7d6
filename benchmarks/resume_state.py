"""Size and write/read time of an RFCL resume state with a full online buffer (what --resume costs).

    python benchmarks/resume_state.py                                  # 1M online + 150k offline transitions
    python benchmarks/resume_state.py --online 100000 --num-qs 10

The state is RFCL's in stage 2 (the larger case: the stage-1 transitions are the offline buffer), with PickCube's
dimensions, filled with random numbers. Timed: building the payload and writing it atomically (msgpack, flush to
disk, rename), as at every save point; reading and checking it and restoring the learner, buffers and curricula, as
at a resume. Writes <out>/resume_state.{json,md}.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import rfcl  # noqa: E402
import run_files  # noqa: E402
import run_log  # noqa: E402


@dataclass
class Args:
    online: int = 1_000_000
    """transitions in the (full) online buffer"""
    offline: int = 150_000
    """transitions in the offline buffer (stage 2: the stage-1 transitions; PickCube's stage 1 takes 110k-152k)"""
    obs_dim: int = 42
    """PickCube-v1's state dimension"""
    act_dim: int = 8
    num_qs: int = 2
    """critics (fast preset 2, sample-efficient 10)"""
    dir: str = ""
    """where to write the file (default: a temporary folder beside the repo, on the same disk as runs/)"""
    out: str = "benchmarks/results"


def main(a: Args) -> dict:
    import jax

    args = rfcl.Args(num_qs=a.num_qs, max_episode_steps=50, buffer_size=a.online)
    _, _, state = rfcl.init_sac(args, a.obs_dim, a.act_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    bufs = []
    for n in (a.online, a.offline):
        buf = rfcl.ReplayBuffer(n, a.obs_dim, a.act_dim)
        for i in range(0, n, 100_000):
            m = min(100_000, n - i)
            buf.add({"obs": rng.normal(size=(m, a.obs_dim)), "actions": rng.uniform(-1, 1, (m, a.act_dim)),
                     "rewards": rng.random(m) < 0.1, "next_obs": rng.normal(size=(m, a.obs_dim)), "masks": np.ones(m)})
        bufs.append(buf)
    online, offline = bufs
    reverse = rfcl.ReverseCurriculum(np.full(5, 70), 4, 3, 3.0, 0.9, rng)
    forward = rfcl.ForwardCurriculum(np.arange(1000), 0.1, 0.1, 5, rng)
    with tempfile.TemporaryDirectory(dir=a.dir or ROOT) as tmp:
        run = run_log.RunLog(Path(tmp), run_log.SummaryWriter(tmp), 2_000_000, 1000, 10_000, 100_000, 50, 50, False,
                                   None, 3)
        loop = {"global_step": 1_150_000, "stage": 2, "stage1_end_step": 150_000, "grad_updates": 0}
        path = Path(tmp) / common.RESUME_FILE
        t0 = time.time()
        payload = rfcl.resume_payload(state, jax.random.PRNGKey(1), rng, reverse, forward, online, offline, loop, run)
        t_snapshot = time.time() - t0
        t0 = time.time()
        run_files.save_resume_state(path, "rfcl", rfcl.SCRIPT, dataclasses.asdict(args), 1_150_000, payload)
        t_write = time.time() - t0
        size = path.stat().st_size
        del payload
        t0 = time.time()
        _, saved = run_files.load_resume_state(path, "rfcl")
        t_read = time.time() - t0
        t0 = time.time()
        s2, _, on2, off2, _ = rfcl.restore(saved, state, np.random.default_rng(), reverse, forward)
        jax.block_until_ready(on2.data)
        t_restore = time.time() - t0
        run.writer.close()
    res = {"online": a.online, "offline": a.offline, "obs_dim": a.obs_dim, "act_dim": a.act_dim, "num_qs": a.num_qs,
           "bytes": size, "snapshot_s": t_snapshot, "write_s": t_write, "read_and_check_s": t_read,
           "restore_s": t_restore, "cores": os.cpu_count(),
           "command": "python benchmarks/resume_state.py " + " ".join(sys.argv[1:])}
    md = (f"# Resume state: size and time\n\n`{res['command']}` on a {res['cores']}-core CPU.\n\n"
          "| online | offline | critics | file size | build payload | serialize + write + fsync | read + check | "
          "restore |\n|-|-|-|-|-|-|-|-|\n"
          f"| {a.online:,} | {a.offline:,} | {a.num_qs} | {size / 2**20:.0f} MiB | {t_snapshot:.1f} s | {t_write:.1f} s | "
          f"{t_read:.1f} s | {t_restore:.1f} s |\n")
    out = Path(a.out)
    common.write_json(out / "resume_state.json", res)
    common.write_atomic(out / "resume_state.md", md.encode())
    print(md)
    return res


if __name__ == "__main__":
    main(tyro.cli(Args))
