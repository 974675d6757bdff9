"""Truncated / anchored diffusion starts: k-means anchors, truncated schedules, anchored starting samples."""

from __future__ import annotations

import math

import pytest
import torch

from rtdp.core import (
    DiscreteEpsDenoiser,
    anchored_start,
    anchored_start_rows,
    kmeans,
    make_alphas_cumprod,
    nearest_centre,
    sample_ddim,
    sigmas_from_alphas_cumprod,
    sigmas_truncated,
    truncated_timesteps,
)
from rtdp.errors import ConfigError


def _blobs(seed: int = 0, per: int = 100, std: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    pts = torch.cat([c + std * torch.randn(per, 2, generator=g, dtype=torch.float64) for c in centres])
    return pts, centres


def _trajectory_anchors(k: int = 4, t: int = 8, d: int = 2) -> torch.Tensor:
    # Straight lines in k well-separated directions: (K, T, D).
    angles = torch.arange(k, dtype=torch.float32) * (2 * math.pi / k)
    steps = torch.arange(1, t + 1, dtype=torch.float32)
    lines = torch.stack([angles.cos(), angles.sin()], dim=-1)[:, None, :] * steps[None, :, None]
    return lines[..., :d]


def _inertia(points: torch.Tensor, centres: torch.Tensor) -> float:
    x = points.reshape(points.shape[0], -1).double()
    c = centres.reshape(centres.shape[0], -1).double()
    return float(torch.cdist(x, c).pow(2).min(dim=1).values.sum())


# ---------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_blobs_sorted():
    pts, true = _blobs()
    centres = kmeans(pts, 3, seed=0)
    assert centres.shape == (3, 2) and centres.dtype == pts.dtype
    # Sorted by the first coordinate (then the second): (-5, 0), (0, 8), (5, 0).
    expected = true[[0, 2, 1]]
    assert torch.allclose(centres, expected, atol=0.15)
    assert torch.equal(centres[:, 0], centres[:, 0].sort().values)


def test_kmeans_reproducible_and_seed_dependent():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(300, 2, generator=g)  # uniform square: many local optima
    a, b = kmeans(pts, 7, seed=0), kmeans(pts, 7, seed=0)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, kmeans(pts, 7, seed=s)) for s in range(1, 6))


def test_kmeans_keeps_trailing_shape_and_dtype():
    g = torch.Generator().manual_seed(2)
    base = _trajectory_anchors(k=3)
    trajs = base.repeat(20, 1, 1) + 0.05 * torch.randn(60, *base.shape[1:], generator=g)
    centres = kmeans(trajs, 3, seed=3)
    assert centres.shape == (3,) + base.shape[1:] and centres.dtype == torch.float32
    # Every true line has a centre within the noise level.
    dist = torch.cdist(base.reshape(3, -1), centres.reshape(3, -1))
    assert float(dist.min(dim=1).values.max()) < 0.1
    ints = torch.tensor([[0], [1], [10], [11]])
    assert kmeans(ints, 2).dtype == torch.get_default_dtype()


def test_kmeans_objective_and_assignment_two_ways():
    g = torch.Generator().manual_seed(4)
    pts = torch.cat([torch.randn(80, 3, generator=g) + off for off in (0.0, 4.0, -4.0, 8.0)]).double()
    centres = kmeans(pts, 4, seed=0)
    # Brute-force nearest centre, one point at a time.
    brute = torch.tensor([min(range(4), key=lambda j: float(((p - centres[j]) ** 2).sum())) for p in pts])
    assert torch.equal(nearest_centre(pts, centres), brute)
    # Lloyd's fixed point: each centre is the mean of the points nearest to it.
    for j in range(4):
        assert torch.allclose(centres[j], pts[brute == j].mean(dim=0), atol=1e-12)
    # Objective no worse than k random data points as centres.
    inertia = _inertia(pts, centres)
    for s in range(10):
        pick = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(s))[:4]
        assert inertia <= _inertia(pts, pts[pick])


def test_kmeans_fewer_distinct_points_than_k():
    pts = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    centres = kmeans(pts, 3, seed=0)
    assert centres.shape == (3, 2)
    assert all(any(torch.equal(c, p) for p in pts) for c in centres)
    assert {tuple(c.tolist()) for c in centres} == {(0.0, 0.0), (1.0, 1.0)}


def test_kmeans_k_equals_n_returns_the_points_sorted():
    pts = torch.tensor([[3.0, 0.0], [1.0, 2.0], [1.0, -1.0]])
    assert torch.equal(kmeans(pts, 3), torch.tensor([[1.0, -1.0], [1.0, 2.0], [3.0, 0.0]]))


