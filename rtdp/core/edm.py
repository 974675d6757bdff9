"""EDM preconditioning (Karras et al. 2022) and consistency-model parametrisation.

A network ``F(c_in * x, c_noise, cond)`` trained with EDM preconditioning
denoises as ``D(x, sigma) = c_skip * x + c_out * F``, which is already the
core's ``denoiser(x, sigma, cond) -> x0_hat`` form, so every rtdp sampler runs
it. Noise levels may be one per trajectory (B,) or one per action (B, T);
the scalings are elementwise, so per-position levels (streaming) need no
special case.

The consistency parametrisation (Song et al. 2023, Eq. 7 with EDM's scalings)
shifts ``c_skip`` / ``c_out`` so that ``f(x, sigma_min) = x`` exactly: the
boundary condition a consistency model needs.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from rtdp.errors import ConfigError

Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, 1); (B, T) -> (B, T, 1).
    return sigma.to(x.dtype).reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


class EDMDenoiser(nn.Module):
    """``x0_hat = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), cond)``.

    Args:
        model: ``model(x_in, c_noise, cond) -> F``; x_in (B, T, D), c_noise of
            sigma's shape ((B,) or (B, T)), F (B, T, D).
        sigma_data: standard deviation of the (normalised) data; 0.5 for
            actions in [-1, 1] (BESO).
        consistency_sigma_min: None for EDM's scalings; a value switches to the
            consistency parametrisation with boundary ``f(x, sigma_min) = x``.
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0]; None disables it.
    """

    def __init__(
        self,
        model: nn.Module | Network,
        sigma_data: float = 0.5,
        *,
        consistency_sigma_min: float | None = None,
        clip_x0: float | None = None,
    ) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ConfigError(f"sigma_data must be > 0, got {sigma_data}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.consistency_sigma_min = None if consistency_sigma_min is None else float(consistency_sigma_min)
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        self.nfe = 0

    def reset_nfe(self) -> None:
        """Set the network-evaluation counter to zero."""
        self.nfe = 0

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise), each of sigma's shape."""
        sd2 = self.sigma_data**2
        c_in = 1.0 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.clamp_min(1e-20).log() / 4
        if self.consistency_sigma_min is None:
            c_skip = sd2 / (sigma**2 + sd2)
            c_out = sigma * self.sigma_data * c_in
        else:
            shifted = sigma - self.consistency_sigma_min
            c_skip = sd2 / (shifted**2 + sd2)
            c_out = shifted * self.sigma_data * c_in
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Denoise.

        Args:
            x: (B, T, D) sample at noise level sigma (x0 + sigma * eps).
            sigma: (B,) or (B, T).
            cond: passed to the network unchanged.

        Returns:
            x0_hat, (B, T, D).
        """
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        out = self.model(x * _expand(c_in, x), c_noise.to(x.dtype), cond)
        self.nfe += 1
        x0 = _expand(c_skip, x) * x + _expand(c_out, x) * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0

    def training_target(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Target for F such that plain MSE on F equals EDM's weighted loss on D.

        EDM weights ``||D - x0||^2`` by ``lambda = 1 / c_out^2``; since
        ``D - x0 = c_out (F - (x0 - c_skip x) / c_out)``, the weighted loss is
        the unweighted MSE between F and ``(x0 - c_skip x) / c_out``.
        """
        c_skip, c_out, _, _ = self.scalings(sigma)
        return (x0 - _expand(c_skip, x) * x) / _expand(c_out, x)

    def network(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The raw network output F for a noisy sample (what ``training_target`` is compared with)."""
        _, _, c_in, c_noise = self.scalings(sigma)
        return self.model(x * _expand(c_in, x), c_noise.to(x.dtype), cond)


def sample_log_normal_sigma(
    shape: tuple[int, ...],
    p_mean: float = -1.2,
    p_std: float = 1.2,
    *,
    sigma_min: float = 0.0,
    sigma_max: float = math.inf,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EDM's training noise distribution ``ln sigma ~ N(p_mean, p_std^2)``, clamped to [sigma_min, sigma_max]."""
    z = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
    return (p_mean + p_std * z).exp().clamp(sigma_min, sigma_max).to(device)
