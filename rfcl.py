"""RFCL: Reverse Forward Curriculum Learning (Tao et al., ICLR 2024) on ManiSkill3, in JAX.

One file, top to bottom: Args -> curricula -> networks and the jitted SAC update -> replay buffers -> episodes and
the stage switch -> main (the loop) -> run plumbing (flags, checkpoints, resume states). Explained section by section
in docs/rfcl.md. To start a variant, copy this file under a new name and edit the sections above "Run plumbing".
    python rfcl.py --env-id PickCube-v1 --num-demos 5
"""

from __future__ import annotations

import stop_signals  # first: from here on Ctrl-C, SIGTERM or SIGHUP exits with one line, during the slow imports too

import collections
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from flax.training.train_state import TrainState
from tqdm import tqdm

import common
import run_files
import run_flags
import run_log
import vector_env

ALGORITHM = "rfcl"  # checkpoints and resume states say which algorithm and which script (this file) wrote them
SCRIPT = str(Path(__file__).resolve())
SWITCH_STATE = "stage2_start.state"  # the resume state written at the stage switch, never overwritten


# ======================================================================================================
# Args
# ======================================================================================================
@dataclass
class Args:
    preset: Literal["fast", "sample-efficient"] = "fast"  # hyper-parameters (PRESETS); flags given override them
    # run name: everything goes to runs/<exp-name>/ (default: <env-id>__rfcl__<seed>__<unix time>)
    exp_name: Optional[str] = None
    seed: int = 1  # seed of networks, curricula and env seeds; CPU runs with the same seed repeat
    track: bool = False  # also log to Weights & Biases
    wandb_project_name: str = "rfcl-jax"  # W&B project, with --track

    # environment
    env_id: str = "PickCube-v1"  # ManiSkill3 environment id
    obs_mode: Literal["state"] = "state"  # observation mode (flat state vectors)
    control_mode: str = "pd_joint_delta_pos"  # ManiSkill controller; demos are converted to it
    sim_backend: Literal["cpu", "gpu"] = "cpu"  # cpu: one simulator process per env; gpu: one GPU-batched env
    num_envs: int = 8  # parallel training envs
    num_eval_envs: int = 8  # parallel eval envs
    max_episode_steps: Optional[int] = None  # stage-2 and eval episode length (default: the env's registered one)
    render_size: int = 256  # side of eval video frames in pixels
    # physics of every env of the run and its demos: `ms2` (ManiSkill2's) or a JSON object of SimConfig fields
    sim_config: Optional[str] = None

    # demonstrations
    num_demos: int = 5  # demonstrations to learn from (the first N of the file)
    demo_action_scale: float = 1.0  # demo actions are multiplied by this, then clipped to [-1, 1]
    dataset_path: Optional[str] = None  # ManiSkill trajectory .h5 (default: cached, else downloaded, else planned)

    # training loop
    total_timesteps: int = 1_000_000  # env steps to train for
    target_success: Optional[float] = None  # end once eval success_at_end reaches this in --target-evals evals in a row
    target_evals: int = 3  # evals in a row at or above --target-success that end the run
    num_seed_steps: int = 5_000  # env steps before updates start: random actions, and again after the stage switch
    steps_per_env: int = 4  # env steps per env between two update calls
    grad_updates_per_step: int = 16  # gradient updates per update call
    buffer_size: int = 1_000_000  # online replay buffer capacity (transitions)
    eval_freq: int = 10_000  # evaluate every this many env steps
    num_eval_episodes: int = 50  # eval episodes per evaluation (rounded up to a multiple of --num-eval-envs)
    save_freq: int = 100_000  # a save point every this many env steps (checkpoint, resume state, new episodes)
    log_freq: int = 1_000  # write losses and charts every this many env steps
    capture_video: bool = True  # save an mp4 of eval env 0's first episode at each evaluation
    checkpoint: Optional[str] = None  # start a new run from this checkpoint's networks, or evaluate it (--evaluate)
    resume: Optional[str] = None  # continue this run directory exactly; only RESUME_FLAGS may be given beside it
    fork: Optional[str] = None  # a new run from another run's resume state (directory or .state); not FORK_FIXED
    evaluate: bool = False  # only evaluate --checkpoint (with video) and print the metrics

    # SAC core
    gamma: float = 0.9  # discount
    tau: float = 0.005  # Polyak rate of the target critics, after every critic step
    batch_size: int = 256  # rows per minibatch: exactly half online, half offline
    learning_rate: float = 3e-4  # Adam learning rate of actor, critics and temperature
    hidden_dims: tuple[int, ...] = (256, 256, 256)  # hidden layers of actor and critics
    num_qs: int = 2  # critics in the ensemble
    num_min_qs: int = 2  # critics drawn anew at each step whose min forms the target
    actor_update_freq: int = 1  # actor and temperature step on every this-many-th critic step of the run
    init_temperature: float = 0.01  # initial entropy temperature alpha (docs/rfcl.md, "Flags": why not 1.0)
    target_entropy_scale: float = 0.5  # target entropy = -scale * action_dim
    backup_entropy: bool = False  # subtract alpha * log-prob in the critic target
    # always: every transition bootstraps; truncated: env terminations end episodes and stop bootstrapping
    bootstrap_at_done: Literal["always", "truncated"] = "always"

    # reverse curriculum (stage 1)
    reverse_step_size: int = 4  # steps the start frontier t_i moves back after a full window of frontier successes
    per_demo_buffer_size: int = 3  # consecutive frontier successes needed to move the frontier
    demo_horizon_to_max_steps_ratio: float = 3.0  # stage-1 time limit = 16 + (T_i - start) // ratio
    reverse_solved_frac: float = 0.9  # stage 1 ends when more than this fraction of demos is reverse-solved
    curriculum_success: Literal["once", "at_end"] = "once"  # episode success: at any step (once) or at its last
    curriculum_policy: Literal["stochastic", "deterministic"] = "stochastic"  # frontier episodes: sampled or mean

    # forward curriculum (stage 2)
    num_seeds: int = 1000  # initial-state seeds in the forward-curriculum pool
    plr_temperature: float = 0.1  # rank-weight exponent: weight = 1 / rank^(1/temperature)
    plr_staleness_coef: float = 0.1  # mix of staleness weights in the seed sampling distribution
    plr_history: int = 5  # episodes remembered per seed for its score