@pytest.mark.parametrize(
    "points, k, kwargs",
    [
        (torch.randn(5, 2), 6, {}),
        (torch.randn(5, 2), 0, {}),
        (torch.randn(5, 2), 2.5, {}),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [2.0, 2.0]]), 2, {}),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [2.0, 2.0]]), 2, {}),
        (torch.randn(5, 2), 2, {"iters": 0}),
        (torch.randn(5, 2), 2, {"tol": -1.0}),
        (torch.randn(5, 2), 2, {"tol": float("nan")}),
        (torch.randn(5, 2), 2, {"tol": "small"}),
        (torch.tensor(1.0), 1, {}),
    ],
)
def test_kmeans_errors(points, k, kwargs):
    with pytest.raises(ConfigError):
        kmeans(points, k, **kwargs)


def test_nearest_centre_errors():
    with pytest.raises(ConfigError):
        nearest_centre(torch.randn(4, 2), torch.randn(3, 3))
    with pytest.raises(ConfigError):
        nearest_centre(torch.randn(4, 2), torch.randn(0, 2))


# ------------------------------------------------------------------------ truncated schedule


@pytest.mark.parametrize(
    "t_start, steps, expected",
    [(10, 2, [10, 0]), (10, 1, [10]), (10, 3, [10, 5, 0]), (10, 4, [10, 7, 3, 0]), (3, 4, [3, 2, 1, 0]),
     (0, 1, [0]), (999, 5, [999, 749, 500, 250, 0])],
)
def test_truncated_timesteps(t_start, steps, expected):
    t = truncated_timesteps(t_start, steps)
    assert t.dtype == torch.int64 and t.tolist() == expected


def test_truncated_timesteps_strictly_decreasing():
    for t_start in range(0, 40):
        for steps in range(1, t_start + 2):
            t = truncated_timesteps(t_start, steps)
            assert int(t[0]) == t_start and (steps == 1 or int(t[-1]) == 0)
            assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("t_start, steps", [(10, 0), (-1, 1), (2, 4), (10, 2.5), (True, 1), ("10", 2)])
def test_truncated_timesteps_errors(t_start, steps):
    with pytest.raises(ConfigError):
        truncated_timesteps(t_start, steps)


def test_sigmas_truncated_against_hand_computation():
    ac = make_alphas_cumprod(1000, "scaled_linear")
    sig = sigmas_truncated(ac, 10, 2)
    assert sig.shape == (3,) and sig.dtype == torch.float64
    assert torch.equal(sig, torch.cat([sigmas_from_alphas_cumprod(ac)[[10, 0]], torch.zeros(1, dtype=torch.float64)]))
    # scaled_linear: beta_i = (sqrt(1e-4) + i / 999 * (sqrt(0.02) - sqrt(1e-4)))^2, abar_t = prod_{i<=t} (1 - beta_i).
    lo, hi = math.sqrt(1e-4), math.sqrt(0.02)
    abar, hand = 1.0, {}
    for i in range(11):
        abar *= 1.0 - (lo + i / 999 * (hi - lo)) ** 2
        hand[i] = math.sqrt((1.0 - abar) / abar)
    assert sig[0].item() == pytest.approx(hand[10], rel=1e-4)
    assert sig[1].item() == pytest.approx(hand[0], rel=1e-4)
    assert sig[2].item() == 0.0
    assert sigmas_truncated(ac, 10, 1).tolist() == pytest.approx([hand[10], 0.0], rel=1e-4)


def test_sigmas_truncated_errors():
    ac = make_alphas_cumprod(100, "scaled_linear")
    with pytest.raises(ConfigError):
        sigmas_truncated(ac, 100, 2)
    with pytest.raises(ConfigError):
        sigmas_truncated(ac, 10, 0)
    with pytest.raises(ConfigError):
        sigmas_truncated(ac[None], 10, 2)


# ---------------------------------------------------------------------------- anchored starts


class _Counting:
    def __init__(self, x0: torch.Tensor) -> None:
        self.x0, self.calls, self.sigmas = x0, 0, []

    def __call__(self, x, sigma, cond=None):
        assert x.shape == self.x0.shape and sigma.shape == (x.shape[0],)
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.x0.clone()


def test_ddim_from_anchored_start_takes_two_network_calls():
    anchors = _trajectory_anchors()  # (K=4, T=8, D=2)
    ac = make_alphas_cumprod(1000, "scaled_linear")
    sigmas = sigmas_truncated(ac, 10, 2)
    x = anchored_start(anchors, sigmas[0], batch=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 16)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    den = _Counting(target)
    out = sample_ddim(den, x, sigmas)
    assert den.calls == 2
    assert den.sigmas == pytest.approx(sigmas[:2].tolist())
    assert torch.equal(out, target)


