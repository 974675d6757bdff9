"""Classifier-free guidance with adaptive guidance skipping.

Classifier-free guidance (Ho & Salimans 2022) mixes a conditional and an
unconditional prediction, ``x0 = x0_u + scale * (x0_c - x0_u)``: scale 1 is
the conditional model, 0 the unconditional one, > 1 pushes past it. It
costs two network evaluations per step. Adaptive guidance (Castillo et al.
2023) observes that late in sampling the two predictions agree, and stops
the unconditional pass once their cosine similarity exceeds a threshold;
the remaining steps use the conditional prediction alone.
"""

from __future__ import annotations

from typing import Any

import torch

from rtdp.core.samplers import Denoiser
from rtdp.errors import ConfigError


class GuidedDenoiser:
    """A denoiser over one sampling run with classifier-free guidance.

    Build one per sampling call: it records whether guidance was skipped,
    which is state of that run only.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat``.
        cond: conditioning with the goal.
        uncond: the same conditioning with the goal dropped.
        scale: guidance scale (0: unconditional, 1: conditional).
        skip_cos: stop the unconditional pass once cos(x0_c, x0_u) exceeds
            this for every sample (None: never skip). The cosine is taken
            between the clean-sample predictions, not the noise predictions:
            at high noise both noise predictions are close to x / sigma and
            agree whatever the goal, while the clean predictions differ until
            the goal's effect has been decided.
    """

    def __init__(
        self, denoiser: Denoiser, cond: Any, uncond: Any, scale: float, skip_cos: float | None = None
    ) -> None:
        if skip_cos is not None and not -1.0 <= float(skip_cos) <= 1.0:
            raise ConfigError(f"guidance skip threshold must be a cosine in [-1, 1], got {skip_cos}")
        self.denoiser = denoiser
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.skip_cos = None if skip_cos is None else float(skip_cos)
        self.skipped = False
        self.guided_calls = 0
        self.cosines: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``x0_hat`` with guidance; the ``cond`` argument is ignored (set at construction)."""
        if self.scale == 1.0 or self.skipped:
            return self.denoiser(x, sigma, self.cond)
        if self.scale == 0.0:
            return self.denoiser(x, sigma, self.uncond)
        x0_c = self.denoiser(x, sigma, self.cond)
        x0_u = self.denoiser(x, sigma, self.uncond)
        self.guided_calls += 1
        if self.skip_cos is not None:
            cos = torch.nn.functional.cosine_similarity(x0_c.flatten(1), x0_u.flatten(1), dim=1, eps=1e-12)
            self.cosines.append(float(cos.min()))
            if bool((cos > self.skip_cos).all()):
                self.skipped = True
        return x0_u + self.scale * (x0_c - x0_u)
