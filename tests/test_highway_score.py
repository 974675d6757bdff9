"""PDM score of highway plans: each term on hand-built scenes, SAT overlap and progress against references."""

from __future__ import annotations

import numpy as np
import pytest

from rtdp.envs.highway_score import (
    _SG, DT, EGO_LENGTH, EGO_WIDTH, SCENARIOS, TERMS, TrajectoryError, _to_10hz, boxes_overlap, score_plans, summarize,
)
from rtdp.envs.plan_simulation import simulate
from rtdp.errors import DatasetError, MissingKeyError

LIMIT = 14.0  # m/s: 56 m in 4 s, which keeps the ego's front on the 60 m long lanes
T10 = np.arange(41) * 0.1
T2 = np.arange(1, 9) * 0.5


def scene(agents=(), speed=LIMIT, route=None, action=None, scenario=0) -> dict[str, np.ndarray]:
    """A straight 3-lane road (lanes along x at y = -4, 0, 4, half width 2, points every 5 m from -15 to 60 m),
    a route along y = 0 and constant-velocity agents given as (x, y, vx, vy)."""
    lanes = np.zeros((24, 16, 4), np.float32)
    for i, y in enumerate((-4.0, 0.0, 4.0)):
        lanes[i, :, 0] = np.arange(-15.0, 61.0, 5.0)
        lanes[i, :, 1:] = (y, 2.0, 1.0)
    table = np.zeros((16, 9), np.float32)
    future = np.zeros((16, 41, 3), np.float32)
    valid = np.zeros((16, 41), np.float32)
    for i, (x, y, vx, vy) in enumerate(agents):
        table[i] = (x, y, 1.0, 0.0, vx, vy, EGO_LENGTH, EGO_WIDTH, 1.0)
        future[i] = np.stack([x + vx * T10, y + vy * T10, np.full(41, np.arctan2(vy, vx))], -1)
        valid[i] = 1.0
    if route is None:
        route = np.stack([np.arange(20) * 5.0, np.zeros(20)], -1)
    return {
        "ego_state": np.array([speed, 0.0, 0.0, LIMIT], np.float32),
        "ego_past": np.stack([speed * np.arange(-4, 0) * 0.5, np.zeros(4), np.zeros(4)], -1).astype(np.float32),
        "command": np.array([0, 1, 0, 0], np.float32),
        "agents": table, "lanes": lanes, "route": np.asarray(route, np.float32),
        "action": (const_plan(speed) if action is None else action).astype(np.float32),
        "agent_future": future, "agent_future_valid": valid,
        "scenario": np.array([scenario], np.float32),
    }


def batch(*scenes: dict) -> dict[str, np.ndarray]:
    return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}


def const_plan(speed=LIMIT, y=0.0) -> np.ndarray:
    return np.stack([speed * T2, np.full(8, y)], -1)


def score_one(plan, sc, tracked=False) -> dict[str, float]:
    """The terms of one plan; by default of the plan itself, so each term's definition is checked exactly."""
    out = score_plans(np.asarray(plan)[None], batch(sc), tracked=tracked)
    assert set(out) == {*TERMS, "progress", "ref_progress"}
    assert all(v.shape == (1,) and v.dtype == np.float64 for v in out.values())
    return {k: float(v[0]) for k, v in out.items()}


def test_constant_speed_on_an_empty_road_scores_one():
    s = score_one(const_plan(), scene())
    assert s == pytest.approx({"nc": 1, "dac": 1, "ttc": 1, "ep": 1, "comfort": 1, "pdms": 1,
                               "progress": 56.0, "ref_progress": 56.0})


def test_plan_with_headings_scores_the_same():
    plan = np.concatenate([const_plan(), np.zeros((8, 1))], -1)
    assert score_one(plan, scene())["pdms"] == pytest.approx(1.0)


def test_swerving_off_the_road_fails_dac():
    plan = const_plan()
    plan[:, 1] = np.linspace(1.25, 10.0, 8)
    s = score_one(plan, scene())
    assert s["dac"] == 0 and s["pdms"] == 0


def test_driving_into_a_slower_lead_is_an_at_fault_collision():
    s = score_one(const_plan(), scene(agents=[(20.0, 0.0, 5.0, 0.0)]))
    assert s["nc"] == 0 and s["pdms"] == 0


def test_hitting_a_stationary_vehicle_scores_half():
    s = score_one(const_plan(), scene(agents=[(30.0, 0.0, 0.0, 0.0)]))
    assert s["nc"] == 0.5 and s["ttc"] == 0


@pytest.mark.parametrize("ego_speed", [0.0, 2.0])
def test_a_faster_vehicle_from_behind_is_not_the_egos_fault(ego_speed):
    """Stopped: the ego cannot be at fault; slow: the agent's centre is behind the ego at first contact (and
    the logged agent then drives through the ego, which nuPlan does not count again)."""
    s = score_one(const_plan(ego_speed), scene(agents=[(-20.0, 0.0, ego_speed + 10.0, 0.0)], speed=ego_speed))
    assert s["nc"] == 1 and s["ttc"] == 1


