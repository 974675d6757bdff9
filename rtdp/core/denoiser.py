"""Wrappers that turn trained networks into the core's denoiser contract.

Every rtdp sampler calls ``denoiser(x, sigma, cond) -> x0_hat`` in the
variance-exploding parametrisation ``x = x0 + sigma * eps``. Networks trained
in diffusers' variance-preserving discrete form are wrapped once here
(k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``), so any sampler runs any model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rtdp.core.schedules import _sigma_to_t_lin, _sigma_to_t_log, sigmas_from_alphas_cumprod
from rtdp.errors import ConfigError

EpsModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SIGMA_INTERPOLATIONS = ("log", "linear")


class DiscreteEpsDenoiser(nn.Module):
    """Denoiser over a discrete-time (DDPM-trained) network.

    The network sees diffusers' input ``x_t = x * sqrt(abar_t)`` and timestep
    ``t`` (the training step whose sigma is nearest in log space, or a
    fractional step with ``quantize=False``). Its output becomes
    ``x0_hat`` with the expression diffusers' schedulers evaluate for the
    ``prediction_type`` it was trained with (``a = sqrt(abar_t)``,
    ``s = sqrt(1 - abar_t)``):

    - ``"epsilon"``: ``x0_hat = (x_t - s * eps) / a`` (the default),
    - ``"sample"``: ``x0_hat = out``,
    - ``"v_prediction"``: ``x0_hat = a * x_t - s * v`` (Salimans & Ho 2022,
      ``v = a * eps - s * x0``),

    then optionally clipped as diffusers clips ``pred_original_sample``.
    The three give the same sampler for the same underlying model.

    Network evaluations are counted in ``nfe`` (reset it with ``reset_nfe``)
    so a benchmark can report evaluations per chunk.

    Args:
        model: ``model(x_t, t, cond) -> out``; x_t (B, T, D), t (B,) or (B, T)
            (same shape as the sigma given to the denoiser), out (B, T, D).
        alphas_cumprod: abar table of the training schedule, shape (N,).
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0]; None disables it.
        quantize: feed integer timesteps and read ``a``, ``s`` from the tables
            at that step (what DDPM/DDIM/DPM-Solver schedules need: their
            sigmas are training levels). False feeds fractional steps and takes
            ``a = 1 / sqrt(1 + sigma^2)`` from sigma itself, for schedules whose
            levels fall between training steps (Euler/Heun "linspace", Karras).
        prediction_type: what the network predicts, one of ``PREDICTION_TYPES``
            (diffusers' names and semantics).
        sigma_interpolation: with ``quantize=False``, how sigma varies between
            two training steps when mapping it to a fractional ``t``: ``"log"``
            (log-sigma linear in t, k-diffusion's ``DiscreteSchedule``) or
            ``"linear"`` (sigma linear in t, the ``np.interp`` of diffusers'
            Euler/Euler-ancestral/Heun schedulers: use it to reproduce them).

    Raises:
        ConfigError: unknown ``prediction_type`` or ``sigma_interpolation``, or
            ``sigma_interpolation="linear"`` with ``quantize=True``.
    """

    def __init__(
        self,
        model: nn.Module | EpsModel,
        alphas_cumprod: torch.Tensor,
        clip_x0: float | None = 1.0,
        *,
        quantize: bool = True,
        prediction_type: str = "epsilon",
        sigma_interpolation: str = "log",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
        if sigma_interpolation not in SIGMA_INTERPOLATIONS:
            raise ConfigError(
                f"sigma_interpolation must be one of {', '.join(SIGMA_INTERPOLATIONS)}; got {sigma_interpolation!r}"
            )
        if quantize and sigma_interpolation != "log":
            # Integer steps are table entries; an interpolation rule would silently do nothing.
            raise ConfigError(
                "sigma_interpolation='linear' maps sigma to fractional timesteps: use it with quantize=False"
            )
        self.model = model
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        self.quantize = bool(quantize)
        self.prediction_type = prediction_type
        self.sigma_interpolation = sigma_interpolation
        self.nfe = 0
        # Kept in the given dtype: float32 (diffusers' tables) reproduces diffusers'
        # rounding; float64 gives a reference free of float32 cancellation.
        ac = alphas_cumprod.detach().clone()
        sig = sigmas_from_alphas_cumprod(ac)
        # Tables are precomputed so a call costs a lookup, not a schedule rebuild.
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.register_buffer("sigmas", sig, persistent=False)
        self.register_buffer("log_sigmas", sig.log(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - ac).sqrt(), persistent=False)

    @property
    def sigma_min(self) -> float:
        """Smallest nonzero noise level of the training schedule."""
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        """Largest noise level of the training schedule."""
        return float(self.log_sigmas[-1].exp())

    def reset_nfe(self) -> None:
        """Set the network-evaluation counter to zero."""
        self.nfe = 0

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep(s) fed to the network for noise level(s) ``sigma`` (any shape)."""
        if self.sigma_interpolation == "linear":
            return _sigma_to_t_lin(sigma, self.sigmas)
        return _sigma_to_t_log(sigma, self.log_sigmas, self.quantize)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Network timestep and the VP coefficients for ``sigma``.

        Args:
            sigma: (B,) or (B, T).

        Returns:
            (t, sqrt(abar), sqrt(1 - abar)), each of sigma's shape; t int64
            when quantized. Quantized coefficients are read from tables in
            the dtype of ``alphas_cumprod``, as diffusers reads them.
        """
        t = self.sigma_to_t(sigma)
        if self.quantize:
            return t, self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        ac = 1.0 / (1.0 + sigma.double() ** 2)
        dtype = self.alphas_cumprod.dtype
        return t, ac.sqrt().to(dtype), (1 - ac).sqrt().to(dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Denoise.

        Args:
            x: VE-space sample, (B, T, D).
            sigma: noise level per trajectory (B,) or per position (B, T).
            cond: passed to the network unchanged (e.g. global conditioning (B, C)).

        Returns:
            x0_hat, (B, T, D), dtype of ``x``.
        """
        t, c_in, c_noise = self.scalings(sigma)
        # Broadcast (B,) -> (B, 1, 1) and (B, T) -> (B, T, 1).
        shape = sigma.shape + (1,) * (x.ndim - sigma.ndim)
        c_in = c_in.to(x.dtype).reshape(shape)
        c_noise = c_noise.to(x.dtype).reshape(shape)
        x_t = x * c_in
        out = self.model(x_t, t, cond)
        self.nfe += 1
        if self.prediction_type == "epsilon":
            x0 = (x_t - c_noise * out) / c_in
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v_prediction
            x0 = c_in * x_t - c_noise * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0
