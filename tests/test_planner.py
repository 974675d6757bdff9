"""The driving planners: shapes, network calls, training, anchors, checkpoints and input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdp.data.dataset import compute_stats
from rtdp.errors import CheckpointError, ConfigError, DatasetError, ObservationError
from rtdp.models import load_model
from rtdp.policies.planner import (
    SCENE_SHAPES,
    AnchorPlanner,
    AnchorPlannerConfig,
    DiffusionPlanner,
    DiffusionPlannerConfig,
    PlannerConfig,
    RegressionPlanner,
    RegressionPlannerConfig,
)
from rtdp.policies.registry import build_policy, get_family

PLANNERS = (AnchorPlanner, DiffusionPlanner, RegressionPlanner)
TINY = dict(d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1)
K = 8


def _scenes(n: int, seed: int = 0, agents: int = 16, lanes: tuple[int, int] = (24, 16)):
    """Random scenes ``{key: (n, 1, *shape)}`` (the spec's counts by default) and plans (n, 1, 8, 2) in metres."""
    rng = np.random.default_rng(seed)
    agents = rng.normal(0, 20, (n, 1, agents, 9))
    agents[..., 8] = rng.random(agents.shape[:-1]) < 0.6
    agents[agents[..., 8] == 0] = 0.0  # invalid rows are all zero
    lanes = rng.normal(0, 30, (n, 1, *lanes, 4))
    lanes[..., 3] = rng.random(lanes.shape[:-1]) < 0.5
    lanes[lanes[..., 3] == 0] = 0.0
    obs = {"ego_state": rng.normal(20, 5, (n, 1, 4)), "ego_past": rng.normal(0, 10, (n, 1, 4, 3)),
           "command": np.eye(4)[rng.integers(0, 4, n)][:, None], "agents": agents, "lanes": lanes}
    # plans: forward at some speed, bending left or right
    speed, bend = rng.uniform(5, 30, (n, 1, 1)), rng.normal(0, 0.05, (n, 1, 1))
    t = np.arange(1, 9)[None, None] * 0.5
    action = np.stack([speed * t, bend * (speed * t) ** 2], -1)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in obs.items()}, torch.tensor(action, dtype=torch.float32)


def _arrays(obs, action) -> dict[str, np.ndarray]:
    out = {k: v[:, 0].numpy() for k, v in obs.items()}
    out["action"] = action[:, 0].numpy()
    return out


def _planner(cls, n: int = 64, **kw):
    torch.manual_seed(0)
    extra = {"num_anchors": K} if cls is AnchorPlanner else {}
    planner = cls(cls.config_class(**{**TINY, **extra, **kw}))
    arrays = _arrays(*_scenes(n, seed=1))
    planner.set_normalizer(compute_stats(arrays))
    if cls is AnchorPlanner:
        planner.from_data(arrays, seed=0)
    return planner.eval()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cls", PLANNERS)
def test_plan_shapes(cls):
    planner = _planner(cls)
    obs, _ = _scenes(3)
    res = planner.plan(obs, generator=_gen())
    assert res.plan.shape == (3, 8, 2) and bool(torch.isfinite(res.plan).all())
    assert torch.equal(planner.predict_action_chunk(obs, generator=_gen()), res.plan)
    if cls is AnchorPlanner:
        assert res.candidates.shape == (3, K, 8, 2) and res.scores.shape == (3, K)
        assert torch.equal(res.plan, res.candidates[torch.arange(3), res.scores.argmax(1)])
    elif cls is DiffusionPlanner:
        assert res.candidates.shape == (3, 1, 8, 2) and res.scores is None
        many = planner.plan(obs, generator=_gen(), n_candidates=5)
        assert many.candidates.shape == (3, 5, 8, 2) and torch.equal(many.plan, many.candidates[:, 0])
        assert not torch.allclose(many.candidates[:, 0], many.candidates[:, 1])
    else:
        assert res.candidates is None and res.scores is None
    if cls is not DiffusionPlanner:  # their candidates are the K anchors (or none), whatever n_candidates says
        again = planner.plan(obs, generator=_gen(), n_candidates=5)
        assert torch.equal(again.plan, res.plan) and (again.candidates is None) == (res.candidates is None)


def test_shared_cascade_reuses_one_stage():
    shared, separate = (_planner(AnchorPlanner, decoder_layers=2, cascade_shared=s) for s in (True, False))
    assert len(shared.decoder.stages) == 1 and len(separate.decoder.stages) == 2
    res = shared.plan(_scenes(2)[0], generator=_gen())
    assert res.plan.shape == (2, 8, 2) and res.nfe == 2 and bool(torch.isfinite(res.scores).all())


