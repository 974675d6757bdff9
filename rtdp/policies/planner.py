"""Driving planners on one scene encoder: DiffusionDrive and its two baselines (Liao et al., CVPR 2025).

Scene tokens (``highway_spec.md``): one ego token, one per valid agent row, one per lane with a valid point,
plus a token-kind embedding, through a pre-norm transformer. ``decoder_layers`` cascaded decoder stages map
trajectory queries (a plan flattened to 16 normalised numbers, embedded, plus a diffusion-time embedding) to
x0 (or, given a base trajectory per query, an offset: to the base in stage 1, to stage s-1's x0 after) and a
score logit: queries self-attend, cross-attend the scene (padding masked), pass an FFN; stage s > 1 adds the
re-embedded, detached x0 of stage s-1 to its hidden state. ``AnchorPlanner`` (DiffusionDrive)
denoises K k-means anchors from a small truncation step in two DDIM steps and plans the best scored one;
``DiffusionPlanner`` runs DDIM from Gaussian noise on one query; ``RegressionPlanner`` regresses one learned
query. Diffusion happens in the action normaliser's [-1, 1] space; plans leave in metres.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtdp.core.anchors import anchored_start, kmeans, sigmas_truncated
from rtdp.core.denoiser import DiscreteEpsDenoiser
from rtdp.core.samplers import sample_ddim, vp_noise_to_start
from rtdp.core.schedules import BETA_SCHEDULES, make_alphas_cumprod, sigmas_ddim
from rtdp.data.normalizer import LimitsNormalizer
from rtdp.errors import CheckpointError, ConfigError, DatasetError, MissingKeyError, ObservationError
from rtdp.models.base import (WEIGHTS_FILE, Model, ModelConfig, int_in, int_tuple, one_of, positive_float,
                              positive_int, read_meta)

__all__ = ["OBS_KEYS", "SCENE_SHAPES", "AnchorPlanner", "AnchorPlannerConfig", "DiffusionPlanner",
           "DiffusionPlannerConfig", "PlanResult", "Planner", "PlannerConfig", "RegressionPlanner",
           "RegressionPlannerConfig", "SceneContext"]

OBS_KEYS = ("ego_state", "ego_past", "command", "agents", "lanes")
SCENE_SHAPES = {"ego_state": (4,), "ego_past": (4, 3), "command": (4,), "agents": (16, 9), "lanes": (24, 16, 4)}
# Allowed input shapes; None where a scene may hold another count (history, agent rows, lanes, points).
_SHAPE_RULES = {"ego_state": ((4,), "(4,)"), "ego_past": ((None, 3), "(H, 3)"), "command": ((4,), "(4,)"),
                "agents": ((None, 9), "(A, 9)"), "lanes": ((None, None, 4), "(L, P, 4)")}
# Agent rows and lane points go through one shared token MLP, so they share one range per feature.
_POOLED_FEATURES = {"agents": 9, "lanes": 4}


@dataclasses.dataclass(kw_only=True)
class PlannerConfig(ModelConfig):
    """Scene shapes, windowing and network of a driving planner.

    Attributes:
        lowdim_shapes: per-scene shape of each planner input (ego_state, ego_past, command, agents, lanes).
        image_shapes: camera keys; must be empty (the planners read no cameras).
        action_dim: coordinates per planned pose; 2 (x, y in the ego frame).
        horizon: plans per training window; 1 (one plan per scene).
        n_obs_steps: observation steps per plan; 1.
        n_action_steps: plans returned per call; 1.
        plan_steps: poses per plan (2 Hz, t = 0.5 .. 4.0 s).
        d_model: token width of encoder and decoder (even, a multiple of n_heads).
        n_heads: attention heads.
        encoder_layers: transformer layers over the scene tokens.
        decoder_layers: cascaded decoder stages (self-attention, cross-attention to the scene, FFN, heads).
        num_train_timesteps: N, steps of the training noise schedule.
        beta_schedule: betas of that schedule, one of rtdp.core.BETA_SCHEDULES.
        num_inference_steps: default network calls per plan (sampler steps).
    """

    lowdim_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=lambda: dict(SCENE_SHAPES))
    image_shapes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    action_dim: int = 2
    horizon: int = 1
    n_obs_steps: int = 1
    n_action_steps: int = 1
    plan_steps: int = 8
    d_model: int = 128
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    num_inference_steps: int = 1

    # Not on the command line: the data's shapes, and the windowing fixed at one plan per scene.
    data_fields: ClassVar[tuple[str, ...]] = ("lowdim_shapes", "image_shapes", "action_dim", "horizon",
                                              "n_obs_steps", "n_action_steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        shapes = {str(k): int_tuple(v, f"lowdim_shapes[{k!r}]") for k, v in self.lowdim_shapes.items()}
        if sorted(shapes) != sorted(OBS_KEYS):
            raise ConfigError(f"lowdim_shapes must have the keys {', '.join(OBS_KEYS)} (the scene's planner inputs), "
                              f"got {', '.join(sorted(shapes)) or 'none'}")
        for key, (rule, text) in _SHAPE_RULES.items():
            if len(shapes[key]) != len(rule) or any(r not in (None, n) for r, n in zip(rule, shapes[key])):
                raise ConfigError(f"lowdim_shapes[{key!r}] must be {text}, got {shapes[key]}")
        self.lowdim_shapes = shapes
        if dict(self.image_shapes):
            raise ConfigError(f"image_shapes must be empty (planners read no cameras), got {dict(self.image_shapes)}")
        self.image_shapes = {}
        if self.action_dim != 2:
            raise ConfigError(f"action_dim must be 2 (x, y of each planned pose), got {self.action_dim!r}")
        for name in ("horizon", "n_obs_steps", "n_action_steps"):
            if getattr(self, name) != 1:
                raise ConfigError(f"{name} must be 1 (one plan per scene), got {getattr(self, name)!r}")
        for name in ("plan_steps", "d_model", "n_heads", "encoder_layers", "decoder_layers", "num_train_timesteps"):
            setattr(self, name, positive_int(getattr(self, name), name))
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ConfigError(f"d_model must be an even multiple of n_heads = {self.n_heads}, got {self.d_model}")
        one_of(self.beta_schedule, BETA_SCHEDULES, "beta_schedule")
        self.num_inference_steps = int_in(self.num_inference_steps, "num_inference_steps", 1, *self.steps_limit())

    def steps_limit(self) -> tuple[int, str]:
        """The most sampler steps (network calls) per plan, and why, for error messages."""
        return self.num_train_timesteps, " (up to num_train_timesteps)"

    @property
    def plan_dim(self) -> int:
        """Numbers per flattened plan: plan_steps * action_dim."""
        return self.plan_steps * self.action_dim


@dataclasses.dataclass(kw_only=True)
class AnchorPlannerConfig(PlannerConfig):
    """``PlannerConfig`` of DiffusionDrive's truncated diffusion from anchors.

    Attributes:
        num_anchors: K, k-means anchors (trajectory queries) per scene.
        train_trunc: training noises the anchors at a step t ~ U[0, train_trunc).
        trunc_step: inference starts at this training step (below train_trunc).
        num_inference_steps: default DDIM steps from trunc_step down to 0 (network calls), 1..trunc_step + 1.
        cascade_shared: the decoder stages share one set of weights (default: separate weights per stage).
        score_weight: weight of the anchor classification (cross-entropy) term against the L1 term.
        residual: the first stage predicts each query's offset from its clean anchor, later stages an offset
            from the previous stage's x0 (DiffusionDrive offsets the noisy input instead, which passes the
            starting noise through to the plan unless the network learns to cancel it).
    """

    num_anchors: int = 20
    train_trunc: int = 50
    trunc_step: int = 10
    num_inference_steps: int = 2
    cascade_shared: bool = False
    score_weight: float = 1.0
    residual: bool = True

    def __post_init__(self) -> None:
        # trunc_step bounds num_inference_steps, which the base checks: validate it first
        self.num_train_timesteps = positive_int(self.num_train_timesteps, "num_train_timesteps")
        self.train_trunc = int_in(self.train_trunc, "train_trunc", 1, self.num_train_timesteps,
                                   " (up to num_train_timesteps)")
        self.trunc_step = int_in(self.trunc_step, "trunc_step", 0, self.train_trunc - 1,
                                  " (below train_trunc: a level the decoder was trained on)")
        super().__post_init__()
        self.num_anchors = positive_int(self.num_anchors, "num_anchors")
        for name in ("cascade_shared", "residual"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        self.score_weight = positive_float(self.score_weight, "score_weight")

    def steps_limit(self) -> tuple[int, str]:
        return self.trunc_step + 1, " (trunc_step + 1 at most)"


@dataclasses.dataclass(kw_only=True)
class DiffusionPlannerConfig(PlannerConfig):
    """``PlannerConfig`` of vanilla diffusion from Gaussian noise: one query, DDIM (``num_inference_steps`` 20)."""

    num_inference_steps: int = 20


@dataclasses.dataclass(kw_only=True)
class RegressionPlannerConfig(PlannerConfig):
    """``PlannerConfig`` of the single-mode regression head: one learned query, one network call."""

    num_inference_steps: int = 1
    # The noise schedule and the step count mean nothing to regression: not on the command line either.
    data_fields: ClassVar[tuple[str, ...]] = (*PlannerConfig.data_fields, "num_train_timesteps", "beta_schedule",
                                              "num_inference_steps")

    def steps_limit(self) -> tuple[int, str]:
        return 1, " (regression is one network call)"


def _mlp(d_in: int, d: int, d_out: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d if d_out is None else d_out))


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer embedding (B, dim) of training steps t (B,); dim even."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device, dtype=torch.float32) * (-math.log(1e4) / (dim // 2)))
    arg = t.float().unsqueeze(-1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class SceneEncoder(nn.Module):
    """Scene tokens: ego (state, past, command), one per agent row, one per lane; a pre-norm transformer."""

    def __init__(self, config: PlannerConfig) -> None:
        super().__init__()
        shapes, d = config.lowdim_shapes, config.d_model
        self.ego = _mlp(4 + math.prod(shapes["ego_past"]) + 4, d)
        self.agent, self.lane = _mlp(9, d), _mlp(shapes["lanes"][1] * 4, d)
        self.kind = nn.Embedding(3, d)  # ego, agent, lane
        layer = nn.TransformerEncoderLayer(d, config.n_heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.encoder_layers, norm=nn.LayerNorm(d),
                                            enable_nested_tensor=False)

    def forward(self, obs: Mapping[str, torch.Tensor], agent_pad: torch.Tensor,
                lane_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, 1 + A + L, d) and padding (B, 1 + A + L), True = ignored, from normalised inputs
        ``{key: (B, *shape)}``, agent_pad (B, A) (invalid rows) and lane_pad (B, L) (lanes without a valid point)."""
        ego = self.ego(torch.cat([obs["ego_state"], obs["ego_past"].flatten(1), obs["command"]], -1)).unsqueeze(1)
        tokens = torch.cat([ego + self.kind.weight[0], self.agent(obs["agents"]) + self.kind.weight[1],
                            self.lane(obs["lanes"].flatten(2)) + self.kind.weight[2]], 1)
        pad = torch.cat([agent_pad.new_zeros(agent_pad.shape[0], 1), agent_pad, lane_pad], 1)  # ego always there
        return self.layers(tokens, src_key_padding_mask=pad), pad


