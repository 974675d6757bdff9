"""Diffusion Policy's time-series transformer variant (Chi et al. 2023, ``TransformerForDiffusion``).

The noisy action trajectory becomes T tokens decoded causally (token t sees
tokens <= t) with cross-attention to a short memory of condition tokens: the
diffusion step, then one token per observation step. Action token t may
attend to the step token and to observations up to step t (Diffusion
Policy's ``time_as_cond`` memory mask). Blocks are pre-norm: self-attention,
cross-attention, feed-forward, each with its own residual.

Every projection is a plain ``nn.Linear`` (no fused ``in_proj``), so the
packed inference forms of ``rtdp.core.fastnet`` apply to the whole network and
per-block caching can read each sub-block's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rtdp.errors import ConfigError
from rtdp.policies.ddpm import DdpmConfig, DdpmPolicy
from rtdp.policies.unet1d import SinusoidalPosEmb

POLICY_TYPE = "diffusion_transformer"

__all__ = ["POLICY_TYPE", "TransformerDiffusionConfig", "TransformerDiffusionPolicy", "TransformerForDiffusion"]


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v and output projections.

    Args:
        dim: token width.
        n_head: heads (must divide dim).
        dropout: attention-probability dropout in training.
    """

    def __init__(self, dim: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) attends to memory (B, S, C); mask (T, S) bool, True = may attend -> (B, T, C)."""
        b, t, c = x.shape
        s = memory.shape[1]
        h = self.n_head
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)
        k = self.k(memory).view(b, s, h, c // h).transpose(1, 2)
        v = self.v(memory).view(b, s, h, c // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Sequential):
    """Linear -> GELU -> Linear, width ``4 * dim``."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))


def _replays(module: nn.Module) -> bool:
    """True for a ``rtdp.core.cache.CachedModule`` about to replay its stored output."""
    replays = getattr(module, "replays", None)
    return replays is not None and replays()


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, dim: int, n_head: int, p_drop: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, n_head, p_drop)
        self.cross_attn = Attention(dim, n_head, p_drop)
        self.ffn = FeedForward(dim, p_drop)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), memory (B, S, C) -> (B, T, C)."""
        # A cached sub-block that replays its stored output ignores its input: skip that input's norm.
        y = None if _replays(self.self_attn) else self.norm1(x)
        x = x + self.drop(self.self_attn(y, y, self_mask))
        y = None if _replays(self.cross_attn) else self.norm2(x)
        x = x + self.drop(self.cross_attn(y, memory, cross_mask))
        y = None if _replays(self.ffn) else self.norm3(x)
        return x + self.drop(self.ffn(y))


class TransformerForDiffusion(nn.Module):
    """Action-token decoder conditioned on the diffusion step and per-step observation features.

    Args:
        input_dim: action dimension Da.
        horizon: T, action tokens.
        n_obs_steps: To, observation tokens.
        obs_dim: per-step observation feature width.
        n_layer: decoder blocks.
        n_head: attention heads.
        n_emb: token width.
        p_drop_emb: dropout on the token embeddings.
        p_drop_attn: dropout inside the blocks.
        causal_attn: causal self-attention and Diffusion Policy's memory mask.
    """

    def __init__(self, input_dim: int, horizon: int, n_obs_steps: int, obs_dim: int, n_layer: int = 8,
                 n_head: int = 4, n_emb: int = 256, p_drop_emb: float = 0.0, p_drop_attn: float = 0.3,
                 causal_attn: bool = True) -> None:
        super().__init__()
        if n_emb % n_head:
            raise ConfigError(f"n_emb={n_emb} must be a multiple of n_head={n_head}")
        self.horizon, self.n_obs_steps, self.obs_dim = horizon, n_obs_steps, obs_dim
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(obs_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        # Diffusion Policy's condition encoder when n_cond_layers = 0: a per-token MLP.
        self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.blocks = nn.ModuleList(DecoderBlock(n_emb, n_head, p_drop_attn) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, input_dim)
        if causal_attn:
            t = torch.arange(horizon)
            s = torch.arange(1 + n_obs_steps)
            self.register_buffer("self_mask", t[None, :] <= t[:, None], persistent=False)
            # memory token 0 is the step, token s >= 1 the observation at step s - 1
            self.register_buffer("cross_mask", t[:, None] >= s[None, :] - 1, persistent=False)
        else:
            self.self_mask = None
            self.cross_mask = None
        self._init_weights()

    def cache_blocks(self) -> list["Block"]:
        """The sub-blocks block-wise caching schedules, in execution order (``rtdp.core.bac``)."""
        from rtdp.core.bac import KINDS, Block

        return [Block(f"blocks.{i}.{kind}", kind, i) for i in range(len(self.blocks)) for kind in KINDS]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the diffusion target for a noisy trajectory.

        Args:
            sample: (B, T, Da).
            timestep: scalar or (B,); per-position levels (B, T) are not supported.
            global_cond: the policy's flattened per-step features, (B, To * obs_dim).

        Returns:
            (B, T, Da).

        Raises:
            ConfigError: per-position timesteps or a condition of the wrong width.
        """
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1:
            raise ConfigError("the transformer policy takes one diffusion step per trajectory, not per position")
        if global_cond is None or global_cond.shape[-1] != self.n_obs_steps * self.obs_dim:
            got = None if global_cond is None else tuple(global_cond.shape)
            raise ConfigError(f"global_cond must be (B, {self.n_obs_steps * self.obs_dim}), got {got}")
        cond = torch.cat([self.time_emb(t).to(sample.dtype).unsqueeze(1),
                          self.cond_obs_emb(global_cond.view(batch, self.n_obs_steps, self.obs_dim))], dim=1)
        memory = self.encoder(self.drop(cond + self.cond_pos_emb))
        x = self.drop(self.input_emb(sample) + self.pos_emb[:, : sample.shape[1]])
        for block in self.blocks:
            x = block(x, memory, self.self_mask, self.cross_mask)
        return self.head(self.ln_f(x))


