"""Highway scenes: logging, determinism, the expert against the scorer, pictures, the plan tracker."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("highway_env")

from rtdp.controllers.plan_tracker import PlanTracker  # noqa: E402
from rtdp.envs.highway import OBS_KEYS, SCENE_KEYS, HighwayEnv, expert_episode  # noqa: E402
from rtdp.envs.highway_score import score_plans  # noqa: E402
from rtdp.errors import ConfigError  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def merge_scenes():
    env = HighwayEnv("merge")
    scenes = expert_episode(env, 100001)
    env.close()
    return scenes


def _batch(scenes):
    return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}


def test_scenes_have_the_documented_keys_and_shapes(merge_scenes):
    assert len(merge_scenes) >= 5
    for scene in merge_scenes:
        assert set(scene) == set(SCENE_KEYS)
        for key, shape in SCENE_KEYS.items():
            assert scene[key].shape == shape, key
            assert np.all(np.isfinite(scene[key])), key
    first = merge_scenes[0]
    # the ego frame: the ego drives forward along +x, its past lies behind it
    assert np.all(np.diff(first["action"][:, 0]) > 0)
    assert np.all(first["ego_past"][:, 0] < 0)
    # agents' logged futures start where the agents are now
    valid = first["agents"][:, 8] > 0
    assert valid.any()
    np.testing.assert_allclose(first["agent_future"][valid, 0, :2], first["agents"][valid, :2], atol=1e-4)


def test_scene_logging_is_deterministic_for_a_seed(merge_scenes):
    again = expert_episode(HighwayEnv("merge"), 100001)
    assert len(again) == len(merge_scenes)
    for a, b in zip(again, merge_scenes):
        for key in SCENE_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = expert_episode(HighwayEnv("merge"), 100002)
    assert not np.array_equal(other[0]["action"], merge_scenes[0]["action"])


def test_intersection_scenes_are_the_same_in_every_run():
    """Vehicles spawned at equal distances from the ego are ordered by a key of the episode, not by id(), whose
    order changes from run to run (it made scene logging nondeterministic)."""
    runs = [expert_episode(HighwayEnv("intersection"), 7) for _ in range(4)]
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(other, runs[0]):
            for key in SCENE_KEYS:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_an_episode_does_not_depend_on_the_episodes_driven_before_it():
    """highway-env's intersection changes IDMVehicle's class constants; a roundabout episode driven after one
    is the same as in a fresh process (collection workers drive episodes in any order)."""
    fresh = expert_episode(HighwayEnv("mixed"), 100002)
    env = HighwayEnv("mixed")
    expert_episode(env, 100003)  # an intersection
    after = expert_episode(env, 100002)
    assert len(after) == len(fresh)
    for a, b in zip(after, fresh):
        for key in SCENE_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_experts_logged_future_scores_well_and_a_swerve_does_not(merge_scenes):
    batch = _batch(merge_scenes)
    expert = score_plans(batch["action"], batch)
    assert expert["nc"].min() == 1.0 and expert["dac"].min() == 1.0
    assert expert["pdms"].mean() >= 0.85
    swerve = batch["action"].copy()
    swerve[:, :, 1] += np.linspace(2, 30, 8)  # across every lane and off the road to the left
    assert score_plans(swerve, batch)["dac"].max() == 0.0


def test_environment_observation_matches_the_scene_inputs():
    env = HighwayEnv("highway")
    obs, info = env.reset(seed=4)
    assert set(obs) == set(OBS_KEYS)
    assert info["scenario"] == "highway" and info["is_success"]
    obs, progress, terminated, truncated, info = env.step(np.array([0.5, 0.0]))
    assert progress > 0 and not terminated
    with pytest.raises(ConfigError, match="acceleration"):
        env.step(np.array([np.nan, 0.0]))
    env.close()


def test_mixed_scenario_follows_the_seed_and_unknown_ones_are_refused():
    env = HighwayEnv("mixed")
    for seed, name in [(8, "highway"), (9, "merge"), (10, "roundabout"), (11, "intersection")]:
        env.reset(seed=seed)
        assert env.scenario == name
    env.close()
    with pytest.raises(ConfigError, match="scenario must be one of"):
        HighwayEnv("motorway")


def test_bev_picture_renders(merge_scenes, tmp_path):
    from PIL import Image

    from rtdp.workflows.drive import bev_picture

    scene = merge_scenes[0]
    cands = scene["action"][None] + np.linspace(-3, 3, 5)[:, None, None] * np.array([0.0, 1.0])
    path = bev_picture(scene, tmp_path / "bev.png", plan=scene["action"], candidates=cands, scores=np.arange(5.0),
                       anchors=cands, title="test")
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert img.shape[0] > 200 and img.std() > 10  # something was drawn


def test_tracker_steers_towards_the_plan_and_holds_its_speed():
    tracker = PlanTracker()
    straight = np.stack([np.arange(1, 9) * 10.0, np.zeros(8)], 1)  # 20 m/s straight ahead
    tracker.set_plan(straight, np.zeros(2), 0.0, t=0.0)
    acc, steer = tracker.command(np.zeros(2), 0.0, 15.0, t=0.0)
    assert acc > 0 and abs(steer) < 1e-9
    left = straight.copy()
    left[:, 1] = np.linspace(0.5, 4, 8)  # to the ego's left (+y); highway-env's frame has y down
    tracker.set_plan(left, np.zeros(2), 0.0, t=0.0)
    _, steer_left = tracker.command(np.zeros(2), 0.0, 20.0, t=0.0)
    assert steer_left < 0
    acc_fast, _ = tracker.command(np.zeros(2), 0.0, 30.0, t=0.0)
    assert acc_fast < 0


def test_tracker_follows_an_expert_plan_in_closed_loop():
    # the planner's loop with the expert's own logged future as the plan: it must stay on the road
    from rtdp.envs.highway import SIM_HZ

    env = HighwayEnv("highway", observe=False)
    env.reset(seed=12)
    tracker = PlanTracker()
    for k in range(80):
        if k % 5 == 0:
            plan = np.stack([np.arange(1, 9) * 0.5 * env.ego.speed, np.zeros(8)], 1)
            tracker.set_plan(plan, np.array(env.ego.position), float(env.ego.heading), k / SIM_HZ)
        _, _, terminated, _, info = env.step(tracker.command(np.array(env.ego.position), float(env.ego.heading),
                                                             float(env.ego.speed), k / SIM_HZ))
        if terminated:
            break
    assert not info["offroad"]
    assert info["progress_m"] > 100
    env.close()
