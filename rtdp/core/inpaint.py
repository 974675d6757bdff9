"""Inpainting a known prefix into a sample: the core of real-time chunking.

Real-time chunking (Black et al., Physical Intelligence 2025) starts the next
action chunk while the current one executes; the actions that will run
during inference are already committed, so the new chunk must agree with
them. Here that is a denoiser wrapper, so every sampler gets it unchanged:
the clean estimate is pulled towards the committed actions with a weight per
position (1 on the frozen prefix, decaying over the rest of the overlap, 0
after), ``x0 = w * target + (1 - w) * x0_hat``. The sampler's next state is
built from that estimate, so the network sees a noisy trajectory whose prefix
already agrees with the target and continues it; at the last step (sigma 0)
positions with weight 1 equal the target exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from rtdp.errors import ConfigError


def rtc_weights(n_overlap: int, n_frozen: int, *, decay: str = "exp") -> torch.Tensor:
    """Per-position inpainting weights of real-time chunking.

    Args:
        n_overlap: positions of the new chunk that overlap committed actions.
        n_frozen: leading positions that execute before the new chunk can arrive
            (inference delay in control steps); weight 1.
        decay: ``"exp"`` (the paper's soft mask, ``(e^c - 1) / (e - 1)`` on a
            linear ramp c from 1 to 0) or ``"linear"``.

    Returns:
        (n_overlap,) weights in [0, 1], non-increasing.
    """
    if n_overlap < 0 or n_frozen < 0:
        raise ConfigError(f"overlap and frozen steps must be >= 0, got {n_overlap}, {n_frozen}")
    n_frozen = min(n_frozen, n_overlap)
    w = torch.ones(n_overlap)
    rest = n_overlap - n_frozen
    if rest > 0:
        c = 1.0 - torch.arange(1, rest + 1, dtype=torch.float32) / (rest + 1)
        if decay == "exp":
            c = (torch.exp(c) - 1.0) / (torch.e - 1.0)
        elif decay != "linear":
            raise ConfigError(f"decay must be 'exp' or 'linear', got {decay!r}")
        w[n_frozen:] = c
    return w


class InpaintDenoiser:
    """``denoiser(x, sigma, cond)`` whose estimate agrees with ``target`` where ``weights`` say.

    Args:
        denoiser: the wrapped ``denoiser(x, sigma, cond) -> x0_hat``, x (B, T, D).
        target: (B, K, D) values for positions ``start .. start + K - 1``, in the
            denoiser's (normalised) units.
        weights: (K,) or (B, K) in [0, 1].
        start: first horizon position the target covers.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], target: torch.Tensor, weights: torch.Tensor,
                 start: int = 0) -> None:
        if target.ndim != 3:
            raise ConfigError(f"inpainting target must be (B, K, D), got shape {tuple(target.shape)}")
        k = target.shape[1]
        weights = torch.as_tensor(weights, dtype=target.dtype, device=target.device)
        if weights.shape[-1] != k or weights.ndim not in (1, 2):
            raise ConfigError(f"inpainting weights must be (K,) or (B, K) with K = {k}, got {tuple(weights.shape)}")
        if bool(((weights < 0) | (weights > 1)).any()):
            raise ConfigError("inpainting weights must lie in [0, 1]")
        self.denoiser, self.target, self.start = denoiser, target, int(start)
        self.weights = weights.reshape(-1, k, 1) if weights.ndim == 2 else weights.reshape(1, k, 1)

    def __getattr__(self, name: str) -> Any:  # nfe counters etc. of the wrapped denoiser
        return getattr(self.denoiser, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, cond)
        s, k = self.start, self.target.shape[1]
        if s + k > x0.shape[1]:
            raise ConfigError(f"inpainting positions {s}..{s + k - 1} exceed the horizon {x0.shape[1]}")
        out = x0.clone()
        out[:, s : s + k] = self.weights * self.target + (1 - self.weights) * x0[:, s : s + k]
        return out