# ======================================================================================================
# Curricula (host-side, numpy)
# ======================================================================================================
class ReverseCurriculum:
    """Stage 1: per-demo start frontier t_i that moves from the demo's end towards its start.

    A frontier episode is one that started exactly at t_i. When the last `window` frontier episodes of
    demo i all succeeded, t_i moves back by `step`; at t_i = 0 the demo is reverse-solved instead.
    """

    # as the authors' code (rfcl: ReverseCurriculumWrapper.sync_envs, the "geometric" start-step sampler): start
    # at t_i + k, k = 0..4, with these probabilities; horizon() is its InitialStateWrapper.step time limit
    OFFSETS = np.arange(5)
    OFFSET_PROBS = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])

    def __init__(self, lengths, step: int, window: int, horizon_ratio: float, solved_frac: float, rng):
        self.T = np.asarray(lengths, int)
        self.t = self.T.copy()  # start at each demo's last (successful) state
        self.solved = np.zeros(len(self.T), bool)
        self.windows = [collections.deque(maxlen=window) for _ in self.T]
        self.step, self.window, self.ratio, self.solved_frac, self.rng = step, window, horizon_ratio, solved_frac, rng

    def sample_weights(self) -> np.ndarray:
        # far-from-solved demos are drawn more; a solved one keeps a tiny weight (still replayed)
        w = np.where(self.solved, 1e-3, (self.t + 1) / (self.T + 1))
        return w / w.sum()

    def sample_start(self) -> tuple[int, int, int]:
        """(demo index, start step, time limit) of a new episode."""
        i = int(self.rng.choice(len(self.T), p=self.sample_weights()))
        start = int(min(self.t[i] + self.rng.choice(self.OFFSETS, p=self.OFFSET_PROBS), self.T[i]))
        return i, start, self.horizon(i, start)

    def horizon(self, i: int, start: int) -> int:
        return 16 + int((self.T[i] - start) // self.ratio)

    def is_frontier(self, i: int, start: int) -> bool:
        """Only episodes that start exactly at t_i (of a demo not yet solved) are judged by report()."""
        return start == self.t[i] and not self.solved[i]

    def report(self, i: int, start: int, success: bool) -> None:
        if not self.is_frontier(i, start):
            return
        win = self.windows[i]
        win.append(bool(success))
        if len(win) == self.window and all(win):
            if self.t[i] == 0:
                self.solved[i] = True
            else:
                self.t[i] = max(self.t[i] - self.step, 0)
            win.clear()

    @property
    def done(self) -> bool:
        return self.solved.mean() > self.solved_frac

    def stats(self) -> dict:
        return {"curriculum/reverse_solved_frac": float(self.solved.mean()),
                "curriculum/start_step_frac_mean": float(np.mean(self.t / self.T))}

    def state_dict(self) -> dict:
        return {"t": self.t.copy(), "solved": self.solved.copy(), "windows": [list(w) for w in self.windows]}

    def load_state_dict(self, d: dict) -> None:
        self.t, self.solved = np.array(d["t"], int), np.array(d["solved"], bool)
        for w, saved in zip(self.windows, d["windows"]):
            w.clear()
            w.extend(bool(x) for x in saved)


class ForwardCurriculum:
    """Stage 2: prioritised level replay over a pool of initial-state seeds.

    score = 2 if a seed has no success in its last `history` episodes (untried counts as unsolved),
    3 if it succeeded in some but under 75%, 1 otherwise. P = (1 - c) * rank weights of score
    + c * rank weights of staleness, weight = 1 / rank^(1/temperature), ties share the smallest rank.
    """

    def __init__(self, seeds, temperature: float, staleness_coef: float, history: int, rng):
        self.seeds = np.asarray(seeds, np.int64)
        self.histories = [collections.deque(maxlen=history) for _ in self.seeds]
        self.scores = np.full(len(self.seeds), 2.0)
        self.last_sampled = np.zeros(len(self.seeds), np.int64)
        self.num_sampled = 0
        self.temperature, self.staleness_coef, self.rng = temperature, staleness_coef, rng

    @staticmethod
    def rank_weights(values: np.ndarray, temperature: float) -> np.ndarray:
        ranks = 1 + (values[None, :] > values[:, None]).sum(1)  # 1 + number of strictly higher values
        w = 1.0 / ranks ** (1.0 / temperature)
        return w / w.sum()

    def probs(self) -> np.ndarray:
        staleness = (self.num_sampled - self.last_sampled).astype(float)
        return ((1 - self.staleness_coef) * self.rank_weights(self.scores, self.temperature)
                + self.staleness_coef * self.rank_weights(staleness, self.temperature))

    def sample(self) -> int:
        """Index into the pool (its seed is self.seeds[index])."""
        k = int(self.rng.choice(len(self.seeds), p=self.probs()))
        self.num_sampled += 1
        self.last_sampled[k] = self.num_sampled
        return k

    @staticmethod
    def score(history) -> float:
        if len(history) == 0 or not any(history):
            return 2.0
        return 3.0 if np.mean(history) < 0.75 else 1.0

    def report(self, k: int, success: bool) -> None:
        self.histories[k].append(bool(success))
        self.scores[k] = self.score(self.histories[k])

    def stats(self) -> dict:
        return {"curriculum/seeds_on_edge_frac": float(np.mean(self.scores == 3.0)),
                "curriculum/seeds_solved_frac": float(np.mean(self.scores == 1.0))}

    def state_dict(self) -> dict:
        return {"seeds": self.seeds.copy(), "histories": [list(h) for h in self.histories],
                "scores": self.scores.copy(), "last_sampled": self.last_sampled.copy(), "num_sampled": self.num_sampled}

    def load_state_dict(self, d: dict) -> None:
        self.seeds, self.scores = np.array(d["seeds"], np.int64), np.array(d["scores"], float)
        self.last_sampled, self.num_sampled = np.array(d["last_sampled"], np.int64), int(d["num_sampled"])
        for h, saved in zip(self.histories, d["histories"]):
            h.clear()
            h.extend(bool(x) for x in saved)


# ======================================================================================================
# Networks and the SAC update (JAX / Flax)
# ======================================================================================================
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


ACTOR_METRICS = ("losses/actor_loss", "losses/alpha_loss", "losses/entropy")


class Actor(nn.Module):
    act_dim: int
    hidden_dims: tuple

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden_dims:
            x = nn.relu(nn.Dense(h)(x))
        mean = nn.Dense(self.act_dim)(x)
        log_std = nn.Dense(self.act_dim)(x)
        # soft clip keeps gradients alive at the bounds
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(log_std) + 1)
        return mean, log_std


