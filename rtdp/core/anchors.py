"""Truncated diffusion from prior anchors (DiffusionDrive, Liao et al. CVPR 2025).

Instead of starting from pure noise at the top of the schedule, sampling
starts from K prior "anchors" (k-means centres of training trajectories)
noised only up to a small truncation level, e.g. training step 10 of 1000,
and takes a couple of DDIM steps from there. In the core's variance-exploding
form the start is ``x = anchor + sigma_{t_start} * eps`` and the schedule is
``sigmas_truncated(alphas_cumprod, t_start, steps)``; any sampler then runs
unchanged::

    anchors = kmeans(train_trajectories, k=20)                # (K, T, D), offline
    sigmas = sigmas_truncated(alphas_cumprod, t_start=10, steps=2)
    x = anchored_start(anchors, sigmas[0], batch=B)           # (B, K, T*D): all anchors at once
    plans = sample_ddim(denoiser, x, sigmas, cond=cond)       # 2 network evaluations
    plans = plans.unflatten(-1, anchors.shape[1:])            # (B, K, T, D)

or, for a policy that samples one trajectory per batch row,
``anchored_start_rows(anchors, index, sigmas[0])`` gives (B, T, D).
"""

from __future__ import annotations

import torch

from rtdp.core.schedules import sigmas_from_alphas_cumprod
from rtdp.errors import ConfigError

# Rows of points compared with all centres at once: bounds the (rows, k, D) difference tensor.
_DIST_ELEMENTS = 1 << 22