@dataclass(kw_only=True)
class TransformerDiffusionConfig(DdpmConfig):
    """``DdpmConfig`` with the transformer's width and depth.

    Attributes:
        n_layer: decoder blocks (Diffusion Policy: 8).
        n_head: attention heads (4).
        n_emb: token width (256).
        p_drop_emb: embedding dropout (0.0).
        p_drop_attn: block dropout (0.3 for images in Diffusion Policy, 0.01 for low-dim).
        causal_attn: causal action decoding (True).
    """

    # written by older versions, which derived this config from the U-Net one; unused by the transformer
    legacy_fields: ClassVar[tuple[str, ...]] = ("down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim")

    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.01
    causal_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_layer", "n_head", "n_emb"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))
        if self.n_emb % self.n_head:
            raise ConfigError(f"n_emb={self.n_emb} must be a multiple of n_head={self.n_head}")
        for name in ("p_drop_emb", "p_drop_attn"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        self.causal_attn = bool(self.causal_attn)


class TransformerDiffusionPolicy(DdpmPolicy):
    """Diffusion Policy (transformer): the DDPM family with ``TransformerForDiffusion`` as its network."""

    model_type = POLICY_TYPE
    config_class = TransformerDiffusionConfig

    def size_label(self) -> str:
        return f"{self.config.n_layer}x{self.config.n_emb} transformer"

    def _build_network(self, config: TransformerDiffusionConfig) -> nn.Module:
        return TransformerForDiffusion(
            input_dim=config.action_dim, horizon=config.horizon, n_obs_steps=config.n_obs_steps,
            obs_dim=config.obs_feature_dim, n_layer=config.n_layer, n_head=config.n_head, n_emb=config.n_emb,
            p_drop_emb=config.p_drop_emb, p_drop_attn=config.p_drop_attn, causal_attn=config.causal_attn,
        )