class Critic(nn.Module):
    hidden_dims: tuple

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden_dims:
            x = nn.relu(nn.LayerNorm()(nn.Dense(h)(x)))
        return nn.Dense(1)(x).squeeze(-1)


def critic_ensemble(num_qs: int, hidden_dims: tuple) -> nn.Module:
    """num_qs independent critics as one module: params get a leading axis, outputs are (num_qs, batch)."""
    return nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=None, out_axes=0, axis_size=num_qs)(hidden_dims)


def sample_action(actor: Actor, params, obs, key):
    """tanh-squashed Gaussian sample and its log-prob, computed from the pre-tanh sample u:
    log(1 - tanh(u)^2) = 2 * (log 2 - u - softplus(-2u)), stable where tanh saturates."""
    mean, log_std = actor.apply({"params": params}, obs)
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    logp = jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std))
    logp -= 2 * (jnp.log(2.0) - u - jax.nn.softplus(-2 * u))
    return jnp.tanh(u), logp.sum(-1)


def deterministic_action(actor: Actor, params, obs):
    return jnp.tanh(actor.apply({"params": params}, obs)[0])


def training_action(actor: Actor, params, obs, key, deterministic):
    """Sampled actions, except the policy mean in the rows where `deterministic` (bool, (num_envs,)) is set:
    with --curriculum-policy deterministic, the frontier episodes act like eval."""
    sampled, _ = sample_action(actor, params, obs, key)
    return jnp.where(deterministic[:, None], deterministic_action(actor, params, obs), sampled)


@struct.dataclass
class SACState:
    actor: TrainState
    critic: TrainState
    target_params: dict
    temp: TrainState  # params = {"log_alpha": scalar}


def init_sac(args: Args, obs_dim: int, act_dim: int, key):
    actor = Actor(act_dim, tuple(args.hidden_dims))
    critic = critic_ensemble(args.num_qs, tuple(args.hidden_dims))
    k_a, k_c = jax.random.split(key)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor_params = actor.init(k_a, obs)["params"]
    critic_params = critic.init(k_c, obs, act)["params"]
    tx = lambda: optax.adam(args.learning_rate)  # noqa: E731
    state = SACState(
        actor=TrainState.create(apply_fn=None, params=actor_params, tx=tx()),
        critic=TrainState.create(apply_fn=None, params=critic_params, tx=tx()),
        target_params=jax.tree_util.tree_map(jnp.copy, critic_params),  # own buffers: the state is donated
        temp=TrainState.create(apply_fn=None, params={"log_alpha": jnp.log(args.init_temperature)}, tx=tx()),
    )
    return actor, critic, state


def networks(s: SACState) -> dict:
    """The learner's weights: what a checkpoint stores (every entry; add one for a network you add)."""
    return {"actor_params": s.actor.params, "critic_params": s.critic.params, "target_params": s.target_params,
            "log_alpha": s.temp.params["log_alpha"]}


def with_networks(s: SACState, nets: dict) -> SACState:
    """The inverse of networks(): s with a checkpoint's weights and temperature (--checkpoint); the optimizer states
    start afresh."""
    return s.replace(actor=s.actor.replace(params=nets["actor_params"]),
                     critic=s.critic.replace(params=nets["critic_params"]),
                     target_params=jax.tree_util.tree_map(jnp.array, nets["target_params"]),
                     temp=s.temp.replace(params={"log_alpha": jnp.asarray(nets["log_alpha"])}))


def random_subset_min(q, key, num_min_qs: int):
    """REDQ-style target: min over `num_min_qs` ensemble members drawn without replacement.
    q: (num_qs, batch). A fresh key, so a fresh subset, at every critic step."""
    members = jax.random.choice(key, q.shape[0], (num_min_qs,), replace=False)
    return q[members].min(0)


def bootstrap_masks(terminated, mode: str) -> np.ndarray:
    """always: continuing task, every transition bootstraps; truncated: a true termination stops it."""
    terminated = np.asarray(terminated, np.float32)
    return np.ones_like(terminated) if mode == "always" else 1.0 - terminated