def _as_int(value: object, name: str) -> int:
    try:
        ok = not isinstance(value, (bool, str)) and int(value) == value  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be an int, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # Squared Euclidean distances (N, k) from differences, not the |x|^2 - 2xc + |c|^2
    # expansion, so they are exact up to rounding of each term and never negative.
    rows = max(1, _DIST_ELEMENTS // max(1, c.shape[0] * c.shape[1]))
    return torch.cat([((x[i:i + rows, None, :] - c[None]) ** 2).sum(-1) for i in range(0, x.shape[0], rows)])


def nearest_centre(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (Euclidean, over all coordinates) of every point.

    Ties go to the lower index.

    Args:
        points: (N, *shape).
        centres: (K, *shape), e.g. the anchors from ``kmeans``.

    Returns:
        labels, (N,), int64 in [0, K).

    Raises:
        ConfigError: the trailing shapes differ or there are no centres.
    """
    if points.ndim < 1 or centres.ndim < 1 or points.shape[1:] != centres.shape[1:]:
        raise ConfigError(
            f"points (N, *shape) and centres (K, *shape) must share *shape; got {tuple(points.shape)} "
            f"and {tuple(centres.shape)}"
        )
    if centres.shape[0] == 0:
        raise ConfigError("centres is empty: need at least one centre")
    x = points.reshape(points.shape[0], -1)
    c = centres.reshape(centres.shape[0], -1).to(device=x.device, dtype=torch.promote_types(x.dtype, centres.dtype))
    return _sq_dists(x.to(c.dtype), c).argmin(dim=1)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    # k-means++ (Arthur & Vassilvitskii 2007): each new centre is a data point drawn
    # with probability proportional to its squared distance to the nearest centre so far.
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, k):
        if float(d2.sum()) > 0:
            i = int(torch.multinomial(d2, 1, generator=generator))
        else:  # every point already coincides with a centre
            i = int(torch.randint(n, (1,), generator=generator))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(-1))
    return torch.stack(centres)


def _lexsort_rows(c: torch.Tensor) -> torch.Tensor:
    # Order of the rows of c (k, D) by the first coordinate, ties by the second, and so on:
    # stable sorts from the last key to the first.
    order = torch.arange(c.shape[0])
    for j in reversed(range(c.shape[1])):
        order = order[torch.sort(c[order, j], stable=True).indices]
    return order


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """k-means centres of ``points``, e.g. the anchors of truncated diffusion.

    Lloyd's algorithm from a k-means++ start drawn from a ``torch.Generator``
    seeded with ``seed``, on the points flattened to (N, D). It stops when no
    assignment changes, when the summed squared movement of the centres falls
    to ``tol`` times the mean per-coordinate variance of the data (sklearn's
    rule), or after ``iters`` iterations. A cluster left empty is re-seeded
    at the point farthest from its nearest centre (the next farthest for a
    second empty cluster, and so on).

    The work is done on the CPU in float64 (an offline step), so the same
    data and seed give bit-identical centres on every device. The centres are
    returned sorted lexicographically: by the first flattened coordinate,
    ties broken by the second, and so on, so their order does not depend on
    the initialisation.

    Args:
        points: (N, *shape), e.g. N trajectories (N, T, D); finite.
        k: number of centres, 1..N.
        seed: seed of the k-means++ initialisation.
        iters: maximum number of Lloyd iterations, >= 1.
        tol: relative tolerance of the centre movement, >= 0.

    Returns:
        centres, (k, *shape), on ``points``' device, in its dtype (the default
        float dtype for integer points).

    Raises:
        ConfigError: k outside 1..N, non-finite points, iters < 1, tol < 0 or NaN,
            or points with no sample dimension.
    """
    if not isinstance(points, torch.Tensor) or points.ndim < 1:
        raise ConfigError(f"points must be a tensor of shape (N, *shape), got {type(points).__name__} "
                          f"{tuple(getattr(points, 'shape', ()))}")
    k = _as_int(k, "k")
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the number of points N={n}, got {k}")
    iters = _as_int(iters, "iters")
    if iters < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    try:
        tol_ok = not isinstance(tol, bool) and float(tol) >= 0  # NaN fails the comparison
    except (TypeError, ValueError):
        tol_ok = False
    if not tol_ok:
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")
    seed = _as_int(seed, "seed")
    out_dtype = points.dtype if points.is_floating_point() else torch.get_default_dtype()
    x = points.detach().to("cpu", torch.float64).reshape(n, -1)
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("points must be finite: found NaN or inf")

    generator = torch.Generator(device="cpu").manual_seed(seed)
    centres = _kmeans_pp(x, k, generator)
    tol_abs = float(tol) * float(x.var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    labels_prev: torch.Tensor | None = None
    for _ in range(iters):
        min_d2, labels = _sq_dists(x, centres).min(dim=1)
        if labels_prev is not None and torch.equal(labels, labels_prev):
            break  # the centres are already the means of these clusters
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        far = min_d2.clone()
        for j in torch.nonzero(counts == 0).flatten().tolist():
            i = int(far.argmax())
            new[j] = x[i]
            far[i] = -1.0  # a second empty cluster takes the next farthest point
        shift = float(((new - centres) ** 2).sum())
        centres, labels_prev = new, labels
        if shift <= tol_abs:
            break
    centres = centres[_lexsort_rows(centres)]
    return centres.reshape((k,) + points.shape[1:]).to(device=points.device, dtype=out_dtype)


def truncated_timesteps(t_start: int, steps: int) -> torch.Tensor:
    """Training steps a truncated sampler visits: ``steps`` integers from ``t_start`` down to 0.

    Evenly spaced and rounded half up, ``t_i = floor(t_start * (steps - 1 - i) / (steps - 1) + 1/2)``
    (exact integer arithmetic), so they are strictly decreasing whenever
    ``t_start >= steps - 1``. E.g. (10, 2) -> [10, 0], (10, 3) -> [10, 5, 0],
    (10, 4) -> [10, 7, 3, 0]; ``steps == 1`` gives ``[t_start]``.

    Args:
        t_start: truncation step, the training step of the first (largest) noise level, >= 0.
        steps: number of sampler steps (network evaluations of a first-order sampler), 1..t_start + 1.

    Returns:
        timesteps, (steps,), int64, decreasing, last entry 0 for ``steps > 1``.

    Raises:
        ConfigError: steps < 1, t_start < 0, or t_start < steps - 1 (a repeated timestep).
    """
    t_start = _as_int(t_start, "t_start")
    steps = _as_int(steps, "steps")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if t_start < 0:
        raise ConfigError(f"t_start must be >= 0, got {t_start}")
    if t_start < steps - 1:
        raise ConfigError(
            f"t_start={t_start} leaves fewer than steps={steps} distinct training steps in [0, t_start]; "
            f"use steps <= {t_start + 1} or a larger t_start"
        )
    if steps == 1:
        return torch.tensor([t_start], dtype=torch.int64)
    m = steps - 1
    return torch.tensor([(2 * t_start * (m - i) + m) // (2 * m) for i in range(steps)], dtype=torch.int64)


def sigmas_truncated(alphas_cumprod: torch.Tensor, t_start: int, steps: int) -> torch.Tensor:
    """Sigma schedule of truncated diffusion: the training levels at
    ``truncated_timesteps(t_start, steps)`` followed by 0.

    The levels are training levels, so a ``DiscreteEpsDenoiser(quantize=True)``
    feeds the network exactly the steps of ``truncated_timesteps``. E.g. for a
    1000-step schedule, ``t_start=10, steps=2`` gives ``[sigma_10, sigma_0, 0]``:
    two DDIM steps, two network evaluations.

    Args:
        alphas_cumprod: training schedule abar, (N,).
        t_start: truncation step, 0..N-1.
        steps: number of nonzero levels, 1..t_start + 1.

    Returns:
        decreasing sigmas, (steps + 1,), float64, first entry the start level
        ``sigma_{t_start} = sqrt((1 - abar) / abar)``, last entry 0.

    Raises:
        ConfigError: alphas_cumprod not 1-D, t_start >= N, or as ``truncated_timesteps``.
    """
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
        shape = tuple(getattr(alphas_cumprod, "shape", ()))
        raise ConfigError(f"alphas_cumprod must be a 1-D tensor (N,), got shape {shape}")
    t = truncated_timesteps(t_start, steps)
    n = alphas_cumprod.numel()
    if int(t[0]) >= n:
        raise ConfigError(f"t_start must be below the number of training steps N={n}, got {int(t[0])}")
    sig = sigmas_from_alphas_cumprod(alphas_cumprod.detach().cpu())[t]
    return torch.cat([sig, sig.new_zeros(1)])


def _check_sigma(sigma: float | torch.Tensor, batch: int) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    if s.ndim > 1 or (s.ndim == 1 and s.numel() != batch):
        raise ConfigError(f"sigma must be a scalar or have shape ({batch},), got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ConfigError(f"sigma must be finite and >= 0, got {sigma}")
    return s


def _check_anchors(anchors: torch.Tensor) -> None:
    if not isinstance(anchors, torch.Tensor) or anchors.ndim < 2 or anchors.shape[0] == 0:
        raise ConfigError(
            f"anchors must be a tensor (K, *shape) with K >= 1 and at least one trailing dimension, got "
            f"{tuple(getattr(anchors, 'shape', ()))}"
        )
    if not anchors.is_floating_point():
        raise ConfigError(f"anchors must be floating point, got {anchors.dtype}")


def _noised(base: torch.Tensor, s: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Noise drawn on the generator's device and moved (as the samplers' _randn_like), so a
    # CPU generator gives the same start whatever device the anchors live on.
    device = generator.device if generator is not None else base.device
    eps = torch.randn(base.shape, generator=generator, device=device, dtype=base.dtype).to(base.device)
    scale = s.to(device=base.device, dtype=base.dtype).reshape(s.shape + (1,) * (base.ndim - s.ndim))
    return base + scale * eps


def anchored_start(anchors: torch.Tensor, sigma: float | torch.Tensor, *, batch: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Starting sample around all K anchors at once: ``x = anchor + sigma * eps``.

    The layout of a planner with K trajectory queries: the sampler's position
    axis holds the K anchors, each a whole flattened trajectory, so a
    denoiser sees ``x`` of shape (B, K, T*D) and ``sample_<name>(denoiser, x,
    sigmas_truncated(...))`` returns K refined trajectories per batch row
    (``.unflatten(-1, anchors.shape[1:])`` gives them back as (B, K, T, D)).
    Each of the ``batch * K`` trajectories gets its own noise.

    Args:
        anchors: (K, *shape), e.g. (K, T, D) trajectories or (K, T*D); floating point.
        sigma: start level, normally ``sigmas_truncated(...)[0]``; a scalar, or (B,)
            for a level per batch row; >= 0.
        batch: B, number of copies of the anchor set, >= 1.
        generator: source of eps; noise is drawn on its device and moved to the anchors'.

    Returns:
        x, (B, K, prod(shape)), on the anchors' device and in their dtype.

    Raises:
        ConfigError: anchors not (K, *shape) floating point, batch < 1, or a
            negative, non-finite or wrongly shaped sigma.
    """
    _check_anchors(anchors)
    batch = _as_int(batch, "batch")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    s = _check_sigma(sigma, batch)
    flat = anchors.detach().reshape(anchors.shape[0], -1)
    base = flat.unsqueeze(0).expand(batch, -1, -1)
    return _noised(base, s, generator)


def anchored_start_rows(anchors: torch.Tensor, index: torch.Tensor, sigma: float | torch.Tensor, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Starting sample around one chosen anchor per batch row: ``x[b] = anchors[index[b]] + sigma * eps``.

    The layout of a single-trajectory action policy, whose sampler sees (B, T, D).

    Args:
        anchors: (K, T, D) (any (K, *shape) works); floating point.
        index: anchor of each batch row, (B,), integer, in [0, K).
        sigma: start level, normally ``sigmas_truncated(...)[0]``; a scalar or (B,); >= 0.
        generator: source of eps; noise is drawn on its device and moved to the anchors'.

    Returns:
        x, (B, T, D) (generally (B, *shape)), on the anchors' device and in their dtype.

    Raises:
        ConfigError: anchors not (K, *shape) floating point, index not a 1-D
            integer tensor in [0, K), or a negative, non-finite or wrongly shaped sigma.
    """
    _check_anchors(anchors)
    k = anchors.shape[0]
    if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype.is_floating_point \
            or index.dtype.is_complex or index.dtype == torch.bool:
        raise ConfigError(f"index must be a 1-D integer tensor (B,), got {getattr(index, 'dtype', type(index))} "
                          f"{tuple(getattr(index, 'shape', ()))}")
    if index.numel() == 0:
        raise ConfigError("index is empty: need at least one batch row")
    if bool((index < 0).any()) or bool((index >= k).any()):
        raise ConfigError(f"index must lie in [0, K={k}), got values from {int(index.min())} to {int(index.max())}")
    s = _check_sigma(sigma, index.numel())
    base = anchors.detach()[index.to(anchors.device).long()]
    return _noised(base, s, generator)

