"""Distribution matching for one-step generators (DMD, Yin et al. 2024; OneDP, Wang et al. 2025).

A one-step generator ``x = G(z, cond)`` is trained to minimise the reverse KL
divergence between its output distribution and the teacher's, both diffused
to every noise level ``sigma`` of the teacher's forward process. Its gradient
with respect to a generated sample is the difference of the two scores at the
noised sample ``x_t = x + sigma * eps``:

    grad_x KL = E[ s_fake(x_t, sigma) - s_real(x_t, sigma) ],
    s(x_t, sigma) = (D(x_t, sigma) - x_t) / sigma^2,

where ``D_real`` is the frozen teacher's denoiser and ``D_fake`` a denoiser
fitted, by ordinary denoising score matching, to the generator's own current
outputs (the auxiliary "generator score network"). The ``x_t / sigma^2``
terms cancel, leaving ``(D_fake - D_real) / sigma^2``. Like DMD, the loss
below replaces the ``1 / sigma^2`` weight by a per-sample normaliser
``1 / mean|x - D_real|``, which keeps the step size alike across noise levels.

Both functions take denoisers in the core's form ``denoiser(x, sigma, cond)
-> x0_hat``, so any preconditioned network (EDM, DDPM) works, and the 1-D
Gaussian of the unit test works the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, ...) to broadcast over a sample's dimensions
    return sigma.to(x.dtype).reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def distribution_matching_loss(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, real: Denoiser,
                               fake: Denoiser, cond: Any = None, fake_cond: Any = None,
                               eps: float = 1e-6) -> torch.Tensor:
    """Surrogate loss whose gradient with respect to ``x`` is the normalised reverse-KL gradient.

    ``0.5 * ||x - sg(x - g)||^2`` averaged over elements has gradient ``g / N``
    with ``g = (D_fake(x_t) - D_real(x_t)) / mean|x - D_real(x_t)|``: the
    generator's samples move towards where the teacher's denoiser points and
    away from where its own distribution's denoiser points.

    Args:
        x: (B, ...) generated samples, carrying the generator's graph.
        sigma: (B,) noise levels at which the two distributions are compared.
        noise: standard normal noise of ``x``'s shape.
        real: the teacher's denoiser (frozen).
        fake: the denoiser fitted to the generator's outputs.
        cond: conditioning passed to ``real``.
        fake_cond: conditioning passed to ``fake`` (default ``cond``).
        eps: floor of the normaliser.

    Returns:
        scalar loss (its value is half the mean squared normalised gradient).
    """
    with torch.no_grad():
        x_t = x.detach() + _per_sample(sigma, x) * noise
        d_real = real(x_t, sigma, cond)
        d_fake = fake(x_t, sigma, cond if fake_cond is None else fake_cond)
        dims = tuple(range(1, x.ndim))
        scale = (x.detach() - d_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        grad = (d_fake - d_real) / scale
        target = x.detach() - grad
    return 0.5 * torch.mean((x - target) ** 2)


def denoising_loss(denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                   cond: Any = None, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM-weighted denoising score matching of ``denoiser`` on the samples ``x0`` (no gradient into them).

    Weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2`` (Karras et al. 2022),
    so every noise level contributes alike. This is how the auxiliary network tracks the generator.

    Args:
        denoiser: ``denoiser(x, sigma, cond) -> x0_hat`` being fitted.
        x0: (B, ...) samples whose distribution it should denoise (detached here).
        sigma: (B,) noise levels.
        noise: standard normal noise of ``x0``'s shape.
    """
    x0 = x0.detach()
    s = _per_sample(sigma, x0)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    return torch.mean(weight * (denoiser(x0 + s * noise, sigma, cond) - x0) ** 2)