def make_update(args: Args, actor: Actor, critic: nn.Module, act_dim: int):
    """Returns sample_batch, update_one (one minibatch) and update_many (n of them in one jitted lax.scan)."""
    half = args.batch_size // 2
    target_entropy = -args.target_entropy_scale * act_dim

    def sample_batch(online, online_size, offline, offline_size, key):
        # exactly half of every minibatch from each buffer: sampled separately, then stacked
        k_on, k_off = jax.random.split(key)
        i_on = jax.random.randint(k_on, (half,), 0, online_size)
        i_off = jax.random.randint(k_off, (half,), 0, offline_size)
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[i_on], b[i_off]]), online, offline)

    def critic_step(s: SACState, batch, key):
        k_pi, k_sub = jax.random.split(key)
        alpha = jnp.exp(s.temp.params["log_alpha"])
        next_a, next_logp = sample_action(actor, s.actor.params, batch["next_obs"], k_pi)
        next_q = critic.apply({"params": s.target_params}, batch["next_obs"], next_a)
        next_v = random_subset_min(next_q, k_sub, args.num_min_qs)
        if args.backup_entropy:
            next_v -= alpha * next_logp
        target = batch["rewards"] + args.gamma * batch["masks"] * next_v

        def loss_fn(params):
            q = critic.apply({"params": params}, batch["obs"], batch["actions"])
            return ((q - target) ** 2).mean(), q.mean()

        (loss, q_mean), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.critic.params)
        new_critic = s.critic.apply_gradients(grads=grads)
        new_target = optax.incremental_update(new_critic.params, s.target_params, args.tau)
        return s.replace(critic=new_critic, target_params=new_target), {"losses/qf_loss": loss,
                                                                        "losses/qf_values": q_mean}

    def actor_step(s: SACState, batch, key):
        alpha = jnp.exp(s.temp.params["log_alpha"])

        def loss_fn(params):
            a, logp = sample_action(actor, params, batch["obs"], key)
            q = critic.apply({"params": s.critic.params}, batch["obs"], a).mean(0)
            return (alpha * logp - q).mean(), -logp.mean()

        (loss, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.actor.params)
        new_actor = s.actor.apply_gradients(grads=grads)

        def temp_loss_fn(p):
            return jnp.exp(p["log_alpha"]) * (entropy - target_entropy)

        t_loss, t_grads = jax.value_and_grad(temp_loss_fn)(s.temp.params)
        new_temp = s.temp.apply_gradients(grads=t_grads)
        return s.replace(actor=new_actor, temp=new_temp), {"losses/actor_loss": loss, "losses/alpha_loss": t_loss,
                                                           "losses/entropy": entropy}

    zeros_actor_info = dict.fromkeys(ACTOR_METRICS, 0.0)

    def update_one(s: SACState, online, online_size, offline, offline_size, key):
        """One minibatch: a critic step, then an actor + temperature step on every actor_update_freq-th critic
        step. The count is the critic's global step counter, so the cadence holds across update calls."""
        k_batch, k_c, k_a = jax.random.split(key, 3)
        batch = sample_batch(online, online_size, offline, offline_size, k_batch)
        s, c_info = critic_step(s, batch, k_c)
        actor_turn = s.critic.step % args.actor_update_freq == 0
        s, a_info = jax.lax.cond(actor_turn, lambda s: actor_step(s, batch, k_a),
                                 lambda s: (s, jax.tree_util.tree_map(jnp.float32, zeros_actor_info)), s)
        return s, {**c_info, **a_info, "losses/alpha": jnp.exp(s.temp.params["log_alpha"]), "actor_steps": actor_turn}

    @partial(jax.jit, static_argnums=6, donate_argnums=0)
    def update_many(s: SACState, online, online_size, offline, offline_size, key, n: int):
        """n updates in one lax.scan. Actor metrics are means over the actor steps that ran (actor_steps)."""
        s, infos = jax.lax.scan(lambda s, k: update_one(s, online, online_size, offline, offline_size, k),
                                s, jax.random.split(key, n))
        n_actor = infos.pop("actor_steps").sum()
        out = {k: v.sum() / jnp.maximum(n_actor, 1) if k in zeros_actor_info else v.mean() for k, v in infos.items()}
        return s, {**out, "actor_steps": n_actor}

    return sample_batch, update_one, update_many


def update_metrics(info: dict) -> dict:
    """What to log of one update_many call: the actor metrics only if the call ran an actor step."""
    return {k: float(v) for k, v in info.items()
            if k != "actor_steps" and (info["actor_steps"] or k not in ACTOR_METRICS)}


# ======================================================================================================
# Replay buffers (JAX arrays, so minibatches are sampled inside the jitted update)
# ======================================================================================================
FIELDS = ("obs", "actions", "rewards", "next_obs", "masks")


def buffer_init(capacity: int, obs_dim: int, act_dim: int) -> dict:
    shapes = {"obs": (obs_dim,), "actions": (act_dim,), "rewards": (), "next_obs": (obs_dim,), "masks": ()}
    return {k: jnp.zeros((capacity, *shapes[k]), jnp.float32) for k in FIELDS}


@partial(jax.jit, donate_argnums=0)
def buffer_add(buf: dict, ptr, rows: dict) -> dict:
    """Write rows (leading dim n) at ptr, ptr+1, ... modulo capacity (a ring buffer)."""
    cap = buf["obs"].shape[0]
    n = rows["obs"].shape[0]
    idx = (ptr + jnp.arange(n)) % cap
    return {k: buf[k].at[idx].set(jnp.asarray(rows[k], jnp.float32)) for k in FIELDS}


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.data = buffer_init(capacity, obs_dim, act_dim)
        self.capacity, self.ptr, self.size = capacity, 0, 0

    def add(self, rows: dict) -> None:
        n = len(rows["rewards"])
        self.data = buffer_add(self.data, self.ptr, rows)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict:
        """The filled part only (a resume state holds no empty capacity)."""
        return {"capacity": self.capacity, "ptr": self.ptr, "size": self.size,
                "data": {k: np.asarray(v[:self.size]) for k, v in self.data.items()}}

    @classmethod
    def from_state_dict(cls, d: dict) -> ReplayBuffer:
        first = d["data"]["obs"]
        buf = cls(int(d["capacity"]), first.shape[1], d["data"]["actions"].shape[1])
        buf.data = {k: v.at[:len(first)].set(jnp.asarray(d["data"][k])) for k, v in buf.data.items()}
        buf.ptr, buf.size = int(d["ptr"]), int(d["size"])
        return buf


def demo_buffer(demos, masks) -> ReplayBuffer:
    n = len(demos.rewards)
    buf = ReplayBuffer(n, demos.obs.shape[1], demos.actions.shape[1])
    buf.add({"obs": demos.obs, "actions": demos.actions, "rewards": demos.rewards, "next_obs": demos.next_obs,
             "masks": masks})
    return buf


