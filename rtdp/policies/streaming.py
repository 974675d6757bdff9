"""Streaming Diffusion Policy (Høeg et al. 2024): a persistent, variably noisy action buffer.

Instead of denoising a fresh trajectory from pure noise for every chunk, the
policy keeps a buffer of ``horizon`` actions whose noise level rises along
the buffer: a ladder of ``n_rungs`` rungs, each ``stream_action_steps``
actions wide. Per observation it runs ``steps_per_obs`` denoising steps, each
taking every rung one level down the ladder, so the first rung becomes clean;
it executes that rung's actions, shifts the buffer by as many positions,
appends fresh noise at the top rung, and re-noises the clean past actions to
the level the network was trained to see them at. An action is denoised over
``n_rungs * steps_per_obs`` levels during its life in the buffer, at
``steps_per_obs`` network evaluations per observation (1 in the fastest
setting).

The step from one level to the next is the deterministic DDIM/Euler update
``x <- x0_hat + (sigma_next / sigma) (x - x0_hat)``, i.e. the denoised
estimate re-noised to the next level along its own noise direction. The
shifted, re-noised buffer is what the next observation continues from: it is
written back into the state (``StreamState.buffer``), which
``tests/test_streaming.py`` checks on a known sequence.

State is explicit: ``stream_step`` is a pure function of (state, observation
features) that returns the actions and the next state; ``StreamingPolicy``
holds one state per running episode and is reset per episode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rtdp.core.samplers import Denoiser
from rtdp.errors import ConfigError
from rtdp.policies.edm_unet import EdmUnetConfig, EdmUnetPolicy, ladder_levels, ladder_rungs


@dataclass
class StreamState:
    """One buffer per batch row.

    Attributes:
        buffer: (B, T, Da) actions in normalised units, at the ladder's levels.
        level_index: (B, T) int64, each position's index into the ladder's levels.
    """

    buffer: torch.Tensor
    level_index: torch.Tensor


@dataclass(frozen=True)
class Ladder:
    """Geometry of a streaming buffer.

    Attributes:
        levels: ascending noise levels, (n_rungs * steps_per_obs + 1,), levels[0] = 0.
        rungs: rung of every buffer position, (T,).
        steps_per_obs: denoising steps (NFE) per observation.
        shift: actions executed per observation (rung width).
        first: buffer position of the current step's action (n_obs_steps - 1).
    """

    levels: torch.Tensor
    rungs: torch.Tensor
    steps_per_obs: int
    shift: int
    first: int

    @property
    def top(self) -> int:
        return int(self.levels.numel() - 1)

    def ready_index(self) -> torch.Tensor:
        """(T,) level index of each position just before an observation's denoising."""
        return (self.rungs + 1) * self.steps_per_obs


def make_ladder(config: EdmUnetConfig, steps_per_obs: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Ladder:
    """Ladder for a policy config and a number of steps per observation.

    Raises:
        ConfigError: steps_per_obs < 1.
    """
    if isinstance(steps_per_obs, bool) or not isinstance(steps_per_obs, (int, np.integer)) or steps_per_obs < 1:
        raise ConfigError(f"streaming steps per observation must be an int >= 1, got {steps_per_obs!r}")
    return Ladder(
        levels=ladder_levels(config, int(steps_per_obs)).to(device=device, dtype=dtype),
        rungs=ladder_rungs(config, device),
        steps_per_obs=int(steps_per_obs),
        shift=config.stream_action_steps,
        first=config.n_obs_steps - 1,
    )


def init_state(noise: torch.Tensor, ladder: Ladder) -> StreamState:
    """A fresh buffer: every position pure noise at the top level.

    Args:
        noise: standard normal, (B, T, Da).
    """
    top = ladder.top
    index = torch.full(noise.shape[:2], top, dtype=torch.long, device=noise.device)
    return StreamState(noise * ladder.levels[top], index)


def _denoise_to(denoiser: Denoiser, state: StreamState, target: torch.Tensor, ladder: Ladder, cond: Any) -> StreamState:
    """Take every position one level down, never below ``target`` (B, T); one network evaluation.

    Positions already at their target keep their value and level (the
    network still sees them, at their level).
    """
    cur = state.level_index
    nxt = torch.maximum(cur - 1, target)
    sigma = ladder.levels[cur]
    sigma_next = ladder.levels[nxt]
    x0 = denoiser(state.buffer, sigma, cond)
    ratio = (sigma_next / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)).unsqueeze(-1)
    # Euler / DDIM update per position: the estimate re-noised to the next level along its own noise direction.
    x = torch.where((nxt == 0).unsqueeze(-1), x0, x0 + ratio * (state.buffer - x0))
    x = torch.where((nxt == cur).unsqueeze(-1), state.buffer, x)
    return StreamState(x, nxt)


