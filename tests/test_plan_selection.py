"""Choosing a driving plan among candidates by predicted PDM score (``rtdp.envs.plan_selection``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("highway_env")

from rtdp.cli import main  # noqa: E402
from rtdp.envs.highway import OBS_KEYS, HighwayEnv, expert_episode  # noqa: E402
from rtdp.envs.highway_score import score_plans  # noqa: E402
from rtdp.envs.plan_selection import constant_velocity_futures, predicted_scores, select  # noqa: E402
from tests.conftest import REPO  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def scenes():
    found = expert_episode(HighwayEnv("merge"), 100001)
    return {k: np.stack([s[k] for s in found]) for k in found[0]}


def test_constant_velocity_futures_move_each_agent_on_its_velocity():
    agents = np.zeros((1, 2, 9))
    agents[0, 0] = (10.0, -3.0, 1.0, 0.0, 20.0, 1.0, 5.0, 2.0, 1.0)  # 20 m/s ahead, drifting left
    future, valid = constant_velocity_futures(agents)
    assert future.shape == (1, 2, 41, 3) and valid.shape == (1, 2, 41)
    np.testing.assert_allclose(future[0, 0, -1, :2], (10.0 + 80.0, -3.0 + 4.0))  # t = 4 s
    np.testing.assert_allclose(future[0, 0, :, 2], 0.0)
    assert valid[0, 0].all() and not valid[0, 1].any()  # the empty row stays invalid


def test_selection_prefers_the_safe_candidate_over_the_planners_favourite(scenes):
    expert = scenes["action"]
    swerve = expert.copy()
    swerve[:, :, 1] += np.linspace(2, 30, 8)  # off the road to the left
    candidates = np.stack([swerve, expert], 1)  # (B, 2, 8, 2)
    favour_swerve = np.array([[5.0, 0.0]] * len(expert))
    idx, pdms = select(candidates, scenes, favour_swerve)
    assert (idx == 1).all()
    assert pdms[:, 0].max() == 0.0 and pdms[:, 1].min() > 0.5
    # against agents that keep their velocity the prediction is the scorer itself: computed two ways
    future, valid = constant_velocity_futures(scenes["agents"])
    direct = score_plans(expert, {**scenes, "agent_future": future, "agent_future_valid": valid})["pdms"]
    np.testing.assert_allclose(predicted_scores(expert[:, None], scenes)[:, 0], direct)


def test_equal_predictions_fall_to_the_planners_own_score(scenes):
    expert = scenes["action"][:3]
    candidates = np.stack([expert, expert], 1)
    idx, _ = select(candidates, {k: v[:3] for k, v in scenes.items()}, np.array([[0.0, 2.0]] * 3))
    assert (idx == 1).all()


def test_planners_choose_by_predicted_score_through_the_workflow(scenes):
    from rtdp.workflows.drive import load_planner, plan_batch

    planner = load_planner(REPO / "rtdp" / "assets" / "checkpoints" / "highway" / "checkpoint")
    rows = {k: v[:4] for k, v in scenes.items()}
    own = plan_batch(planner, rows, steps=2)
    chosen = plan_batch(planner, rows, steps=2, select="pdm")
    assert chosen["nfe"] == own["nfe"] == 2  # the choice costs no network call
    idx, _ = select(chosen["candidates"], rows, chosen["scores"])
    np.testing.assert_array_equal(chosen["plans"], chosen["candidates"][np.arange(4), idx])


def test_scene_inputs_are_the_observation_and_the_route():
    env = HighwayEnv("merge")
    env.reset(seed=100001)
    inputs, obs = env.scene_inputs(), env.observation()
    assert set(inputs) == set(OBS_KEYS) | {"route"}
    for k in OBS_KEYS:
        np.testing.assert_array_equal(inputs[k], obs[k])
    assert inputs["route"].shape[-1] == 2 and np.isfinite(inputs["route"]).all()
    env.close()


def test_select_is_a_typed_error_where_it_does_not_apply(capsys, scenes):
    from rtdp.errors import ConfigError
    from rtdp.workflows.drive import load_planner, plan_batch

    planner = load_planner(REPO / "rtdp" / "assets" / "checkpoints" / "highway" / "checkpoint")
    with pytest.raises(ConfigError, match="select='best'"):
        plan_batch(planner, {k: v[:1] for k, v in scenes.items()}, steps=2, select="best")
    assert main(["eval", "checkpoint=rtdp/assets/checkpoints/pusht/checkpoint", "select=pdm"]) == 2
    assert "task=highway" in capsys.readouterr().err