# ======================================================================================================
# Episodes and the stage switch
# ======================================================================================================
@dataclass
class Episodes:
    """The running training episode of each env: one array over the envs per field, of the field's type."""

    demo: int             # stage 1: demo index and start step; the reverse curriculum judges the episode by them
    start: int
    seed_idx: int         # stage 2: index of the env's seed in the forward-curriculum pool
    horizon: int          # time limit: stage 1 from the start's distance to the demo's end, stage 2 max_episode_steps
    length: int
    episode_return: float
    success_once: bool    # succeeded at some step so far
    policy_mean: bool     # a frontier episode that acts with the policy mean (--curriculum-policy deterministic)

    @classmethod
    def empty(cls, n: int) -> Episodes:
        return cls(*(np.zeros(n, f.type) for f in dataclasses.fields(cls)))

    def step(self, success, terminated, bootstrap_at_done: str) -> np.ndarray:
        """Count one env step of every env; returns where an episode ends: at its time limit, and with
        --bootstrap-at-done truncated also where the env terminated."""
        self.length += 1
        self.episode_return += success
        self.success_once |= success
        ended = self.length >= self.horizon
        return ended | terminated if bootstrap_at_done == "truncated" else ended


def demo_state(demos, i: int, t: int) -> tuple[dict, np.ndarray]:
    """RFCL's defining move: an episode starts from demo i's simulator state at step t, with the observation the
    demo recorded there (the env's own would show stale contact flags until a physics step)."""
    return jax.tree_util.tree_map(lambda x: x[t], demos.env_states[i]), demos.traj_obs[i][t]


def start_episodes(mask, eps: Episodes, envs, stage: int, reverse: ReverseCurriculum, forward: ForwardCurriculum,
                   demos, args: Args):
    """Reset the envs in `mask` to new episodes and return all envs' observations. Stage 1: a start (demo i,
    step t) sampled from the reverse curriculum, with its own time limit; the env builds the demo's scene from its
    seed and restores the demo's state at t. Stage 2: a seed drawn by the forward curriculum, with the full
    max_episode_steps."""
    n = len(mask)
    seeds, states = np.zeros(n, np.int64), [None] * n
    for j in np.flatnonzero(mask):
        if stage == 1:
            i, t, h = reverse.sample_start()
            eps.demo[j], eps.start[j], eps.horizon[j] = i, t, h
            seeds[j], states[j] = demos.episodes[i]["episode_seed"], demo_state(demos, i, t)
            eps.policy_mean[j] = args.curriculum_policy == "deterministic" and reverse.is_frontier(i, t)
        else:
            k = forward.sample()
            eps.seed_idx[j], eps.horizon[j], seeds[j] = k, args.max_episode_steps, forward.seeds[k]
            eps.policy_mean[j] = False
    eps.length[mask], eps.episode_return[mask], eps.success_once[mask] = 0, 0.0, False
    return envs.reset(mask, seeds, states)


def report_episodes(ended, eps: Episodes, success, stage: int, reverse: ReverseCurriculum, forward: ForwardCurriculum,
                    run: run_log.RunLog, curriculum_success: str) -> None:
    """Each episode that ended goes to the charts and to its stage's curriculum, which judges it by success at any
    step (--curriculum-success once) or at its last step (at_end)."""
    judged = eps.success_once if curriculum_success == "once" else success
    for j in np.flatnonzero(ended):
        run.episode_ended(eps.episode_return[j], success[j], eps.success_once[j])
        if stage == 1:
            reverse.report(eps.demo[j], eps.start[j], bool(judged[j]))
        else:
            forward.report(eps.seed_idx[j], bool(judged[j]))


def switch_to_stage2(online: ReplayBuffer, reverse: ReverseCurriculum, args: Args, obs_dim: int,
                     act_dim: int) -> tuple[ReplayBuffer, ReplayBuffer]:
    """RFCL's central event: stage 1 ends once more than --reverse-solved-frac of the demos are reverse-solved.

    Returns (offline, online): the stage-1 transitions (policy episodes from demo states) become the offline buffer,
    which fills half of every minibatch from now on, and a new, empty online buffer starts. The networks, optimizer
    states and temperature carry over. As published, updates pause until the policy has put --num-seed-steps
    transitions into the new online buffer (the loop's update gate), so its half of each minibatch is not a few
    hundred transitions drawn over and over.
    """
    return online, ReplayBuffer(args.buffer_size, obs_dim, act_dim)


