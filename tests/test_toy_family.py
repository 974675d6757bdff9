"""A policy family and a task added from outside rtdp: one file, one registration line each.

This file defines a 1-D reaching task (a gymnasium env and its scripted
expert) and a DDPM policy family with an MLP denoiser, registers them with
``register_task`` and ``register_family``, and runs ``rtdp collect``,
``train``, ``eval``, ``bench`` and ``control driver=sim`` on them through
the command line, without any project file naming either.
"""

from __future__ import annotations

import dataclasses
import json

import gymnasium
import numpy as np
import pytest
import torch
from torch import nn

from rtdp.envs import TaskSpec, register_task
from rtdp.policies.ddpm import DdpmConfig, DdpmPolicy
from rtdp.policies.registry import PolicyFamily, register_family


class ReachEnv(gymnasium.Env):
    """A point on a line moves towards a target: obs state = [position, target], action = velocity in [-1, 1]."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode: str | None = "rgb_array") -> None:
        self.observation_space = gymnasium.spaces.Dict(
            {"state": gymnasium.spaces.Box(-2.0, 2.0, (2,), dtype=np.float32)})
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self.render_mode = render_mode
        self.pos = self.target = 0.0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.array([self.pos, self.target], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self.pos, self.target = (float(v) for v in self.np_random.uniform(-1.0, 1.0, size=2))
        return self._obs(), {"is_success": False, "score": 0.0}

    def step(self, action):
        self.pos = float(np.clip(self.pos + 0.1 * float(np.clip(np.asarray(action).ravel()[0], -1, 1)), -2, 2))
        err = abs(self.pos - self.target)
        success = err < 0.05
        return self._obs(), -err, success, False, {"is_success": success, "score": float(max(0.0, 1.0 - err))}

    def render(self) -> np.ndarray:
        frame = np.zeros((16, 64, 3), dtype=np.uint8)
        frame[:, int((self.target + 2) * 15.75), 1] = 255
        frame[6:10, int((self.pos + 2) * 15.75), 0] = 255
        return frame


class ReachExpert:
    """Full speed towards the target, slowing in the last 0.1."""

    def __init__(self, env) -> None:
        self.env = env

    def reset(self) -> None:
        pass

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        pos, target = obs["state"]
        return np.clip([(target - pos) * 10.0], -1.0, 1.0).astype(np.float32)


def hold(obs: dict[str, np.ndarray]) -> np.ndarray:
    return np.zeros(1)


@dataclasses.dataclass(kw_only=True)
class MlpDiffusionConfig(DdpmConfig):
    """``DdpmConfig`` with an MLP denoiser.

    Attributes:
        hidden: width of the MLP's hidden layers.
    """

    hidden: int = 64


class MlpDiffusionPolicy(DdpmPolicy):
    """The DDPM family with an MLP over the flattened trajectory, the step and the observation."""

    model_type = "test_mlp_diffusion"
    config_class = MlpDiffusionConfig

    def _build_network(self, config: MlpDiffusionConfig) -> nn.Module:
        return _Mlp(config.horizon * config.action_dim, config.obs_feature_dim * config.n_obs_steps, config.hidden)


class _Mlp(nn.Module):
    def __init__(self, width: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width + cond_dim + 1, hidden), nn.Mish(), nn.Linear(hidden, width))

    def forward(self, sample: torch.Tensor, timestep, global_cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).expand(sample.shape[0])
        x = torch.cat([sample.flatten(1), global_cond, t[:, None] / 100.0], dim=1)
        return self.net(x).reshape(sample.shape)


register_task(TaskSpec(name="test_reach", env_id="rtdp_test/Reach-v0", lowdim_keys=("state",), action_dim=1,
                       max_steps=40, expert=f"{__name__}:ReachExpert", control_rate_hz=20.0,
                       hold_action=f"{__name__}:hold"), entry_point=f"{__name__}:ReachEnv")
register_family(PolicyFamily(name="test_mlp", policy_class=MlpDiffusionPolicy, bench_configs=("ddim-5",)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rtdp.cli import main

    root = tmp_path_factory.mktemp("toy")
    assert main(["collect", "task=test_reach", "episodes=6", f"out={root / 'd.zarr'}"]) == 0
    assert main(["train", "task=test_reach", "policy=test_mlp", "policy.hidden=32", "policy.num_train_timesteps=20",
                 "policy.num_inference_steps=20", f"data={root / 'd.zarr'}", f"out={root / 'run'}", "steps=30",
                 "batch_size=16", "eval_every=0", "checkpoint_every=30", "threads=1", "action_error_windows=0"]) == 0
    return root


def test_the_toy_family_and_task_are_on_the_command_line(trained):
    from rtdp.policies import load_policy

    policy = load_policy(trained / "run" / "checkpoint")
    assert type(policy) is MlpDiffusionPolicy and policy.config.hidden == 32
    assert policy.config.lowdim_shapes == {"state": (2,)} and policy.config.action_dim == 1
    meta = json.loads((trained / "run" / "checkpoint" / "config.json").read_text())
    assert meta["model_type"] == "test_mlp_diffusion"


def test_eval_bench_and_control_run_the_toy_family_on_the_toy_task(trained):
    from rtdp.cli import main

    ckpt = trained / "run" / "checkpoint"
    assert main(["eval", f"checkpoint={ckpt}", "episodes=2", "video=false", "latency_calls=2", "threads=1",
                 f"out={trained / 'eval'}", f"json={trained / 'eval.json'}"]) == 0
    ev = json.loads((trained / "eval.json").read_text())
    assert ev["task"] == "test_reach" and ev["episodes"] == 2 and ev["nfe_per_chunk"] == 20
    assert [e["seed"] for e in ev["per_episode"]] == [100000, 100001]

    assert main(["bench", f"checkpoint={ckpt}", "calls=2", "warmup=1", "episodes=2", "threads=1",
                 f"json={trained / 'bench.json'}"]) == 0
    bench = json.loads((trained / "bench.json").read_text())
    assert [r["name"] for r in bench["configs"]] == ["ddpm-100", "ddim-5"] or \
        [r["name"] for r in bench["configs"]] == ["ddim-5"]
    assert all(r["episodes"] == 2 for r in bench["configs"])

    assert main(["control", f"checkpoint={ckpt}", "driver=sim", "episodes=1", "worker=process", "threads=1",
                 "live=false", f"out={trained / 'control'}", f"json={trained / 'control.json'}"]) == 0
    ctl = json.loads((trained / "control.json").read_text())
    assert ctl["driver"] == "sim" and ctl["rate_hz"] == 20.0 and ctl["cycles"] > 0 and ctl["episodes"] == 1


def test_a_slow_worker_start_does_not_spend_the_first_episode(trained, monkeypatch):
    # the toy episode lasts 40 steps (2 s at 20 Hz); a worker that takes longer than that to warm up used to
    # leave the first episode already over (1 cycle) while the simulator held the robot
    import time

    from rtdp.cli import main
    from rtdp.controllers.workers import ThreadWorker

    warmup = ThreadWorker.warmup

    def slow_warmup(self, *args, **kwargs):
        time.sleep(2.5)
        return warmup(self, *args, **kwargs)

    monkeypatch.setattr(ThreadWorker, "warmup", slow_warmup)
    assert main(["control", f"checkpoint={trained / 'run' / 'checkpoint'}", "driver=sim", "episodes=1",
                 "worker=thread", "threads=1", "live=false", f"out={trained / 'control_slow'}",
                 f"json={trained / 'control_slow.json'}"]) == 0
    ep = json.loads((trained / "control_slow.json").read_text())["per_episode"][0]
    # the episode ran from its reset: to success, or to its 40-step limit
    assert ep["success"] or ep["cycles"] >= 30, ep  # a few steps pass between the reset and the first cycle