class _Stage(nn.Module):
    """One decoder stage: trajectory embedding, decoder block, x0 head and (optionally) score head."""

    def __init__(self, d: int, n_heads: int, plan_dim: int, scores: bool) -> None:
        super().__init__()
        self.embed = _mlp(plan_dim, d)
        self.block = nn.TransformerDecoderLayer(d, n_heads, 4 * d, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(d)
        self.x0 = _mlp(d, d, plan_dim)
        self.score = nn.Linear(d, 1) if scores else None


class TrajectoryDecoder(nn.Module):
    """Cascade of ``decoder_layers`` stages over K trajectory queries; with ``shared`` one set of stage
    weights is applied ``decoder_layers`` times; ``scores`` gives the stages score heads."""

    def __init__(self, config: PlannerConfig, *, scores: bool, shared: bool = False) -> None:
        super().__init__()
        self.n_stages, self.d = config.decoder_layers, config.d_model
        self.time = _mlp(self.d, self.d)
        self.stages = nn.ModuleList(_Stage(self.d, config.n_heads, config.plan_dim, scores)
                                    for _ in range(1 if shared else self.n_stages))

    def forward(self, x: torch.Tensor | None, t: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor,
                query: torch.Tensor | None = None,
                base: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every stage's (x0 (B, K, P), score logits (B, K) or None) for input trajectories x (B, K, P)
        (VP-noised) at training steps t (B,), scene tokens (B, S, d) and padding pad (B, S) (True = ignored);
        ``query`` (B, K, d) replaces the embedded x as the first stage's queries (a learned query); with ``base``
        (B, K, P) the heads predict offsets: stage 1's x0 is base + head, stage s's is stage s-1's x0 + head."""
        temb = self.time(_sinusoidal(t, self.d)).unsqueeze(1)
        outs, h = [], None
        for i in range(self.n_stages):
            stage = self.stages[min(i, len(self.stages) - 1)]
            q = (query if h is None and query is not None else stage.embed(x)) + temb
            h = stage.block(q if h is None else q + h, tokens, memory_key_padding_mask=pad)
            y = stage.norm(h)
            x0 = stage.x0(y) if base is None else stage.x0(y) + (base if i == 0 else x)
            outs.append((x0, None if stage.score is None else stage.score(y).squeeze(-1)))
            x = x0.detach()
        return outs


@dataclasses.dataclass
class SceneContext:
    """The conditioning of a planner's network, passed as ``cond`` through the core's samplers: scene ``tokens``
    (B, S, d_model) and ``pad`` (B, S) (True = an invalid agent row or empty lane). The network writes the score
    ``logits`` (B, K) of its last call here (the denoiser contract returns only x0) and counts its ``calls``."""

    tokens: torch.Tensor
    pad: torch.Tensor
    logits: torch.Tensor | None = None
    calls: int = 0


@dataclasses.dataclass
class PlanResult:
    """What ``Planner.plan`` returns: the chosen ``plan`` (B, plan_steps, 2) in metres (ego frame), every
    denoised trajectory as ``candidates`` (B, K, plan_steps, 2) in metres or None, their score logits
    ``scores`` (B, K) or None, and ``nfe``, the network calls made."""

    plan: torch.Tensor
    candidates: torch.Tensor | None
    scores: torch.Tensor | None
    nfe: int


class Planner(Model):
    """Base of the driving planners: obs ``{key: (B, 1, *shape)}`` -> a plan (B, plan_steps, 2) in metres;
    ``scores`` (score heads) and ``shared`` (stages share weights) are the subclass's to pass."""

    config_class: ClassVar[type[PlannerConfig]] = PlannerConfig
    config: PlannerConfig

    def __init__(self, config: PlannerConfig, *, scores: bool = False, shared: bool = False) -> None:
        super().__init__(config)
        self.encoder = SceneEncoder(config)
        self.decoder = TrajectoryDecoder(config, scores=scores, shared=shared)
        shapes = {k: (_POOLED_FEATURES[k],) if k in _POOLED_FEATURES else config.lowdim_shapes[k] for k in OBS_KEYS}
        self.normalizer = LimitsNormalizer({**shapes, "action": (config.plan_steps, config.action_dim)})
        self.register_buffer("alphas_cumprod", make_alphas_cumprod(config.num_train_timesteps, config.beta_schedule),
                             persistent=False)

    def set_normalizer(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Set min/max statistics of the five inputs and "action" (``compute_stats`` output, env units);
        agent rows and lane points share one token MLP, so theirs are pooled into one range per feature.

        Raises:
            MissingKeyError: a key or statistic is missing. DatasetError: a wrong size, or NaN/Inf.
        """
        stats = dict(stats)
        for key, width in _POOLED_FEATURES.items():
            entry, full = stats.get(key), math.prod(self.config.lowdim_shapes[key])
            if isinstance(entry, Mapping) and "min" in entry and "max" in entry:
                lo, hi = (np.asarray(entry[s], dtype=np.float64) for s in ("min", "max"))
                if lo.size == full and hi.size == full:
                    stats[key] = {"min": lo.reshape(-1, width).min(0), "max": hi.reshape(-1, width).max(0)}
        self.normalizer.set_stats(stats)

    def reset(self) -> None:
        """Start a new episode; a planner keeps no state between calls."""

    def size_label(self) -> str:
        """The network's size in reports, e.g. ``"d128 enc2 dec2"``."""
        return "d{0.d_model} enc{0.encoder_layers} dec{0.decoder_layers}".format(self.config)

    def _check_steps(self, steps: Any) -> int:
        steps = self.config.num_inference_steps if steps is None else steps
        return int_in(steps, "steps", 1, *self.config.steps_limit())

    def _check_obs(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Validated inputs ``{key: (B, *shape)}`` on the planner's device (the step axis dropped)."""
        if not isinstance(obs, Mapping):
            raise ObservationError(f"obs must be a dict of arrays keyed by observation name, got {type(obs).__name__}")
        dtype = self.decoder.time[0].weight.dtype
        out, batch = {}, None
        for key in OBS_KEYS:
            if key not in obs:
                raise ObservationError(f"observation {key!r} is missing; expected keys {', '.join(OBS_KEYS)}, "
                                       f"got {', '.join(map(str, obs)) or 'none'}")
            try:
                value = torch.as_tensor(obs[key])
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ObservationError(f"observation {key!r} is not an array: {exc}") from None
            shape = self.config.lowdim_shapes[key]
            if value.ndim != 2 + len(shape) or value.shape[1] != 1 or tuple(value.shape[2:]) != shape or (
                    batch is not None and value.shape[0] != batch):
                raise ObservationError(
                    f"observation {key!r} must have shape ({'B' if batch is None else batch}, 1, "
                    f"{', '.join(map(str, shape))}) = (batch, n_obs_steps, *shape), got {tuple(value.shape)}")
            batch = value.shape[0]
            out[key] = value = value[:, 0].to(device=self.device, dtype=dtype)
            if not bool(torch.isfinite(value).all()):
                raise ObservationError(f"observation {key!r} contains NaN/Inf")
        return out

    def _check_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Validated training inputs and the target plans (B, plan_steps, 2) in metres."""
        c = self.config
        self.normalizer.require_set()
        if not isinstance(batch, Mapping) or "obs" not in batch or "action" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DatasetError(f"a training batch is a dict with 'obs' and 'action', got {got}")
        try:
            obs = self._check_obs(batch["obs"])
        except ObservationError as exc:
            raise DatasetError(f"batch['obs']: {exc}") from None
        action = torch.as_tensor(batch["action"]).to(device=self.device, dtype=obs["ego_state"].dtype)
        b = obs["ego_state"].shape[0]
        if tuple(action.shape) != (b, 1, c.plan_steps, c.action_dim):
            raise DatasetError(f"batch['action'] must have shape ({b}, 1, {c.plan_steps}, {c.action_dim}) = "
                               f"(B, horizon, plan_steps, 2), got {tuple(action.shape)}")
        if not bool(torch.isfinite(action).all()):
            raise DatasetError("batch['action'] contains NaN/Inf")
        return obs, action[:, 0]

    def _encode(self, obs: Mapping[str, torch.Tensor]) -> SceneContext:
        """Scene tokens of validated inputs; the masks come from the raw valid flags."""
        norm = {k: self.normalizer.normalize(k, obs[k]) for k in OBS_KEYS}
        agent_pad = obs["agents"][..., 8] <= 0
        lane_pad = ~(obs["lanes"][..., 3] > 0).any(-1)
        return SceneContext(*self.encoder(norm, agent_pad, lane_pad))

    def _network(self, x_t: torch.Tensor, t: torch.Tensor, ctx: SceneContext) -> torch.Tensor:
        """The denoising network: the last stage's x0 (B, K, P); writes its scores into ``ctx.logits``."""
        x0, ctx.logits = self.decoder(x_t, t, ctx.tokens, ctx.pad, base=self._base(x_t))[-1]
        ctx.calls += 1
        return x0

    def _base(self, x_t: torch.Tensor) -> torch.Tensor | None:
        return None  # the trajectories (B, K, P) the decoder's heads offset; None: they predict x0 itself

    def _denoiser(self) -> DiscreteEpsDenoiser:
        # Built per call: it is cheap, and an EMA deepcopy of the planner must not share one.
        return DiscreteEpsDenoiser(self._network, self.alphas_cumprod.float(), clip_x0=1.0, prediction_type="sample")

    def _vp_noised(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for x0 (B, K, P), t (B,)."""
        abar = self.alphas_cumprod[t].to(x0.dtype).reshape(-1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)

    def compute_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Scalar training loss of ``{"obs": {key: (B, 1, *shape)}, "action": (B, 1, plan_steps, 2)}``.

        Raises:
            ConfigError: normaliser (or anchors) not set. DatasetError: wrong keys, shapes, or NaN/Inf.
        """
        obs, action = self._check_batch(batch)
        return self._loss(self._encode(obs), self.normalizer.normalize("action", action).flatten(1))

    def _loss(self, ctx: SceneContext, target: torch.Tensor) -> torch.Tensor:
        """The family's loss, summed over the decoder stages; target (B, P) normalised."""
        raise NotImplementedError

    @torch.no_grad()
    def plan(self, obs: Mapping[str, Any], *, steps: int | None = None, generator: torch.Generator | None = None,
             n_candidates: int | None = None) -> PlanResult:
        """Plan for every scene of a batch.

        ``obs``: ``{key: (B, 1, *shape)}`` tensors or arrays of the five inputs, env units (extra keys ignored);
        ``steps``: network calls (default ``config.num_inference_steps``); ``generator``: the starting noise's
        source; ``n_candidates``: samples per scene for ``DiffusionPlanner`` (the others ignore it).

        Raises:
            ConfigError: normaliser or anchors not set, bad steps or n_candidates.
            ObservationError: missing key, wrong shape, or NaN/Inf in obs.
        """
        self.normalizer.require_set()
        return self._plan_checked(self._check_obs(obs), self._check_steps(steps), generator, n_candidates)

    def _plan_checked(self, obs: dict[str, torch.Tensor], steps: int, generator: torch.Generator | None,
                      n_candidates: int | None) -> PlanResult:
        plan, cand, scores, nfe = self._sample(self._encode(obs), steps, generator, n_candidates)
        shape = (self.config.plan_steps, self.config.action_dim)
        metres = lambda x: self.normalizer.unnormalize("action", x.unflatten(-1, shape))  # noqa: E731
        return PlanResult(metres(plan), None if cand is None else metres(cand), scores, nfe)

    def _sample(self, ctx: SceneContext, steps: int, generator: torch.Generator | None, n_candidates: int | None):
        """(plan (B, P), candidates (B, K, P) or None, scores (B, K) or None, nfe); normalised units."""
        raise NotImplementedError

    def predict_action_chunk(self, obs: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        """The policy contract: the plan (B, plan_steps, 2) in metres is the action chunk (keywords as ``plan``)."""
        return self.plan(obs, **kwargs).plan

    def plan_error(self, batch: Mapping[str, Any], *, steps: int | None = None, seed: int = 0) -> float:
        """Mean distance (m) between the chosen plans and the targets of a training batch over all poses
        (ADE); ``seed`` seeds the starting noise, so two calls agree."""
        obs, target = self._check_batch(batch)
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            return float((self._plan_checked(obs, self._check_steps(steps), generator, None).plan - target)
                         .norm(dim=-1).mean())


class AnchorPlanner(Planner):
    """DiffusionDrive: truncated diffusion from K k-means anchors (buffer ``anchors`` (K, P), normalised
    units, set by ``from_data``), scored; the best one is the plan.

    Training noises the K anchors to one step t ~ U[0, train_trunc) per scene (VP form); each stage
    predicts x0 (with ``residual``, as an offset from the clean anchor) and a score logit for every anchor.
    Its loss is L1 between the x0 of the anchor nearest the target (mean L2 over poses from the clean
    anchor, normalised units) and the target, plus ``score_weight`` times the cross-entropy of the scores
    with that anchor as the class; summed over stages. Inference starts at ``anchors + sigma(trunc_step) *
    eps`` (VE form) and runs DDIM over ``sigmas_truncated``; the scores of the last call pick the plan."""

    model_type: ClassVar[str] = "anchor_planner"
    config_class: ClassVar[type[PlannerConfig]] = AnchorPlannerConfig
    config: AnchorPlannerConfig

    def __init__(self, config: AnchorPlannerConfig) -> None:
        super().__init__(config, scores=True, shared=config.cascade_shared)
        self.register_buffer("anchors", torch.zeros(config.num_anchors, config.plan_dim))
        self.register_buffer("anchors_set", torch.zeros((), dtype=torch.bool))

    def from_data(self, arrays: Mapping[str, np.ndarray], seed: int = 0) -> torch.Tensor:
        """Set the anchors to the k-means centres of the normalised plans ``arrays["action"]`` (N, plan_steps, 2)
        (metres; other keys ignored), after ``set_normalizer``; the same data and seed give the same anchors.
        Returns the anchors (K, plan_steps, 2) in metres.

        Raises:
            ConfigError: normaliser not set. MissingKeyError: no "action".
            DatasetError: wrong shape, fewer than K plans, or NaN/Inf.
        """
        c = self.config
        self.normalizer.require_set()
        if "action" not in arrays:
            raise MissingKeyError(f"from_data clusters the training plans: arrays lack 'action' ({sorted(arrays)})")
        action = torch.as_tensor(np.asarray(arrays["action"]), dtype=torch.float64)
        if action.ndim != 3 or tuple(action.shape[1:]) != (c.plan_steps, c.action_dim) or len(action) < c.num_anchors:
            raise DatasetError(f"arrays['action'] must have shape (N >= num_anchors = {c.num_anchors}, {c.plan_steps}, "
                               f"{c.action_dim}), got {tuple(action.shape)}")
        if not bool(torch.isfinite(action).all()):
            raise DatasetError("arrays['action'] contains NaN/Inf")
        points = self.normalizer.normalize("action", action.to(self.anchors.device)).flatten(1)
        self.anchors.copy_(kmeans(points, c.num_anchors, seed=int(seed)))
        self.anchors_set.fill_(True)
        return self.anchor_trajectories()

    def anchor_trajectories(self) -> torch.Tensor:
        """The anchors (K, plan_steps, 2) in metres."""
        return self.normalizer.unnormalize("action", self.anchors.unflatten(-1, (self.config.plan_steps, 2)))

    def _require_anchors(self) -> None:
        if not bool(self.anchors_set):
            raise ConfigError("the anchors are not set: call planner.from_data(arrays, seed) after set_normalizer "
                              "(rtdp train does), or load a trained planner")

    def _base(self, x_t: torch.Tensor) -> torch.Tensor | None:
        return self.anchors.to(x_t.dtype).expand(x_t.shape[0], -1, -1) if self.config.residual else None

    def _loss(self, ctx: SceneContext, target: torch.Tensor) -> torch.Tensor:
        self._require_anchors()
        c = self.config
        b, anchors = target.shape[0], self.anchors.to(target.dtype)
        t = torch.randint(0, c.train_trunc, (b,), device=target.device)
        x_t = self._vp_noised(anchors.expand(b, -1, -1), t)
        dist = (anchors.view(1, -1, c.plan_steps, 2) - target.view(b, 1, c.plan_steps, 2)).norm(dim=-1).mean(-1)
        nearest = dist.argmin(dim=1)
        rows = torch.arange(b, device=target.device)
        return sum(F.l1_loss(x0[rows, nearest], target) + c.score_weight * F.cross_entropy(logits, nearest)
                   for x0, logits in self.decoder(x_t, t, ctx.tokens, ctx.pad, base=self._base(x_t)))

    def _sample(self, ctx, steps, generator, n_candidates):
        self._require_anchors()
        sigmas = sigmas_truncated(self.alphas_cumprod.detach().cpu(), self.config.trunc_step, steps)
        x = anchored_start(self.anchors, sigmas[0], batch=ctx.tokens.shape[0], generator=generator)
        x = sample_ddim(self._denoiser(), x.to(ctx.tokens.dtype), sigmas, cond=ctx)
        return x[torch.arange(x.shape[0], device=x.device), ctx.logits.argmax(1)], x, ctx.logits, ctx.calls

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None) -> "AnchorPlanner":
        """``Model.from_pretrained``; also a CheckpointError for ``anchors`` of another K than ``num_anchors``."""
        from safetensors import SafetensorError, safe_open

        path, shape, config = Path(directory), None, read_meta(directory).get("config")
        k = config.get("num_anchors", AnchorPlannerConfig.num_anchors) if isinstance(config, dict) else None
        try:
            with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
                shape = f.get_slice("anchors").get_shape() if "anchors" in f.keys() else None
        except (OSError, SafetensorError):
            pass  # a missing or unreadable file: the base class says which
        if k is not None and shape is not None and (len(shape) != 2 or shape[0] != k):
            raise CheckpointError(f"{path / WEIGHTS_FILE}: anchors has shape {tuple(shape)}, i.e. K = {shape[0]} "
                                  f"anchors, but the config's num_anchors is K = {k}")
        return super().from_pretrained(directory, device=device)


class DiffusionPlanner(Planner):
    """Vanilla diffusion planner: one trajectory query, DDIM from Gaussian noise.

    Trained at t ~ U[0, num_train_timesteps) on the VP-noised target to predict x0 with a squared loss
    (its minimiser, the posterior mean, is what DDIM assumes), summed over stages. ``plan(obs,
    n_candidates=N)`` samples N independent noises per scene (candidates (B, N, ...)); the first is the plan.
    """

    model_type: ClassVar[str] = "diffusion_planner"
    config_class: ClassVar[type[PlannerConfig]] = DiffusionPlannerConfig

    def _loss(self, ctx: SceneContext, target: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.config.num_train_timesteps, (target.shape[0],), device=target.device)
        return sum(F.mse_loss(x0[:, 0], target)
                   for x0, _ in self.decoder(self._vp_noised(target.unsqueeze(1), t), t, ctx.tokens, ctx.pad))

    def _sample(self, ctx, steps, generator, n_candidates):
        n = int_in(1 if n_candidates is None else n_candidates, "n_candidates", 1, 1 << 16)
        b, p = ctx.tokens.shape[0], self.config.plan_dim
        sigmas = sigmas_ddim(self.alphas_cumprod.detach().cpu(), steps)
        noise = torch.randn((b, n, p), generator=generator,
                            device=self.device if generator is None else generator.device).to(ctx.tokens)
        x = vp_noise_to_start(noise, sigmas[0]).reshape(b * n, 1, p)
        rep = SceneContext(ctx.tokens.repeat_interleave(n, 0), ctx.pad.repeat_interleave(n, 0))
        cand = sample_ddim(self._denoiser(), x, sigmas, cond=rep).reshape(b, n, p)
        return cand[:, 0], cand, None, rep.calls


class RegressionPlanner(Planner):
    """Single-mode regression (Transfuser's head): one learned query, L1 to the target summed over stages,
    one network call; the decoder sees t = 0 (its time embedding is then a learned constant)."""

    model_type: ClassVar[str] = "regression_planner"
    config_class: ClassVar[type[PlannerConfig]] = RegressionPlannerConfig

    def __init__(self, config: RegressionPlannerConfig) -> None:
        super().__init__(config)
        self.query = nn.Parameter(torch.randn(1, 1, config.d_model) * 0.02)

    def _outputs(self, ctx: SceneContext) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        b = ctx.tokens.shape[0]
        return self.decoder(None, torch.zeros(b, dtype=torch.long, device=ctx.tokens.device), ctx.tokens, ctx.pad,
                            query=self.query.expand(b, -1, -1))

    def _loss(self, ctx: SceneContext, target: torch.Tensor) -> torch.Tensor:
        return sum(F.l1_loss(x0[:, 0], target) for x0, _ in self._outputs(ctx))

    def _sample(self, ctx, steps, generator, n_candidates):
        return self._outputs(ctx)[-1][0][:, 0], None, None, 1