@pytest.mark.parametrize("cls, steps, calls", [
    (AnchorPlanner, 2, 2), (AnchorPlanner, 1, 1), (DiffusionPlanner, None, 20), (DiffusionPlanner, 2, 2),
    (RegressionPlanner, None, 1)])
def test_network_calls_per_plan(cls, steps, calls, monkeypatch):
    planner = _planner(cls)
    count = []
    forward = planner.decoder.forward

    def counted(*args, **kwargs):
        count.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(planner.decoder, "forward", counted)
    res = planner.plan(_scenes(2)[0], steps=steps, generator=_gen(), n_candidates=3 if cls is DiffusionPlanner else None)
    assert len(count) == calls == res.nfe


@pytest.mark.parametrize("cls", PLANNERS)
def test_loss_is_finite_and_falls_on_a_fixed_batch(cls):
    planner = _planner(cls).train()
    obs, action = _scenes(16, seed=2)
    batch = {"obs": obs, "action": action}
    opt = torch.optim.Adam(planner.parameters(), lr=1e-3)
    losses = []
    for _ in range(80):  # the anchors start near the targets (residual head): the fall takes a while
        loss = planner.compute_loss(batch)
        assert loss.ndim == 0 and bool(torch.isfinite(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    assert np.isfinite(planner.plan_error(batch)) and planner.plan_error(batch) == planner.plan_error(batch)


def test_anchors_from_data_are_reproducible_for_a_seed():
    arrays = _arrays(*_scenes(64, seed=1))  # the data the normaliser saw
    a, b = _planner(AnchorPlanner), _planner(AnchorPlanner)
    metres = a.from_data(arrays, seed=5)
    b.from_data(arrays, seed=5)
    assert torch.equal(a.anchors, b.anchors) and metres.shape == (K, 8, 2)
    assert torch.equal(a.anchor_trajectories(), metres)
    assert float(a.anchors.abs().max()) <= 1.0 + 1e-5  # normalised units
    assert torch.allclose(a.normalizer.unnormalize("action", a.anchors.view(K, 8, 2)), metres)
    with pytest.raises(DatasetError, match="num_anchors"):
        a.from_data({"action": arrays["action"][: K - 1]}, seed=0)


@pytest.mark.parametrize("cls", PLANNERS)
def test_checkpoint_round_trip_gives_identical_plans(cls, tmp_path):
    planner = _planner(cls)
    obs, _ = _scenes(2)
    loaded = load_model(planner.save_pretrained(tmp_path / "ckpt"))
    assert type(loaded) is cls and loaded.config == planner.config
    assert torch.equal(loaded.plan(obs, generator=_gen(4)).plan, planner.plan(obs, generator=_gen(4)).plan)


def test_checkpoint_with_anchors_of_another_k_is_refused(tmp_path):
    path = _planner(AnchorPlanner).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["num_anchors"] = K + 2
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"anchors .*K = {K}.*K = {K + 2}"):
        load_model(path)


def test_bad_observations_and_batches_raise_typed_errors():
    planner = _planner(AnchorPlanner)
    obs, action = _scenes(2)
    with pytest.raises(ObservationError, match="'lanes' is missing"):
        planner.plan({k: v for k, v in obs.items() if k != "lanes"})
    with pytest.raises(ObservationError, match=r"'agents' must have shape \(2, 1, 16, 9\)"):
        planner.plan({**obs, "agents": obs["agents"][:, :, :8]})
    with pytest.raises(ObservationError, match="'ego_past' must have shape"):
        planner.plan({**obs, "ego_past": obs["ego_past"][:, 0]})
    bad = obs["ego_state"].clone()
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ObservationError, match="'ego_state' contains NaN"):
        planner.plan({**obs, "ego_state": bad})
    with pytest.raises(DatasetError, match="'obs' and 'action'"):
        planner.compute_loss({"obs": obs})
    with pytest.raises(DatasetError, match=r"batch\['action'\] must have shape"):
        planner.compute_loss({"obs": obs, "action": action[:, 0]})
    with pytest.raises(DatasetError, match="batch\\['obs'\\]: observation 'command'"):
        planner.compute_loss({"obs": {**obs, "command": obs["command"][:1]}, "action": action})
    with pytest.raises(ConfigError, match="steps must be an int in 1..11"):
        planner.plan(obs, steps=12)