def test_the_same_crossing_vehicle_ahead_is_at_fault():
    # an agent cutting across the ego's path 2 s ahead: a lateral contact with its centre ahead of the ego
    s = score_one(const_plan(), scene(agents=[(28.0, -20.0, 0.0, 10.0)]))
    assert s["nc"] == 0


def test_zigzag_is_uncomfortable_but_otherwise_perfect():
    plan = const_plan()
    plan[:, 1] = [2.0, 0.0] * 4
    s = score_one(plan, scene())
    assert s == pytest.approx({"nc": 1, "dac": 1, "ttc": 1, "ep": 1, "comfort": 0, "pdms": 10 / 12,
                               "progress": 56.0, "ref_progress": 56.0})


def test_harsh_braking_is_uncomfortable():
    t = np.minimum(T2, 1.0)  # from 14 m/s to rest in 1 s: -14 m/s²
    plan = np.stack([LIMIT * t - 7.0 * t**2, np.zeros(8)], -1)
    s = score_one(plan, scene())
    assert s["comfort"] == 0 and s["nc"] == s["dac"] == s["ttc"] == 1
    assert s["progress"] == pytest.approx(7.0) and s["ep"] == pytest.approx(7.0 / 56.0)


def test_standing_still_on_an_empty_road_makes_no_progress():
    s = score_one(np.zeros((8, 2)), scene())
    assert s["ep"] == 0 and s["progress"] == 0 and s["ref_progress"] == pytest.approx(56.0)


def test_closing_fast_on_a_lead_fails_ttc_without_a_collision():
    # centre gap 48 - 9 t stays above 5 m until 4.3 s; at 4 s a 0.9 s projection closes the 7 m bumper gap
    s = score_one(const_plan(), scene(agents=[(48.0, 0.0, 5.0, 0.0)]))
    assert s["nc"] == 1 and s["dac"] == 1 and s["ttc"] == 0
    assert s["ep"] == 1 and s["pdms"] == pytest.approx(7 / 12)


def test_reference_follows_the_lead_and_skips_an_unsafe_expert():
    lead = scene(agents=[(20.0, 0.0, 5.0, 0.0)])  # the expert's logged constant-speed plan runs into it
    s = score_one(const_plan(5.0), lead)
    assert s["nc"] == 1 and 5.0 < s["ref_progress"] < 56.0 and s["ep"] > 0.5


def test_batch_scores_equal_single_scores():
    cases = [(const_plan(), scene()), (const_plan(), scene(agents=[(30.0, 0.0, 0.0, 0.0)])),
             (np.zeros((8, 2)), scene()), (const_plan(5.0), scene(agents=[(20.0, 0.0, 5.0, 0.0)]))]
    for tracked in (False, True):
        together = score_plans(np.stack([p for p, _ in cases]), batch(*(s for _, s in cases)), tracked=tracked)
        for i, (p, s) in enumerate(cases):
            assert {k: v[i] for k, v in together.items()} == pytest.approx(score_one(p, s, tracked))


def test_tracking_a_constant_speed_plan_reproduces_it():
    assert score_one(const_plan(), scene(), tracked=True) == pytest.approx(score_one(const_plan(), scene()))
    ref = _to_10hz(const_plan()[None])
    poses, speed, accel = simulate(ref, np.array([LIMIT]), _SG[1], DT)
    assert np.abs(poses - ref).max() < 1e-9 and np.allclose(speed, LIMIT) and np.allclose(accel, 0)


def test_tracking_a_circle_stays_on_it():
    # a constant-curvature reference at constant speed, checked against the circle itself
    radius, speed = 60.0, 12.0
    angle = speed * T10 / radius
    ref = np.stack([radius * np.sin(angle), radius * (1 - np.cos(angle)), angle], -1)[None]
    states = simulate(ref, np.array([speed]), _SG[1], DT)[0]
    off_circle = np.abs(np.hypot(states[0, :, 0], states[0, :, 1] - radius) - radius)
    # the wheels start straight and the steering lags, so the vehicle first drifts outward, then comes back
    assert off_circle.max() < 1.0 and off_circle[-10:].max() < 0.3 and off_circle[-1] < 0.6 * off_circle.max()
    assert np.abs(states[0, -1, :2] - ref[0, -1, :2]).max() < 1.0


def test_tracking_smooths_jittery_poses_but_not_harsh_braking():
    jitter = const_plan()
    jitter[:, 1] = [0.3, -0.3] * 4  # poses 0.3 m either side: the plan is uncomfortable, a vehicle tracking it is not
    plain, tracked = score_one(jitter, scene()), score_one(jitter, scene(), tracked=True)
    assert plain["comfort"] == 0 and tracked == pytest.approx({**plain, "comfort": 1, "pdms": 1}, abs=0.2)
    assert tracked["pdms"] == 1 and tracked["progress"] == pytest.approx(56.0, abs=0.2)
    t = np.minimum(T2, 1.0)  # from 14 m/s to rest in 1 s: no tracker makes that comfortable
    brake = score_one(np.stack([LIMIT * t - 7.0 * t**2, np.zeros(8)], -1), scene(), tracked=True)
    assert brake["comfort"] == 0 and 7.0 < brake["progress"] < 20.0  # it stops, about 1 s later than asked


