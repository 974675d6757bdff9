"""Goal-conditioned PushT (``pusht_goal``): a goal pose drawn per episode."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

import gymnasium  # noqa: E402

import rtdp.envs as envs  # noqa: E402
from rtdp.envs.pusht import GOAL_POSE, GOAL_RANGE, PushTEnv, block_keypoints  # noqa: E402
from rtdp.errors import ConfigError  # noqa: E402

AWAY = [20.0, 20.0]  # a pusher position clear of any goal T


def _goal(env, seed: int) -> np.ndarray:
    return env.reset(seed=seed)[1]["goal_pose"]


def test_registered_task_makes_a_random_goal_env():
    spec = envs.get_task("pusht_goal")
    assert spec.lowdim_keys == ("keypoint", "agent_pos", "goal_keypoint")
    env = envs.make(spec)
    assert env.spec.id == "rtdp/PushTGoal-v0" and env.spec.max_episode_steps == 300
    assert env.unwrapped.goal_mode == "random"
    assert type(envs.expert(env)).__name__ == "PushTExpert"
    # the gymnasium id alone gives the random-goal env, not the fixed one
    plain = gymnasium.make("rtdp/PushTGoal-v0")
    np.testing.assert_array_equal(_goal(plain, 3), _goal(env, 3))
    obs, _ = env.reset(seed=3)
    assert set(spec.lowdim_keys) <= set(obs) and env.observation_space.contains(obs)


def test_goal_is_deterministic_per_seed_and_differs_between_seeds():
    env = PushTEnv(goal_mode="random")
    goals = np.array([_goal(env, seed) for seed in range(20)])
    np.testing.assert_array_equal(_goal(env, 7), goals[7])
    assert len(np.unique(goals[:, 2])) == 20
    assert np.all(np.abs(goals[:, :2] - GOAL_POSE[:2]) <= GOAL_RANGE["position"])
    assert np.all((goals[:, 2] >= 0) & (goals[:, 2] < 2 * np.pi))
    # unseeded resets continue the stream: still a new goal each episode
    assert not np.array_equal(env.reset()[1]["goal_pose"], env.reset()[1]["goal_pose"])
    # the start state is gym_pusht's for the seed, as on the fixed-goal task
    fixed = PushTEnv()
    np.testing.assert_array_equal(env.reset(seed=11)[0]["state"], fixed.reset(seed=11)[0]["state"])


def test_goal_keypoint_is_the_block_keypoints_at_the_goal():
    env = PushTEnv(goal_mode="random")
    obs, info = env.reset(seed=4)
    assert obs["goal_keypoint"].shape == (9, 2) and obs["goal_keypoint"].dtype == np.float32
    np.testing.assert_allclose(obs["goal_keypoint"], block_keypoints(info["goal_pose"]), atol=1e-4)
    np.testing.assert_array_equal(env.goal_pose, info["goal_pose"])
    obs, *_, info = env.step(np.array(AWAY))
    np.testing.assert_allclose(obs["goal_keypoint"], block_keypoints(info["goal_pose"]), atol=1e-4)
    assert env.observation_space.contains(obs)


def test_coverage_is_measured_against_the_episode_goal():
    env = PushTEnv(goal_mode="random")
    # a seed whose goal is far from the fixed one (position or angle)
    seed = next(s for s in range(50) if np.linalg.norm(_goal(env, s)[:2] - GOAL_POSE[:2]) > 40.0)
    _, info = env.reset(seed=seed)
    goal = info["goal_pose"]
    env.set_state([*AWAY, *goal])  # set_state rebuilds the sim: the goal must survive it
    _, reward, terminated, _, info = env.step(np.array(AWAY))
    assert info["coverage"] == pytest.approx(1.0, abs=1e-6)
    assert info["is_success"] and terminated and reward == 1.0
    np.testing.assert_array_equal(info["goal_pose"], goal)

    env.reset(seed=seed, options={"reset_to_state": [*AWAY, *GOAL_POSE]})
    _, _, terminated, _, info = env.step(np.array(AWAY))
    assert info["coverage"] < 0.5 and not info["is_success"] and not terminated


def test_render_draws_the_episode_goal():
    # gym_pusht fills the goal T in light green (144, 238, 144)
    env = PushTEnv(goal_mode="random", render_size=512)
    env.reset(seed=0, options={"reset_to_state": [*AWAY, 450.0, 60.0, 0.0]})
    goal = env.goal_pose
    frame = env.render().astype(int)
    green = np.abs(frame - [144, 238, 144]).sum(-1) < 30
    centre = block_keypoints(goal).mean(0)  # inside the T's stem or bar for any pose
    drawn = np.argwhere(green)[:, ::-1].mean(0)  # x, y
    assert green.sum() > 1000
    assert np.linalg.norm(drawn - centre) < 25.0, (drawn, centre)


def test_fixed_mode_keeps_the_fixed_goal():
    env = envs.make("pusht")
    obs, info = env.reset(seed=0)
    assert "goal_keypoint" not in obs
    np.testing.assert_array_equal(info["goal_pose"], GOAL_POSE)
    np.testing.assert_array_equal(env.unwrapped.goal_pose, GOAL_POSE)
    with pytest.raises(ConfigError, match="goal_mode"):
        PushTEnv(goal_mode="moving")


def test_expert_pushes_to_the_episode_goal():
    env = envs.make("pusht_goal")
    expert = envs.expert(env)
    obs, info = env.reset(seed=100001)
    assert np.linalg.norm(info["goal_pose"][:2] - GOAL_POSE[:2]) > 15.0  # not the fixed goal
    expert.reset()
    best, length, done = 0.0, 0, False
    while not done:
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        best, length, done = max(best, info["coverage"]), length + 1, terminated or truncated
    assert best >= 0.95 and length < 300
    np.testing.assert_allclose(obs["state"][2:4], info["goal_pose"][:2], atol=10.0)