# ======================================================================================================
# The training loop
# ======================================================================================================
def main(args: Args) -> None:
    warnings.filterwarnings("ignore", module="mani_skill")
    check_args(args)  # nothing is built or written before the flags, --checkpoint and the start state are checked
    physics = vector_env.sim_config(args.sim_config)
    if args.evaluate:
        return evaluate(args, physics)
    obs_dim, act_dim = vector_env.env_dims(args.env_id, args.obs_mode, args.control_mode, physics)  # no worker yet
    ckpt = args.checkpoint and run_files.load_run_checkpoint(  # checked against the networks built here
        args.checkpoint, args.env_id, args.obs_mode, args.control_mode, physics, SCRIPT,
        lambda o, a: networks(init_sac(args, o, a, jax.random.PRNGKey(0))[2]), (obs_dim, act_dim))
    run_dir, header, resumed, fork = run_files.start_state(args.resume, args.fork, args.exp_name, ALGORITHM, SCRIPT,
                                                           args.total_timesteps, dataclasses.asdict(args))
    rng, key = np.random.default_rng(args.seed), jax.random.PRNGKey(args.seed)

    # ---- demos, envs, networks, buffers, curricula ------------------------------------------------------
    demos, demo_record = load_demos(args, header, physics, obs_dim, act_dim)
    envs, eval_envs = make_envs(args, physics)
    key, k_init = jax.random.split(key)
    actor, critic, state = init_sac(args, obs_dim, act_dim, k_init)
    if ckpt:
        state = with_networks(state, ckpt["networks"])
    _, _, update_many = make_update(args, actor, critic, act_dim)
    policy_train = jax.jit(partial(training_action, actor))
    policy_det = jax.jit(partial(deterministic_action, actor))
    offline = demo_buffer(demos, bootstrap_masks(demos.terminated, args.bootstrap_at_done))
    online = ReplayBuffer(args.buffer_size, obs_dim, act_dim)
    reverse = ReverseCurriculum(demos.lengths, args.reverse_step_size, args.per_demo_buffer_size,
                                args.demo_horizon_to_max_steps_ratio, args.reverse_solved_frac, rng)
    train_seeds = rng.choice(np.arange(10_000, 10**6), size=args.num_seeds, replace=False)  # disjoint from eval
    forward = ForwardCurriculum(train_seeds, args.plr_temperature, args.plr_staleness_coef, args.plr_history, rng)
    global_step, stage, stage1_end_step, grad_updates, info = 0, 1, None, 0, {}
    if resumed:  # --resume or --fork: the learner, buffers, curricula, generators and schedule as saved
        state, key, online, offline, (global_step, stage, stage1_end_step, grad_updates) = restore(
            resumed, state, rng, reverse, forward, "resumed" if args.resume else f"forked from {fork['state']}")
    run, stop = open_run(args, run_dir, resumed, global_step, state, obs_dim, act_dim)
    meta = checkpoint_meta(args, obs_dim, act_dim)

    n = args.num_envs
    envs.fix_initial_states(forward.seeds)  # GPU: each pool seed's initial state, fixed once in batched resets
    eps = Episodes.empty(n)
    obs = start_episodes(np.ones(n, bool), eps, envs, stage, reverse, forward, demos, args)
    done = False
    while not done:
        # ---- collect num_envs * steps_per_env transitions ---------------------------------------------
        reported = False
        with run.timed("simulation"):
            for _ in range(args.steps_per_env):
                # uniform random actions for the first --num-seed-steps of stage 1, the policy from then on
                if stage == 1 and global_step < args.num_seed_steps:
                    actions = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
                else:
                    key, k = jax.random.split(key)
                    actions = policy_train(state.actor.params, jnp.asarray(obs), k, jnp.asarray(eps.policy_mean))
                next_obs, terminated, success = envs.step(actions)
                ended = eps.step(success, terminated, args.bootstrap_at_done)
                # next_obs is the true final observation at a time limit: resets come after storing
                online.add({"obs": obs, "actions": actions, "rewards": success.astype(np.float32),
                            "next_obs": next_obs, "masks": bootstrap_masks(terminated, args.bootstrap_at_done)})
                obs = next_obs
                global_step += n
                if ended.any():
                    reported = True
                    report_episodes(ended, eps, success, stage, reverse, forward, run, args.curriculum_success)
                    obs = start_episodes(ended, eps, envs, stage, reverse, forward, demos, args)

        # ---- the stage switch, at the end of the iteration in which the reverse curriculum became done --------
        switched = stage == 1 and reported and reverse.done
        if switched:
            offline, online = switch_to_stage2(online, reverse, args, obs_dim, act_dim)
            stage, stage1_end_step = 2, global_step
            stage1_done(run, meta, state, reverse, global_step)

        # ---- learn: once the online buffer holds --num-seed-steps transitions of the current stage -----------
        learning = online.size >= max(args.num_seed_steps, 1)
        if learning:
            with run.timed("update"):
                key, k = jax.random.split(key)
                state, info = update_many(state, online.data, online.size, offline.data, offline.size, k,
                                          args.grad_updates_per_step)
                grad_updates += args.grad_updates_per_step
                jax.block_until_ready(state.actor.params)  # so the time split charges the update, not the next step

        # ---- log, evaluate -----------------------------------------------------------------------------------
        run.progress(global_step)
        if run.due("log", global_step):
            run.log(global_step, {"curriculum/stage": stage, **reverse.stats(), **forward.stats(),
                                  **(update_metrics(jax.device_get(info)) if learning else {})},
                    stage=stage, rev=f"{reverse.solved.mean():.2f}")
        if run.due("eval", global_step) and not stop:  # a stop does not wait for an eval: the resumed run makes it
            run.evaluate(eval_envs, partial(policy_det, state.actor.params), global_step)

        # ---- a save point (every --save-freq env steps, the stage switch, the end, a stop signal) -------------
        stopping = bool(stop)  # a signal stops the run here, at an iteration boundary
        done = stopping or global_step >= args.total_timesteps or run.target_reached
        loop = {"global_step": global_step, "stage": stage, "stage1_end_step": stage1_end_step,
                "grad_updates": grad_updates}
        if run.save_point(global_step, stopping, done, switched,
                          lambda name: save_checkpoint(run, meta, state, name, global_step, stage=stage,
                                                       stage1_end_step=stage1_end_step, **reverse.state_dict()),
                          lambda: save_resume_state(run, args, resume_payload(state, key, rng, reverse, forward, online,
                                                                              offline, loop, run), demo_record, fork,
                                                    switched)) and not done:
            obs = start_episodes(np.ones(n, bool), eps, envs, stage, reverse, forward, demos, args)  # as on resume
    run.finish(global_step, stop if stopping else None, stage=stage, stage1_end_step=stage1_end_step,
               grad_updates=grad_updates, forked_from=fork)
    envs.close(now=stopping)
    eval_envs.close(now=stopping)
    if stopping:
        sys.exit(stop.exit_code)


# ======================================================================================================
# Run plumbing: presets, flag checks, checkpoints, resume states, --evaluate. Read it to change how a run is
# started, saved or resumed; a variant of the algorithm edits the sections above.
# ======================================================================================================
PRESETS = {
    "fast": Args(),
    "sample-efficient": Args(preset="sample-efficient", num_envs=8, steps_per_env=1, grad_updates_per_step=80,
                             actor_update_freq=20, num_qs=10, num_min_qs=2, num_seed_steps=5_000, eval_freq=5_000),
}

