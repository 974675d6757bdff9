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
        skip_cos: stop a sample's unconditional pass once cos(x0_c, x0_u)
            exceeds this for that sample (None: never skip); in a batch the
            unconditional pass runs only on the samples still guided. The cosine is taken
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
        self.guided_calls = 0
        self.cosines: list[float] = []
        # Per sample: still guided, and network evaluations spent (set on the first call).
        self.active: torch.Tensor | None = None
        self.sample_nfe: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """``x0_hat`` with guidance; the ``cond`` argument is ignored (set at construction)."""
        batch = x.shape[0]
        if self.active is None:
            self.active = torch.ones(batch, dtype=torch.bool, device=x.device)
            self.sample_nfe = torch.zeros(batch, dtype=torch.long, device=x.device)
        if self.scale == 0.0:
            self.sample_nfe += 1
            return self.denoiser(x, sigma, self.uncond)
        x0_c = self.denoiser(x, sigma, self.cond)
        self.sample_nfe += 1
        rows = torch.nonzero(self.active).flatten()
        if self.scale == 1.0 or rows.numel() == 0:
            return x0_c
        # The unconditional pass runs only for the samples still guided.
        x0_u = self.denoiser(x[rows], sigma[rows], _take(self.uncond, rows))
        self.sample_nfe[rows] += 1
        self.guided_calls += 1
        x0 = x0_c.clone()
        x0[rows] = x0_u + self.scale * (x0_c[rows] - x0_u)
        if self.skip_cos is not None:
            cos = torch.nn.functional.cosine_similarity(x0_c[rows].flatten(1), x0_u.flatten(1), dim=1, eps=1e-12)
            self.cosines.append(float(cos.min()))
            self.active[rows[cos > self.skip_cos]] = False
        return x0

    @property
    def skipped(self) -> bool:
        """Whether guidance stopped for every sample."""
        return self.active is not None and not bool(self.active.any())


def _take(cond: Any, rows: torch.Tensor) -> Any:
    """Rows of a conditioning tensor (or of every tensor in a tuple/list/dict)."""
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    if isinstance(cond, (tuple, list)):
        return type(cond)(_take(c, rows) for c in cond)
    if isinstance(cond, dict):
        return {k: _take(v, rows) for k, v in cond.items()}
    return cond
