"""rtdp/Lift-v0 (robosuite Lift, Panda, OSC_POSE) and its scripted expert."""

from __future__ import annotations

import numpy as np
import pytest

from rtdp.errors import ActionError

EVAL_SEED = 100000


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("robosuite")
    import rtdp.envs

    env = rtdp.envs.make("lift")
    yield env
    env.close()


def _rollout(env, seed: int, actions) -> list[dict[str, np.ndarray]]:
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for action in actions:
        obs, *_ = env.step(action)
        out.append(obs)
    return out


def _assert_same(traj_a, traj_b) -> None:
    for obs_a, obs_b in zip(traj_a, traj_b, strict=True):
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key], err_msg=key)


def test_registered_spec_matches_env(env):
    import rtdp.envs

    spec = rtdp.envs.get_task("lift")
    assert env.spec.max_episode_steps == 400
    assert env.action_space.shape == (spec.action_dim,)
    assert set(spec.lowdim_keys) == set(env.observation_space.spaces)
    # robosuite must not end episodes before gymnasium's TimeLimit
    assert env.unwrapped.robosuite_env.ignore_done
    assert env.unwrapped.robosuite_env.horizon >= spec.max_steps


def test_observations_shapes_dtypes_and_meaning(env):
    from rtdp.envs.lift import OBS_DIMS

    obs, info = env.reset(seed=0)
    assert info == {"is_success": False, "score": 0.0}
    # the cube starts on the table (centre about one half-size up), near the table's centre
    table = env.unwrapped.table_height
    assert table + 0.015 < obs["object"][2] < table + 0.04
    assert np.all(np.abs(obs["object"][:2]) < 0.05)
    for _ in range(3):
        assert set(obs) == set(OBS_DIMS)
        for key, dim in OBS_DIMS.items():
            assert obs[key].shape == (dim,) and obs[key].dtype == np.float32, key
            assert np.all(np.isfinite(obs[key])), key
        assert env.observation_space.contains(obs)
        obj = obs["object"]
        # object = cube position, cube quaternion, cube minus gripper position
        np.testing.assert_allclose(obj[7:10], obj[0:3] - obs["robot0_eef_pos"], atol=1e-5)
        assert abs(np.linalg.norm(obj[3:7]) - 1.0) < 1e-5
        assert abs(np.linalg.norm(obs["robot0_eef_quat"]) - 1.0) < 1e-5
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert reward == 0.0 and not terminated and not truncated
        assert info == {"is_success": False, "score": 0.0}


def test_reset_is_deterministic_and_history_free(env):
    import rtdp.envs

    actions = [np.array([0.5, -0.3, -0.4, 0.1, 0.0, -0.2, -1.0])] * 10
    first = _rollout(env, 7, actions)
    _rollout(env, 8, actions[:3])  # something else in between
    again = _rollout(env, 7, actions)
    _assert_same(first, again)

    other = rtdp.envs.make("lift")
    try:
        _assert_same(first, _rollout(other, 7, actions))
    finally:
        other.close()

    a, _ = env.reset(seed=8)
    b, _ = env.reset(seed=9)
    assert np.abs(a["object"][:3] - b["object"][:3]).max() > 1e-3


def test_actions_are_clipped_and_validated(env):
    big = np.array([5.0, -7.0, 3.0, 0.0, 0.0, 9.0, 4.0])
    _assert_same(_rollout(env, 3, [big] * 3), _rollout(env, 3, [np.clip(big, -1, 1)] * 3))
    env.reset(seed=3)
    with pytest.raises(ActionError, match="shape"):
        env.step(np.zeros(6))
    with pytest.raises(ActionError, match="non-finite"):
        env.step(np.array([0, 0, 0, 0, 0, 0, np.nan]))


def test_expert_lifts_the_cube(env):
    import rtdp.envs

    expert = rtdp.envs.expert(env)
    actions, heights = [], []
    obs, _ = env.reset(seed=EVAL_SEED)
    expert.reset()
    for _ in range(env.spec.max_episode_steps):
        action = expert.act(obs)
        assert action.shape == (7,) and action.dtype == np.float32
        assert np.all(np.abs(action) <= 1.0)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        heights.append(obs["object"][2])
        if terminated or truncated:
            break
    assert terminated and info["is_success"] and info["score"] == 1.0 and reward > 0
    assert heights[-1] > env.unwrapped.table_height + 0.04  # robosuite's success margin
    assert len(actions) < 100
    # the episode is reproducible: same seed, same demonstration
    obs, _ = env.reset(seed=EVAL_SEED)
    expert.reset()
    for action in actions:
        np.testing.assert_array_equal(expert.act(obs), action)
        obs, *_ = env.step(action)


def test_expert_varies_between_episodes(env):
    from rtdp.envs.lift import LiftExpert

    expert = LiftExpert(env)
    drawn = set()
    for seed in (1, 2, 3):
        env.reset(seed=seed)
        expert.reset()
        drawn.add((expert.hover, expert.gain))
    assert len(drawn) == 3


def test_no_renderer_until_render(env):
    env.reset(seed=0)
    assert env.unwrapped.robosuite_env.sim._render_context_offscreen is None


@pytest.mark.sim
def test_render_frames_show_the_scene():
    pytest.importorskip("robosuite")
    import rtdp.envs

    env = rtdp.envs.make("lift")
    try:
        frames = []
        for seed in (1, 2):  # a second reset must keep the render context valid
            env.reset(seed=seed)
            frames.append(env.render())
        for frame in frames:
            assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
            assert frame.std() > 20  # not blank
            rgb = frame.astype(int)
            red = (rgb[..., 0] > rgb[..., 1] + 40) & (rgb[..., 0] > rgb[..., 2] + 40)
            white = rgb.min(axis=-1) > 200
            # the red cube and the white table top are in view, and the cube is small
            assert 20 < red.sum() < 2000 and white.mean() > 0.3
            # agentview looks along +x from the far side: the table fills the lower half
            assert white[128:].mean() > white[:64].mean()
        assert not np.array_equal(frames[0], frames[1])  # cube moved between seeds
    finally:
        env.close()


def test_quaternion_helpers_match_scipy():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    from rtdp.envs.lift import _quat_mul, _quat_to_rotvec, _yaw

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rotation.random(random_state=rng), rotation.random(random_state=rng)
        np.testing.assert_allclose(
            _quat_to_rotvec(_quat_mul(a.as_quat(), b.as_quat())), (a * b).as_rotvec(), atol=1e-9
        )
        yaw = rng.uniform(-np.pi, np.pi)
        down = rotation.from_euler("z", yaw) * rotation.from_euler("x", np.pi)
        assert abs(_yaw(down.as_quat()) - yaw) < 1e-9