# Per-task values of the published RFCL configs for ManiSkill3, over the preset's defaults (the episode horizon
# comes from the env's registered max_episode_steps). Tasks not listed use the class defaults. A preset's own
# values and every flag given on the command line override these.
TASK_DEFAULTS = {
    "PickCube-v1": dict(gamma=0.9),
    "StackCube-v1": dict(gamma=0.9),
    "PegInsertionSide-v1": dict(gamma=0.99),
    "PlugCharger-v1": dict(gamma=0.95, batch_size=512, buffer_size=2_000_000, demo_horizon_to_max_steps_ratio=1.25,
                           reverse_step_size=2, demo_action_scale=1.25),
}

# the flags --resume takes beside the run's args.json: how long the run goes, when it evaluates and saves, where
# its demos now are (their content is checked). --save-freq changes what a run learns: every save point starts new
# episodes in all envs (docs/rfcl.md, "Stop and resume")
RESUME_FLAGS = ("total-timesteps", "target-success", "target-evals", "eval-freq", "save-freq", "capture-video",
                "no-capture-video", "num-eval-episodes", "dataset-path")

# flags a --fork cannot change: the resume state holds what they made (the networks' shapes, the buffers and the data in
# them, the generators, the demos, the forward curriculum's pool, the learned temperature)
FORK_FIXED = ("env_id", "obs_mode", "control_mode", "sim_backend", "sim_config", "seed", "hidden_dims", "num_qs",
              "buffer_size", "num_demos", "demo_action_scale", "num_seeds", "bootstrap_at_done", "init_temperature")

# the values each flag takes (run_flags.check_ranges); the checks between flags are in check_args
RANGES = {
    **dict.fromkeys(("total_timesteps", "num_envs", "num_eval_envs", "num_eval_episodes", "steps_per_env",
                     "grad_updates_per_step", "eval_freq", "save_freq", "log_freq", "buffer_size", "batch_size",
                     "max_episode_steps", "actor_update_freq", "num_qs", "target_evals", "hidden_dims",
                     "reverse_step_size", "per_demo_buffer_size", "num_seeds", "plr_history"), ">= 1"),
    "num_seed_steps": ">= 0", "seed": "[0, 2**32)", "target_success": "[0, 1]", "gamma": "[0, 1)", "tau": "(0, 1]",
    "learning_rate": "> 0", "init_temperature": "> 0", "demo_action_scale": "> 0",
    "demo_horizon_to_max_steps_ratio": "> 0", "plr_temperature": "> 0", "plr_staleness_coef": "[0, 1]",
}


def parse_args(argv=None) -> Args:
    """The command line over the layered defaults (run_flags.parse_args): Args, then the env's registered horizon
    and TASK_DEFAULTS, then --preset, then the flags given."""
    return run_flags.parse_args(Args, PRESETS, __doc__, lambda a: {
        "max_episode_steps": vector_env.registered_horizon(a.env_id), **TASK_DEFAULTS.get(a.env_id, {})},
        RESUME_FLAGS, ALGORITHM, SCRIPT, argv, FORK_FIXED)


def check_args(args: Args) -> None:
    """Every flag in its meaningful range, before anything is built or written: one line for the first that is not."""
    vector_env.check_env_id(args.env_id)
    run_flags.check_ranges(args, RANGES)
    run_flags.check_run_flags(args.env_id, args.max_episode_steps, args.total_timesteps, args.num_seed_steps,
                              args.buffer_size, args.capture_video, args.render_size, args.evaluate, args.checkpoint)
    if args.batch_size % 2:
        common.fail("--batch-size must be even (half online, half offline)")
    if not 1 <= args.num_min_qs <= args.num_qs:
        common.fail(f"--num-min-qs must be in 1..--num-qs ({args.num_qs}), got {args.num_min_qs} (--preset "
                    f"{args.preset}'s value unless given); pass --num-min-qs with a value up to {args.num_qs}")
    # stage 1 restores demo states, each recorded in the scene its demo's seed built
    if args.sim_backend == "gpu" and args.num_envs > 1 and vector_env.scene_per_episode(args.env_id):
        common.fail(f"{args.env_id} draws each episode's scene (objects, sizes) from its seed, while a GPU-batched env "
                    f"fixes each env's scene once when built, so demo states would be restored into other scenes: use "
                    f"--sim-backend cpu (or --num-envs 1) for it")
    run_flags.check_machine(args.sim_backend, args.track)
    if args.exp_name is None:
        args.exp_name = f"{args.env_id}__{ALGORITHM}{'_eval' if args.evaluate else ''}__{args.seed}__{int(time.time())}"


def checkpoint_meta(args: Args, obs_dim: int, act_dim: int) -> dict:
    """What a checkpoint says of itself besides the networks (run_files.save_checkpoint)."""
    return {"algorithm": ALGORITHM, "script": SCRIPT, "env_id": args.env_id, "obs_mode": args.obs_mode,
            "control_mode": args.control_mode, "sim_config": vector_env.sim_config(args.sim_config),
            "obs_dim": obs_dim, "act_dim": act_dim,
            "hidden_dims": list(args.hidden_dims), "num_qs": args.num_qs, "args": json.dumps(dataclasses.asdict(args))}


def load_actor(ckpt: dict):
    """A checkpoint's policy with this file's Actor: (deterministic(obs), sample(obs, key)), both jitted. --evaluate,
    collect_demos.py and benchmarks/frontier.py call it on the script that wrote the checkpoint."""
    actor = Actor(int(ckpt["act_dim"]), tuple(int(h) for h in ckpt["hidden_dims"]))
    params = ckpt["networks"]["actor_params"]
    return (jax.jit(partial(deterministic_action, actor, params)),
            jax.jit(lambda obs, key: sample_action(actor, params, obs, key)[0]))


def evaluate(args: Args, physics: dict) -> dict:
    """--evaluate: the checkpoint's policy, built by the script that wrote it (so a copy's edited Actor is the one
    evaluated), on --num-eval-episodes eval episodes; metrics to runs/<exp-name>/eval.json and stdout."""
    ckpt = run_files.load_run_checkpoint(args.checkpoint, args.env_id, args.obs_mode, args.control_mode, physics,
                                         SCRIPT)
    return run_files.evaluate_checkpoint(
        ckpt, args.checkpoint, run_files.new_run_dir(args.exp_name), lambda: vector_env.make_envs(
            args.env_id, args.num_eval_envs, args.sim_backend, args.obs_mode, args.control_mode,
            args.render_size if args.capture_video else None, physics),
        dataclasses.asdict(args), args.max_episode_steps, args.num_eval_episodes, args.capture_video)