def shift_state(state: StreamState, ladder: Ladder, noise: torch.Tensor) -> StreamState:
    """Drop the executed actions, append fresh noise, and re-noise every position up to its ready level.

    After the shift, rungs 1.. arrive exactly at the next rung's ready level;
    the past positions (before the current step) arrive clean but the network
    was trained on them at rung 0's level, and the appended positions start
    from nothing. Both are re-noised: ``x <- x + sqrt(s_ready^2 - s^2) z``,
    which leaves ``x`` distributed as ``x0 + s_ready * eps``. The result is
    written into the returned state, which the next observation continues from.

    Args:
        state: buffer after an observation's denoising (first rung clean).
        noise: standard normal, (B, T, Da); position p's noise re-noises position p.

    Returns:
        the buffer for the next observation, every position at its ready level.
    """
    s = ladder.shift
    b, t, d = state.buffer.shape
    if tuple(noise.shape) != (b, t, d):
        raise ConfigError(f"re-noising noise must have the buffer's shape {(b, t, d)}, got {tuple(noise.shape)}")
    buffer = torch.cat([state.buffer[:, s:], state.buffer.new_zeros(b, s, d)], dim=1)
    index = torch.cat([state.level_index[:, s:], state.level_index.new_zeros(b, s)], dim=1)
    ready = ladder.ready_index().unsqueeze(0).expand(b, t)
    low = index < ready
    add = (ladder.levels[ready] ** 2 - ladder.levels[index] ** 2).clamp_min(0).sqrt() * low
    return StreamState(buffer + add.unsqueeze(-1) * noise, torch.where(low, ready, index))


@torch.no_grad()
def stream_step(
    denoiser: Denoiser,
    state: StreamState,
    ladder: Ladder,
    cond: Any,
    fresh_noise: torch.Tensor,
) -> tuple[torch.Tensor, StreamState]:
    """One observation of streaming: denoise, take the clean chunk, shift.

    Positions still above their ready level (a fresh buffer at the start of
    an episode) are first brought down to it, which costs extra evaluations
    on the first observation only.

    Args:
        denoiser: ``denoiser(x, sigma (B, T), cond) -> x0_hat``.
        state: the buffer before this observation.
        ladder: buffer geometry.
        cond: observation features for this step.
        fresh_noise: standard normal, (B, T, Da), for the shift's re-noising.

    Returns:
        (actions (B, shift, Da) normalised, clean; the next state).
    """
    ready = ladder.ready_index().unsqueeze(0).expand_as(state.level_index)
    while bool((state.level_index > ready).any()):
        state = _denoise_to(denoiser, state, ready, ladder, cond)
    done = ready - ladder.steps_per_obs
    for _ in range(ladder.steps_per_obs):
        state = _denoise_to(denoiser, state, done, ladder, cond)
    actions = state.buffer[:, ladder.first : ladder.first + ladder.shift]
    return actions, shift_state(state, ladder, fresh_noise)