def test_padding_is_masked():
    planner = _planner(AnchorPlanner)
    obs, _ = _scenes(2)
    ref = planner.plan(obs, generator=_gen()).plan
    moved = {k: v.clone() for k, v in obs.items()}
    moved["agents"][moved["agents"][..., 8] == 0] = 7.0  # invalid rows: any values
    moved["agents"][..., 8] *= (obs["agents"][..., 8] > 0)  # ... keeping valid == 0
    no_lane = moved["lanes"][..., 3].sum(-1) == 0
    moved["lanes"][no_lane] = -3.0
    moved["lanes"][..., 3][no_lane] = 0.0
    assert torch.allclose(planner.plan(moved, generator=_gen()).plan, ref, atol=1e-5)
    empty = {**obs, "agents": torch.zeros_like(obs["agents"]), "lanes": torch.zeros_like(obs["lanes"])}
    assert bool(torch.isfinite(planner.plan(empty, generator=_gen()).plan).all())


def test_other_agent_and_lane_counts():
    obs, action = _scenes(8, agents=8, lanes=(48, 20))
    shapes = {k: tuple(v.shape[2:]) for k, v in obs.items()}
    planner = DiffusionPlanner(DiffusionPlannerConfig(**TINY, lowdim_shapes=shapes))
    planner.set_normalizer(compute_stats(_arrays(obs, action)))
    assert planner.plan(obs, steps=2).plan.shape == (8, 8, 2)
    with pytest.raises(ObservationError, match=r"'lanes' must have shape \(8, 1, 48, 20, 4\)"):
        planner.plan({**obs, "lanes": _scenes(8)[0]["lanes"]})


def test_unset_normaliser_or_anchors_refuse_to_plan():
    obs, _ = _scenes(1)
    with pytest.raises(ConfigError, match="normaliser statistics are not set"):
        RegressionPlanner(RegressionPlannerConfig(**TINY)).plan(obs)
    planner = AnchorPlanner(AnchorPlannerConfig(**TINY, num_anchors=K))
    planner.set_normalizer(compute_stats(_arrays(*_scenes(16))))
    with pytest.raises(ConfigError, match="anchors are not set"):
        planner.plan(obs)


def test_config_validation():
    with pytest.raises(ConfigError, match="image_shapes must be empty"):
        AnchorPlannerConfig(image_shapes={"cam": (96, 96, 3)})
    with pytest.raises(ConfigError, match="action_dim must be 2 .*got 3"):
        DiffusionPlannerConfig(action_dim=3)
    with pytest.raises(ConfigError, match="horizon must be 1"):
        PlannerConfig(horizon=16)
    with pytest.raises(ConfigError, match="trunc_step must be an int in 0..49"):
        AnchorPlannerConfig(trunc_step=50)
    with pytest.raises(ConfigError, match="num_inference_steps must be an int in 1..11"):
        AnchorPlannerConfig(num_inference_steps=12)
    with pytest.raises(ConfigError, match="num_inference_steps must be an int in 1..1"):
        RegressionPlannerConfig(num_inference_steps=2)
    with pytest.raises(ConfigError, match="d_model must be an even multiple of n_heads"):
        PlannerConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="lowdim_shapes must have the keys"):
        PlannerConfig(lowdim_shapes={"ego_state": (4,)})
    with pytest.raises(ConfigError, match=r"lowdim_shapes\['agents'\] must be \(A, 9\)"):
        PlannerConfig(lowdim_shapes={**SCENE_SHAPES, "agents": (16, 7)})


def test_families_build_from_the_command_line():
    shapes = {k: tuple(v.shape[2:]) for k, v in _scenes(1)[0].items()}
    stats = compute_stats(_arrays(*_scenes(32)))
    for name, cls in (("anchor", AnchorPlanner), ("diffusion_plan", DiffusionPlanner), ("regression", RegressionPlanner)):
        family = get_family(name)
        assert not {"lowdim_shapes", "image_shapes", "action_dim", "horizon"} & set(family.fields())
        assert all(family.cli_help().values()), family.cli_help()
        node = {**family.cli_defaults(), "d_model": 32, "encoder_layers": 1}
        planner = build_policy(name, node, lowdim_shapes=shapes, image_shapes={}, action_dim=2, stats=stats)
        assert type(planner) is cls and planner.size_label() == "d32 enc1 dec2"
        assert family.default_sampler(planner) in family.settings and not family.core_samplers
    assert "num_train_timesteps" not in get_family("regression").fields()
    assert {"num_anchors", "trunc_step", "train_trunc", "cascade_shared"} <= set(get_family("anchor").fields())


def test_default_anchor_planner_plans_one_scene():
    planner = _planner(AnchorPlanner, num_anchors=20, d_model=128, encoder_layers=2, decoder_layers=2)
    res = planner.plan(_scenes(1)[0], generator=_gen())
    assert planner.config == AnchorPlannerConfig() and res.plan.shape == (1, 8, 2) and res.nfe == 2
