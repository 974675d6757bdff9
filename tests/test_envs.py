"""Every registered task: creates, resets deterministically, steps without NaN."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from rtdp.envs import TASKS, get_task, make
from rtdp.errors import UnknownNameError

NEEDS = {"lift": "robosuite"}


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