def load_demos(args: Args, header: dict, physics: dict, obs_dim: int, act_dim: int):
    """The demos with their env states (a resumed run: the same ones it began with), their actions scaled by
    --demo-action-scale, and their record."""
    demos, path, record = run_files.load_run_demos(header, args.env_id, args.obs_mode, args.control_mode,
                                                   args.num_demos, args.dataset_path, physics, (obs_dim, act_dim),
                                                   env_states=True)
    print(f"{demos.num_trajectories} demos from {path} (lengths {demos.lengths.tolist()})", flush=True)
    if args.demo_action_scale != 1.0:
        demos.actions = np.clip(demos.actions * args.demo_action_scale, -1.0, 1.0).astype(demos.actions.dtype)
    return demos, record


def make_envs(args: Args, physics: dict):
    """The training envs and the eval envs (env 0 of which records the videos)."""
    return (vector_env.make_envs(args.env_id, args.num_envs, args.sim_backend, args.obs_mode, args.control_mode,
                                 sim_config=physics),
            vector_env.make_envs(args.env_id, args.num_eval_envs, args.sim_backend, args.obs_mode, args.control_mode,
                                 args.render_size if args.capture_video else None, physics))


def open_run(args: Args, run_dir: Path, resumed: Optional[dict], global_step: int, state: SACState, obs_dim: int,
             act_dim: int):
    """run_log.open_run with this script's schedule and the size of its resume states: (run, stop)."""
    state_bytes = run_files.resume_state_bytes(state, min(args.total_timesteps, args.buffer_size), obs_dim, act_dim)
    return run_log.open_run(run_dir, dataclasses.asdict(args), bool(args.resume), resumed and resumed["run"],
                            global_step, state_bytes, args.wandb_project_name if args.track else None,
                            total_timesteps=args.total_timesteps, log_freq=args.log_freq, eval_freq=args.eval_freq,
                            save_freq=args.save_freq, eval_horizon=args.max_episode_steps,
                            eval_episodes=args.num_eval_episodes, video=args.capture_video,
                            target_success=args.target_success, target_evals=args.target_evals)


def save_checkpoint(run: run_log.RunLog, meta: dict, state: SACState, name: str, step: int, **extra) -> None:
    run_files.save_checkpoint(run.run_dir / "checkpoints" / name, meta, networks(state), step, extra)


def stage1_done(run: run_log.RunLog, meta: dict, state: SACState, reverse: ReverseCurriculum, step: int) -> None:
    """What the stage switch leaves behind: checkpoints/stage1.ckpt (the stage-1 policy, the final frontiers), the
    switch's step in tensorboard, a line."""
    save_checkpoint(run, meta, state, "stage1.ckpt", step, stage=1, **reverse.state_dict())
    run.writer.add_scalar("curriculum/stage1_end_step", step, step)
    tqdm.write(f"stage 1 done at {step} env steps: all but {int((~reverse.solved).sum())} demos reverse-solved; "
               f"forward curriculum begins")


def resume_payload(state: SACState, key, rng, reverse: ReverseCurriculum, forward: ForwardCurriculum,
                 online: ReplayBuffer, offline: ReplayBuffer, loop: dict, run: run_log.RunLog) -> dict:
    """What --resume restores: the learner with its optimizer states, the JAX key, the numpy generator (random
    actions, curriculum draws), both curricula, both buffers (filled part), the loop counters and the schedule.
    No simulator or episode state: every env starts a new episode at a save point (run_log.RunLog.save_point)."""
    return {"sac": serialization.to_state_dict(jax.device_get(state)), "key": np.asarray(key),
            "rng": json.dumps(rng.bit_generator.state), "reverse": reverse.state_dict(),
            "forward": forward.state_dict(), "online": online.state_dict(), "offline": offline.state_dict(),
            "loop": loop, "run": run.state_dict()}


def save_resume_state(run: run_log.RunLog, args: Args, payload: dict, demo_record: dict, fork: Optional[dict],
                      switched: bool) -> None:
    """runs/<exp-name>/resume.state; at the stage switch also stage2_start.state, which later save points leave as
    it is, so that stage 2 can be forked from its first step."""
    path = run.run_dir / common.RESUME_FILE
    run_files.save_resume_state(path, ALGORITHM, SCRIPT, dataclasses.asdict(args), payload["loop"]["global_step"],
                                payload, demos=demo_record, fork=fork)
    if switched:
        common.copy_atomic(path, run.run_dir / SWITCH_STATE)


def restore(saved: dict, state: SACState, rng, reverse: ReverseCurriculum, forward: ForwardCurriculum, how: str):
    """The inverse of resume_payload: loads the curricula and the generator in place and returns
    (state, key, online, offline, (global_step, stage, stage1_end_step, grad_updates))."""
    state = jax.tree_util.tree_map(jnp.asarray, serialization.from_state_dict(state, saved["sac"]))
    rng.bit_generator.state = json.loads(saved["rng"])
    reverse.load_state_dict(saved["reverse"])
    forward.load_state_dict(saved["forward"])
    online, offline = (ReplayBuffer.from_state_dict(saved[b]) for b in ("online", "offline"))
    loop = saved["loop"]
    print(f"{how} at env step {loop['global_step']} (stage {loop['stage']}, online buffer {online.size}, offline "
          f"buffer {offline.size})", flush=True)
    return (state, jnp.asarray(saved["key"], jnp.uint32), online, offline,
            tuple(loop[k] for k in ("global_step", "stage", "stage1_end_step", "grad_updates")))


if __name__ == "__main__":
    stop_signals.exit_if_signalled()  # a Ctrl-C during the imports whose exit a library dropped
    main(parse_args())
