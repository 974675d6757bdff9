"""Every registered task: creates, resets deterministically, steps without NaN."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from rtdp.envs import TASKS, TaskSpec, get_task, make
from rtdp.errors import ConfigError, UnknownNameError

NEEDS = {"lift": "robosuite"}
#: the observation key that says where each task's robot is
MOVING = {"highway": "ego_state"}  # observed in the vehicle's own frame; [0] is its speed
ROBOT_POS = {"pusht": "agent_pos", "pusht_image": "agent_pos", "pusht_goal": "agent_pos", "lift": "robot0_eef_pos"}


def _skip_if_missing(name: str) -> None:
    module = NEEDS.get(name)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (extra 'sim')")


def _flat(obs: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for _, v in sorted(obs.items())])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_env_creates_resets_deterministically_and_steps(name: str) -> None:
    _skip_if_missing(name)
    spec = get_task(name)
    env = make(name)
    try:
        obs_a, _ = env.reset(seed=123)
        obs_b, _ = env.reset(seed=123)
        obs_c, _ = env.reset(seed=124)
        assert set(spec.lowdim_keys + spec.image_keys) <= set(obs_a)
        np.testing.assert_array_equal(_flat(obs_a), _flat(obs_b))
        assert not np.array_equal(_flat(obs_a), _flat(obs_c)), "different seeds gave the same initial state"
        assert env.observation_space.contains(obs_a)
        rng = np.random.default_rng(0)
        env.reset(seed=5)
        for _ in range(10):
            action = env.action_space.sample() if rng.random() < 0.5 else np.asarray(env.action_space.sample())
            obs, reward, terminated, truncated, info = env.step(action)
            assert np.all(np.isfinite(_flat(obs)))
            assert np.isfinite(reward)
            assert "is_success" in info and "score" in info
            assert 0.0 <= float(info["score"]) <= 1.0
            if terminated or truncated:
                break
        for key in spec.image_keys:
            assert obs[key].dtype == np.uint8 and obs[key].ndim == 3
        # the spec's control rate is the environment's own (one step per control period)
        assert env.unwrapped.metadata["render_fps"] == spec.control_rate_hz
        if name in MOVING:
            # a vehicle cannot stand still in its own frame: holding brakes it gently, random commands do not
            start, _ = env.reset(seed=7)
            obs = start
            for _ in range(5):
                obs, *_ = env.step(spec.hold(obs).astype(np.float32))
            dv = float(obs[MOVING[name]][0] - start[MOVING[name]][0])
            assert -2.0 < dv < -0.2, dv
            return
        # the held action keeps the robot where it is; random actions from the same start move it
        key = ROBOT_POS[name]
        start, _ = env.reset(seed=7)
        obs = start
        for _ in range(5):
            obs, *_ = env.step(spec.hold(obs).astype(np.float32))
        held = float(np.abs(obs[key] - start[key]).max())
        obs = env.reset(seed=7)[0]
        env.action_space.seed(0)
        for _ in range(5):
            obs, *_ = env.step(env.action_space.sample())
        moved = float(np.abs(obs[key] - start[key]).max())
        scale = 1.0 if name.startswith("pusht") else 0.01  # pixels; metres
        assert held < 0.1 * scale < scale < moved, (held, moved)
    finally:
        env.close()


def test_unknown_task_is_a_typed_error_listing_known_tasks() -> None:
    with pytest.raises(UnknownNameError, match="pusht"):
        get_task("pushT")


def test_seeds_are_the_listed_eval_seeds_then_continue_consecutively() -> None:
    task = get_task("pusht")
    assert task.seeds(3) == [100000, 100001, 100002]
    assert task.seeds(50) == list(task.eval_seeds)
    many = task.seeds(200)
    assert many[:50] == list(task.eval_seeds) and many[-1] == 100199 and len(set(many)) == 200


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registered_expert_and_hold_action_name_the_module_that_defines_them(name: str) -> None:
    spec = get_task(name)
    for ref in (spec.expert, spec.hold_action):
        module, attr = ref.split(":")
        obj = getattr(importlib.import_module(module), attr)
        assert obj.__module__ == module, f"{ref} is defined in {obj.__module__}, not {module}"


def test_registry_imports_no_simulator_and_pusht_does_not_import_its_expert() -> None:
    code = (
        "import sys, rtdp.envs as e\n"
        "heavy = ('gym_pusht', 'pymunk', 'pygame', 'robosuite', 'mujoco', 'rtdp.envs.pusht', 'rtdp.envs.lift')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
        "e.get_task('pusht').control_rate_hz, e.get_task('lift').video_fps\n"
        "import rtdp.envs.pusht\n"
        "print('rtdp.envs.pusht_expert' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out[0]
    assert out[1] == "False"  # the expert imports the env module, never the other way round


def test_task_spec_rates_and_held_actions() -> None:
    pusht, lift = get_task("pusht"), get_task("lift")
    assert (pusht.control_rate_hz, pusht.video_fps) == (10.0, 10.0)
    assert (lift.control_rate_hz, lift.video_fps) == (20.0, 20.0)
    obs = {"agent_pos": np.array([12.5, 300.0], dtype=np.float32)}
    held = pusht.hold(obs)
    np.testing.assert_array_equal(held, [12.5, 300.0])
    assert held.dtype == np.float64
    held[0] = -1.0
    assert obs["agent_pos"][0] == 12.5  # the held action is a copy, not a view of the observation
    np.testing.assert_array_equal(lift.hold({}), np.zeros(7))
    # video fps defaults to the control rate and can differ from it
    assert TaskSpec(name="t", env_id="x/T-v0", control_rate_hz=50.0).video_fps == 50.0
    assert TaskSpec(name="t", env_id="x/T-v0", control_rate_hz=50.0, video_fps=25).video_fps == 25
    # a callable works as well as a "module:function" name
    spec = TaskSpec(name="t", env_id="x/T-v0", action_dim=3, hold_action=lambda o: o["q"] * 2)
    np.testing.assert_array_equal(spec.hold({"q": np.array([1.0, 2.0, 3.0])}), [2.0, 4.0, 6.0])


def test_task_spec_errors_are_typed() -> None:
    with pytest.raises(ConfigError, match="has no hold_action"):
        TaskSpec(name="t", env_id="x/T-v0").hold({})
    with pytest.raises(ConfigError, match="cannot be loaded"):
        TaskSpec(name="t", env_id="x/T-v0", hold_action="rtdp.envs.pusht:no_such_function").hold({})
    with pytest.raises(ConfigError, match="expected \\(3,\\)"):
        TaskSpec(name="t", env_id="x/T-v0", action_dim=3, hold_action=lambda o: np.zeros(2)).hold({})
    with pytest.raises(ConfigError, match="module:function"):
        TaskSpec(name="t", env_id="x/T-v0", hold_action="rtdp.envs.pusht.hold_action")
    with pytest.raises(ConfigError, match="control_rate_hz"):
        TaskSpec(name="t", env_id="x/T-v0", control_rate_hz=0)
    with pytest.raises(ConfigError, match="video_fps"):
        TaskSpec(name="t", env_id="x/T-v0", video_fps=-1)