class StreamingPolicy:
    """An ``EdmUnetPolicy`` run as a streaming policy with one buffer per episode.

    Args:
        policy: a policy trained with ``ladder_prob > 0``.
        steps_per_obs: network evaluations per observation (1 is the fastest setting).

    ``predict_action_chunk`` returns ``stream_action_steps`` actions (fewer
    than a full chunk); ``reset()`` starts new episodes.
    """

    def __init__(self, policy: EdmUnetPolicy, steps_per_obs: int = 1) -> None:
        if not isinstance(policy, EdmUnetPolicy):
            raise ConfigError(f"streaming needs an EDM policy (policy=edm), got {type(policy).__name__}")
        if policy.config.ladder_prob == 0.0:
            raise ConfigError(
                "this checkpoint was trained without the streaming noise ladder (ladder_prob=0); "
                "train it with policy.ladder_prob > 0 to stream"
            )
        self.policy = policy
        self.config = policy.config
        self.ladder = make_ladder(policy.config, steps_per_obs, policy.device, policy.dtype)
        self.state: StreamState | None = None
        self.last_nfe = 0

    @property
    def n_action_steps(self) -> int:
        """Actions returned per call."""
        return self.ladder.shift

    def reset(self) -> None:
        """Forget every buffer; the next call starts fresh episodes."""
        self.state = None

    def set_state(self, state: StreamState | None) -> None:
        """Install a buffer, e.g. one checked or restored by the caller.

        Raises:
            ConfigError: the buffer's shape does not match the checkpoint.
        """
        if state is not None:
            cfg = self.config
            b = state.buffer
            if b.ndim != 3 or tuple(b.shape[1:]) != (cfg.horizon, cfg.action_dim):
                raise ConfigError(
                    f"streaming buffer must have shape (B, {cfg.horizon}, {cfg.action_dim}) = "
                    f"(batch, horizon, action_dim) of this checkpoint, got {tuple(b.shape)}"
                )
            if tuple(state.level_index.shape) != tuple(b.shape[:2]):
                raise ConfigError(f"level_index must have shape {tuple(b.shape[:2])}, got {tuple(state.level_index.shape)}")
        self.state = state

    @torch.no_grad()
    def predict_action_chunk(
        self, obs: Mapping[str, Any], *, generator: torch.Generator | None = None, rows: torch.Tensor | None = None,
        guidance_scale: float | None = None, guidance_skip_cos: float | None = None,
    ) -> torch.Tensor:
        """Next ``stream_action_steps`` actions for each episode.

        Args:
            obs: ``{key: (B, To, *shape)}`` in env units.
            generator: source of the buffer's noise.
            rows: which buffers (rows of the state) these observations belong
                to, (B,) int; default all, in order. Lets a batch of episodes
                continue when some of them have ended.
            guidance_scale: classifier-free guidance scale (goal-conditioned policies).
            guidance_skip_cos: adaptive-guidance threshold.

        Returns:
            (B, stream_action_steps, Da) in env units.
        """
        pol = self.policy
        pol.normalizer.require_set()
        cond, uncond = pol.conditioning(obs)
        den, _ = pol.guided_denoiser(cond, uncond, guidance_scale, guidance_skip_cos)
        b = cond.shape[0]
        cfg = self.config
        if self.state is None:
            noise = pol.initial_noise(b, generator, None)
            self.state = init_state(noise, self.ladder)
        state = self.state
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=state.buffer.device)
            state = StreamState(state.buffer[rows], state.level_index[rows])
        elif state.buffer.shape[0] != b:
            raise ConfigError(
                f"streaming buffer holds {state.buffer.shape[0]} episodes but the observation has batch {b}; "
                "pass rows= or reset() the policy"
            )
        fresh = pol._randn((b, cfg.horizon, cfg.action_dim), generator, state.buffer.dtype)
        base = pol._denoiser()
        base.reset_nfe()
        actions, new_state = stream_step(den, state, self.ladder, cond, fresh)
        self.last_nfe = base.nfe
        if rows is not None:
            self.state.buffer[rows] = new_state.buffer
            self.state.level_index[rows] = new_state.level_index
        else:
            self.state = new_state
        return pol.normalizer.unnormalize("action", actions)