def test_nearest_anchor_denoiser_returns_the_anchors_all_anchors_layout():
    anchors = _trajectory_anchors()
    flat = anchors.reshape(anchors.shape[0], -1)
    sigmas = sigmas_truncated(make_alphas_cumprod(1000, "scaled_linear"), 10, 2)

    def nearest(x, sigma, cond=None):
        return flat[nearest_centre(x.reshape(-1, x.shape[-1]), flat)].reshape(x.shape)

    x = anchored_start(anchors, sigmas[0], batch=5, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(nearest, x, sigmas)
    assert torch.equal(out, flat.expand(5, -1, -1))
    assert torch.equal(out.unflatten(-1, anchors.shape[1:]), anchors.expand(5, -1, -1, -1))


def test_nearest_anchor_denoiser_returns_the_anchors_per_row_layout():
    anchors = _trajectory_anchors()
    sigmas = sigmas_truncated(make_alphas_cumprod(1000, "scaled_linear"), 10, 2)
    index = torch.tensor([2, 0, 3, 3, 1])

    def nearest(x, sigma, cond=None):
        assert x.shape == (5, 8, 2)
        return anchors[nearest_centre(x, anchors)]

    x = anchored_start_rows(anchors, index, sigmas[0], generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 8, 2)
    out = sample_ddim(nearest, x, sigmas)
    assert torch.equal(out, anchors[index])


def test_discrete_denoiser_sees_the_truncated_training_steps():
    ac = make_alphas_cumprod(1000, "scaled_linear")
    seen = []

    def model(x_t, t, cond):
        seen.append(t.tolist())
        return torch.zeros_like(x_t)

    den = DiscreteEpsDenoiser(model, ac, clip_x0=None, prediction_type="sample")
    sigmas = sigmas_truncated(ac, 10, 2)
    x = anchored_start(_trajectory_anchors(), sigmas[0], batch=2, generator=torch.Generator().manual_seed(0))
    sample_ddim(den, x, sigmas)
    assert seen == [[10, 10], [0, 0]] and den.nfe == 2


@pytest.mark.parametrize("rows", [False, True])
def test_anchored_start_noise_level(rows):
    anchors = _trajectory_anchors()
    sigma = 0.05
    g = torch.Generator().manual_seed(0)
    if rows:
        index = torch.arange(4).repeat(1000)
        x = anchored_start_rows(anchors, index, sigma, generator=g)
        resid = x - anchors[index]
    else:
        x = anchored_start(anchors, sigma, batch=1000, generator=g)
        resid = x - anchors.reshape(4, -1)
    assert resid.numel() == 64_000
    assert float(resid.std()) == pytest.approx(sigma, rel=0.02)
    assert abs(float(resid.mean())) < 3 * sigma / math.sqrt(resid.numel())


def test_anchored_start_reproducible_and_per_row_sigma():
    anchors = _trajectory_anchors()
    a = anchored_start(anchors, 0.1, batch=2, generator=torch.Generator().manual_seed(7))
    b = anchored_start(anchors, torch.tensor(0.1), batch=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == anchors.dtype
    x = anchored_start(anchors, torch.tensor([0.0, 0.1]), batch=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x[0], anchors.reshape(4, -1)) and not torch.equal(x[1], anchors.reshape(4, -1))
    r = anchored_start_rows(anchors, torch.tensor([1, 2]), torch.tensor([0.1, 0.0]))
    assert torch.equal(r[1], anchors[2]) and not torch.equal(r[0], anchors[1])


@pytest.mark.parametrize(
    "anchors, sigma, batch",
    [
        (torch.randn(4), 0.1, 1),  # no trajectory dimension
        (torch.randn(0, 3), 0.1, 1),  # no anchors
        (torch.ones(4, 3, dtype=torch.int64), 0.1, 1),
        (torch.randn(4, 3), -0.1, 1),
        (torch.randn(4, 3), float("nan"), 1),
        (torch.randn(4, 3), torch.tensor([0.1, 0.2, 0.3]), 2),
        (torch.randn(4, 3), 0.1, 0),
        (torch.randn(4, 3), 0.1, 1.5),
    ],
)
def test_anchored_start_errors(anchors, sigma, batch):
    with pytest.raises(ConfigError):
        anchored_start(anchors, sigma, batch=batch)


@pytest.mark.parametrize(
    "index",
    [torch.tensor([0, 4]), torch.tensor([-1]), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]),
     torch.tensor([True]), torch.tensor([], dtype=torch.int64), [0, 1]],
)
def test_anchored_start_rows_errors(index):
    with pytest.raises(ConfigError):
        anchored_start_rows(torch.randn(4, 8, 2), index, 0.1)


def test_kmeans_reseeds_an_empty_cluster_at_the_farthest_point(monkeypatch):
    pts, true = _blobs(per=50)
    # An initialisation with one centre far from all data: its cluster is empty after the first assignment.
    monkeypatch.setattr(
        "rtdp.core.anchors._kmeans_pp",
        lambda x, k, generator: torch.stack([x[0], x[60], torch.tensor([100.0, -100.0], dtype=x.dtype)]),
    )
    centres = kmeans(pts, 3, seed=0)
    assert torch.allclose(centres, true[[0, 2, 1]], atol=0.15)
