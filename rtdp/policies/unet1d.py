"""Diffusion Policy's conditional 1-D temporal U-Net (Chi et al. 2023).

Convolutions run over the time axis of an action trajectory; the diffusion
step embedding and the observation features condition every residual block
through FiLM (per-channel scale and bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rtdp.errors import ConfigError


class SinusoidalPosEmb(nn.Module):
    """Transformer sinusoidal embedding of a (possibly fractional) diffusion step.

    Args:
        dim: embedding width (even).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) or (B, T) -> (B, dim) or (B, T, dim)."""
        arg = t.to(self.freqs.dtype).unsqueeze(-1) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class PerPositionCond(NamedTuple):
    """A per-position condition stored once per distinct row.

    Streaming buffers hold a few noise levels per trajectory (one per rung),
    so the condition (B, T, C) has few distinct rows; FiLM layers run on
    ``rows`` (K, C) and gather with ``index`` (B, T) -> the same result as on
    the full tensor at a fraction of the cost.
    """

    rows: torch.Tensor
    index: torch.Tensor


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish; (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM conditioning between them and a residual path.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        cond_dim: width of the conditioning vector.
        kernel_size: temporal kernel size.
        n_groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        self.out_channels = out_channels
        self.block1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        # FiLM: the condition predicts one scale and one bias per channel.
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual_conv = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: "torch.Tensor | PerPositionCond") -> torch.Tensor:
        """x (B, C_in, T), cond (B, cond_dim) or per position ``PerPositionCond`` over T0 -> (B, C_out, T).

        A per-position condition (streaming: one noise level per action) is
        FiLM applied position by position; at coarser U-Net levels it is
        averaged over the positions each feature covers (T0 = T * 2^k).
        """
        out = self.block1(x)
        if isinstance(cond, PerPositionCond):
            # FiLM of each distinct (trajectory, level) row once, then gathered per position.
            film = self.cond_encoder(cond.rows)[cond.index].transpose(1, 2)
            if film.shape[-1] != out.shape[-1]:
                film = F.adaptive_avg_pool1d(film, out.shape[-1])
        else:
            film = self.cond_encoder(cond).unsqueeze(-1)
        scale, bias = film.chunk(2, dim=1)
        out = self.block2(scale * out + bias)
        return out + self.residual_conv(x)


class Downsample1d(nn.Conv1d):
    """Strided conv halving T; (B, C, T) -> (B, C, T // 2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, 3, stride=2, padding=1)


class Upsample1d(nn.ConvTranspose1d):
    """Transposed conv doubling T; (B, C, T) -> (B, C, 2T)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, 4, stride=2, padding=1)


class ConditionalUnet1D(nn.Module):
    """1-D U-Net over action trajectories with global (FiLM) conditioning.

    Same topology as Diffusion Policy's ``ConditionalUnet1D`` with
    ``cond_predict_scale=True``: a down path of residual-block pairs with
    stride-2 downsampling between levels, two mid blocks, an up path that
    concatenates skip features and upsamples back, and a final
    Conv1dBlock + 1x1 conv.

    Args:
        input_dim: action dimension Da.
        global_cond_dim: width of the flattened observation features (0: none).
        diffusion_step_embed_dim: width of the step embedding.
        down_dims: channels per level; T must be divisible by 2**(len(down_dims) - 1).
        kernel_size: temporal kernel size.
        n_groups: GroupNorm groups (must divide every entry of down_dims).
    """

    # The FiLM layers read the observation: ``fast_network`` keeps them fp32 under bf16 / int8
    bf16_sensitive_layers = ("cond_encoder",)

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int = 0,
        diffusion_step_embed_dim: int = 128,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
    ) -> None:
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims:
            raise ConfigError("down_dims must list at least one level, got ()")
        for d in down_dims:
            if d % n_groups:
                raise ConfigError(f"every down_dims entry must be divisible by n_groups={n_groups}, got {d}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same-length convolution), got {kernel_size}")
        self.input_dim = input_dim
        self.global_cond_dim = global_cond_dim
        self.num_levels = len(down_dims)
        dsed = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + global_cond_dim
        dims = [input_dim, *down_dims]
        in_out = list(zip(dims[:-1], dims[1:]))

        def block(cin: int, cout: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(cin, cout, cond_dim, kernel_size, n_groups)

        self.down_modules = nn.ModuleList()
        for i, (cin, cout) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down_modules.append(
                nn.ModuleList([block(cin, cout), block(cout, cout), nn.Identity() if last else Downsample1d(cout)])
            )
        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        # The finest level's skip is not concatenated back (as in Diffusion
        # Policy); every up level upsamples, so the output regains length T.
        self.up_modules = nn.ModuleList()
        for cin, cout in reversed(in_out[1:]):
            self.up_modules.append(nn.ModuleList([block(cout * 2, cin), block(cin, cin), Upsample1d(cin)]))
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], input_dim, 1)
        )

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int | float, global_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the diffusion target (noise) for a noisy trajectory.

        Args:
            sample: noisy actions, (B, T, Da).
            timestep: diffusion step (or EDM noise embedding), scalar, (B,), or
                (B, T) for one noise level per action position.
            global_cond: flattened observation features, (B, global_cond_dim).

        Returns:
            (B, T, Da).
        """
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 2:
            cond = self._per_position_cond(t, global_cond, sample.dtype)
        else:
            cond = self.diffusion_step_encoder(t).to(sample.dtype)
            if global_cond is not None:
                cond = torch.cat([cond, global_cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res(x, cond)
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = up(res2(res1(x, cond), cond))
        return self.final_conv(x).transpose(1, 2)

    def deepcache_modules(self, branch: int = 1) -> list[str]:
        """Submodules below DeepCache's skip branch ``branch`` (1 .. num_levels - 1).

        The shallow path keeps the down levels above ``branch``, the residual
        blocks of level ``branch`` (its skip feature) and the up levels that
        consume skips of levels 1 .. ``branch``; everything deeper (the rest of
        the down path, the mid blocks and the deeper up levels) is what a
        cached step reuses. Names are the callables the forward pass invokes.

        Raises:
            ConfigError: ``branch`` outside 1 .. num_levels - 1.
        """
        levels = self.num_levels
        if not 1 <= int(branch) <= levels - 1:
            raise ConfigError(f"DeepCache branch must be in 1..{levels - 1} for a {levels}-level U-Net, got {branch}")
        b = int(branch)
        names = [f"down_modules.{b}.2"]
        names += [f"down_modules.{k}.{i}" for k in range(b + 1, levels) for i in range(3)]
        names += [f"mid_modules.{i}" for i in range(len(self.mid_modules))]
        names += [f"up_modules.{j}.{i}" for j in range(levels - 1 - b) for i in range(3)]
        return names

    def _per_position_cond(self, t: torch.Tensor, global_cond: torch.Tensor | None, dtype: torch.dtype) -> PerPositionCond:
        """Condition rows for every distinct (trajectory, step) pair of t (B, T)."""
        batch, length = t.shape
        values, inverse = torch.unique(t, return_inverse=True)
        key = torch.arange(batch, device=t.device).unsqueeze(1) * values.numel() + inverse
        keys, index = torch.unique(key, return_inverse=True)
        emb = self.diffusion_step_encoder(values).to(dtype)[keys % values.numel()]
        if global_cond is not None:
            emb = torch.cat([emb, global_cond[keys // values.numel()]], dim=-1)
        return PerPositionCond(emb, index)