def test_sat_overlap_matches_shapely_on_random_boxes():
    geometry = pytest.importorskip("shapely.geometry")
    rng = np.random.default_rng(0)
    n = 400
    boxes = np.concatenate([rng.uniform(-4, 4, (n, 2, 2)), rng.uniform(-np.pi, np.pi, (n, 2, 1)),
                            rng.uniform(0.5, 6, (n, 2, 2))], -1)
    got = boxes_overlap(boxes[:, 0], boxes[:, 1])

    def polygon(b):
        c, s = np.cos(b[2]), np.sin(b[2])
        local = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * b[3:5] / 2
        return geometry.Polygon(local @ np.array([[c, s], [-s, c]]) + b[:2])

    want = np.array([polygon(a).intersection(polygon(b)).area > 1e-9 for a, b in boxes])
    assert 0.2 < want.mean() < 0.8  # both outcomes are exercised
    np.testing.assert_array_equal(got, want)


def test_sat_overlap_broadcasts_and_excludes_touching():
    a = np.array([0.0, 0.0, 0.0, 2.0, 2.0])
    b = np.array([[2.0, 0.0, 0.0, 2.0, 2.0], [1.9, 0.0, 0.0, 2.0, 2.0], [2.3, 0.0, np.pi / 4, 2.0, 2.0]])
    np.testing.assert_array_equal(boxes_overlap(a, b), [False, True, True])


def test_progress_on_a_bent_route_matches_a_hand_computation():
    route = [(5.0 * k, 0.0) for k in range(10)] + [(45.0, 5.0 * j) for j in range(1, 11)]
    plan = np.stack([np.linspace(5, 46, 8), np.linspace(0, 12, 8)], -1)
    # the last point (46, 12) is 1 m right of the vertical leg, 12 m up it: 45 + 12 m along the route
    assert score_one(plan, scene(route=route))["progress"] == pytest.approx(57.0)
    # a plan beyond the route's end still progresses, along the last segment's extension
    assert score_one(const_plan(), scene(route=[(2.0 * k, 0.0) for k in range(20)]))["progress"] == pytest.approx(56.0)


def test_summarize_means_overall_and_per_scenario():
    scores = {k: np.array([1.0, 0.0, 0.5]) for k in TERMS}
    out = summarize(scores, np.array([[0], [3], [0]], np.float32))
    assert out["scenes"] == 3 and out["pdms"] == pytest.approx(0.5)
    assert list(out["per_scenario"]) == ["highway", "intersection"]
    assert out["per_scenario"]["highway"] == {"scenes": 2, "pdms": 0.75, "nc": 0.75, "dac": 0.75, "ttc": 0.75,
                                              "ep": 0.75, "comfort": 0.75}
    assert all(type(v) is float for k, v in out.items() if k not in ("scenes", "per_scenario"))
    with pytest.raises(DatasetError, match="integer indices"):
        summarize(scores, np.array([0, 1, len(SCENARIOS)]))


@pytest.mark.parametrize("plans", [np.zeros((1, 8)), np.zeros((1, 7, 2)), np.zeros((1, 8, 4)), np.zeros((2, 8, 2))])
def test_wrong_plan_shape_is_a_trajectory_error(plans):
    with pytest.raises(TrajectoryError, match="plans"):
        score_plans(plans, batch(scene()))


def test_nan_plan_is_a_trajectory_error():
    plan = const_plan()
    plan[3, 0] = np.nan
    with pytest.raises(TrajectoryError, match=r"scenes \[1\].*NaN"):
        score_plans(np.stack([const_plan(), plan]), batch(scene(), scene()))
    assert issubclass(TrajectoryError, ValueError)


def test_scene_without_lanes_is_a_dataset_error_naming_it():
    empty = scene()
    empty["lanes"][:] = 0.0
    with pytest.raises(DatasetError, match="scene 1: no lanes in range"):
        score_plans(np.stack([const_plan()] * 2), batch(scene(), empty))


def test_missing_scene_key_is_a_missing_key_error():
    sc = batch(scene())
    del sc["route"]
    with pytest.raises(MissingKeyError, match="route"):
        score_plans(const_plan()[None], sc)


def test_savitzky_golay_operators_differentiate_quadratics_exactly():
    # the comfort terms' derivative operators, checked against the analytic derivatives of a quadratic
    from rtdp.envs import highway_score as H

    t = np.arange(H.N_STEPS) * H.DT
    y = 3.0 + 2.0 * t - 0.75 * t**2
    np.testing.assert_allclose(H._SG[0] @ y, y, atol=1e-9)
    np.testing.assert_allclose(H._SG[1] @ y, 2.0 - 1.5 * t, atol=1e-9)
    np.testing.assert_allclose(H._SG[2] @ y, np.full_like(t, -1.5), atol=1e-9)
    # noise is smoothed: the second derivative of a 1 cm jitter stays far below the comfort limits
    jitter = 0.01 * np.random.default_rng(0).standard_normal(H.N_STEPS)
    assert np.abs(H._SG[2] @ jitter).max() < 2.0
