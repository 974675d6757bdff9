"""Gymnasium environments registered under the ``rtdp/`` namespace, and their experts.

``import rtdp.envs`` registers every task with gymnasium without importing any
simulator; the simulator loads when an environment is made. The registry is
open: another package can call :func:`register_task` with its own spec.

Every environment returns a dict observation whose keys match the arrays of
the zarr replay buffer (Diffusion Policy's names where it has them), reports
``info["is_success"]`` and ``info["score"]`` on every step, and renders RGB
frames with ``render()``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rtdp.errors import ConfigError, UnknownNameError


class Expert(Protocol):
    """A scripted demonstrator bound to one environment instance."""

    def reset(self) -> None:
        """Forget any plan; call after every ``env.reset``."""

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Return the next action, in the environment's action units."""


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs to know about one task.

    Attributes:
        name: task name used on the command line (``task=pusht``).
        env_id: gymnasium id, e.g. ``"rtdp/PushT-v0"``.
        env_kwargs: keyword arguments for ``gymnasium.make``.
        lowdim_keys: observation keys the policy consumes as vectors.
        image_keys: observation keys that are ``(H, W, 3)`` uint8 images.
        action_dim: size of one action.
        max_steps: episode length for evaluation.
        eval_seeds: the seeds evaluation runs on, in order.
        expert: ``"module:Class"`` of the scripted expert; built with the env.
        dataset_aliases: derived keys for datasets that lack them,
            ``{key: (source_key, slice_start, slice_stop)}``; e.g. PushT's
            ``agent_pos`` is ``state[:, 0:2]`` in Diffusion Policy's zarr.
        control_rate_hz: how often the policy sends an action (one ``env.step``
            per control period); a simulated robot advances at this rate.
        hold_action: the command that keeps the robot where it is, given the
            current observation: ``obj(obs) -> (action_dim,)`` in the action's
            units, as a callable or a ``"module:function"`` string that is
            imported only when first used (so the registry never loads a
            simulator). ``""`` if the task has none; :meth:`hold` then raises.
        video_fps: frame rate of rollout videos; None (the default) means
            ``control_rate_hz``, one frame per control step shown in real time.
        verbs: CLI verbs this task runs its own way, ``{verb: "module:function"}``
            taking the verb's config (a driving task is scored on logged scenes,
            not on episodes: ``rtdp collect/eval/bench task=highway``); the
            other verbs run the shared workflows.
    """

    name: str
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    lowdim_keys: tuple[str, ...] = ()
    image_keys: tuple[str, ...] = ()
    action_dim: int = 2
    max_steps: int = 300
    eval_seeds: tuple[int, ...] = tuple(range(100000, 100050))
    expert: str = ""
    dataset_aliases: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    control_rate_hz: float = 10.0
    hold_action: str | Callable[[dict[str, np.ndarray]], np.ndarray] = ""
    video_fps: float | None = None
    verbs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.control_rate_hz > 0:
            raise ConfigError(f"task {self.name!r}: control_rate_hz must be positive; got {self.control_rate_hz!r}")
        if self.video_fps is None:
            object.__setattr__(self, "video_fps", float(self.control_rate_hz))
        elif not self.video_fps > 0:
            raise ConfigError(f"task {self.name!r}: video_fps must be positive; got {self.video_fps!r}")
        if isinstance(self.hold_action, str) and self.hold_action and self.hold_action.count(":") != 1:
            raise ConfigError(
                f"task {self.name!r}: hold_action must be 'module:function' or a callable; got {self.hold_action!r}"
            )

    def handler(self, verb: str) -> Callable[[Any], Any] | None:
        """The function that runs ``rtdp <verb>`` for this task, or None for the shared workflow.

        Raises:
            ConfigError: the named function cannot be imported.
        """
        target = self.verbs.get(verb)
        if not target:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ConfigError(f"task {self.name!r}: rtdp {verb} handler {target!r} cannot be loaded: {exc}") from exc

    def hold(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The action that keeps the robot still at observation ``obs`` (see ``hold_action``).

        Returns:
            ``(action_dim,)`` float64 array.

        Raises:
            ConfigError: the task declares no ``hold_action``, or the named function does not exist.
        """
        fn = self.hold_action
        if not fn:
            raise ConfigError(
                f"task {self.name!r} has no hold_action, so nothing knows how to keep its robot still "
                "between commands; give its TaskSpec a hold_action ('module:function' or a callable)"
            )
        if isinstance(fn, str):
            module, attr = fn.split(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ModuleNotFoundError, AttributeError) as exc:
                raise ConfigError(f"task {self.name!r}: hold_action {self.hold_action!r} cannot be loaded: "
                                  f"{exc}") from exc
        action = np.asarray(fn(obs), dtype=np.float64)
        if action.shape != (self.action_dim,):
            raise ConfigError(f"task {self.name!r}: hold_action returned shape {action.shape}, "
                              f"expected ({self.action_dim},)")
        return action

    def seeds(self, n: int) -> list[int]:
        """The first ``n`` evaluation seeds; past the end of ``eval_seeds`` they continue consecutively.

        Diffusion Policy's protocol is 50 seeds from 100000; 200 episodes are seeds 100000..100199.
        """
        n = int(n)
        listed = [int(s) for s in self.eval_seeds[:n]]
        if not listed:
            return []
        return listed + list(range(listed[-1] + 1, listed[-1] + 1 + n - len(listed)))


TASKS: dict[str, TaskSpec] = {}


TASK_MODULES: dict[str, str] = {}


def register_task(spec: TaskSpec, entry_point: str | None = None, *, module: str | None = None) -> None:
    """Add a task to the registry and, if given, its env to gymnasium.

    ``module`` (default: the caller's module) is what a spawned process (the
    sim driver, collection workers) imports to have the task registered too.
    """
    import gymnasium

    TASKS[spec.name] = spec
    TASK_MODULES[spec.name] = module or sys._getframe(1).f_globals.get("__name__", "rtdp.envs")
    if entry_point is not None and spec.env_id not in gymnasium.registry:
        gymnasium.register(spec.env_id, entry_point=entry_point, max_episode_steps=spec.max_steps)


def get_task(name: str, module: str | None = None) -> TaskSpec:
    """Look a task up by name, with a typed error listing the known ones.

    ``module``: imported first when the task is not registered yet (a spawned
    process finding a task that another package registers; ``TASK_MODULES``).
    """
    if name not in TASKS and module:
        importlib.import_module(module)
    if name not in TASKS:
        raise UnknownNameError("task", name, list(TASKS))
    return TASKS[name]


def make(task: str | TaskSpec, **overrides: Any):
    """Create the gymnasium environment of a task (its simulator loads here)."""
    import gymnasium

    spec = get_task(task) if isinstance(task, str) else task
    kwargs = {**spec.env_kwargs, **overrides}
    return gymnasium.make(spec.env_id, **kwargs)


def expert(env) -> Expert:
    """Build the scripted expert for an environment made by :func:`make`."""
    env_id = env.spec.id if env.spec is not None else None
    for spec in TASKS.values():
        if spec.env_id == env_id and spec.expert:
            module, cls = spec.expert.split(":")
            return getattr(importlib.import_module(module), cls)(env)
    raise UnknownNameError("expert for env", str(env_id), [s.env_id for s in TASKS.values() if s.expert])


_PUSHT_KP = ("keypoint", "agent_pos")
# What every PushT variant shares: the agent, the expert, the 10 Hz control and Diffusion Policy's data layout.
_PUSHT = dict(action_dim=2, max_steps=300, expert="rtdp.envs.pusht_expert:PushTExpert",
              dataset_aliases={"agent_pos": ("state", 0, 2)}, control_rate_hz=10.0,
              hold_action="rtdp.envs.pusht:hold_action")

register_task(
    TaskSpec(
        name="pusht",
        env_id="rtdp/PushT-v0",
        env_kwargs={"obs_mode": "state"},
        lowdim_keys=_PUSHT_KP,
        **_PUSHT,
    ),
    entry_point="rtdp.envs.pusht:PushTEnv",
)
register_task(
    TaskSpec(
        name="pusht_image",
        env_id="rtdp/PushT-v0",
        env_kwargs={"obs_mode": "image"},
        lowdim_keys=("agent_pos",),
        image_keys=("img",),
        **_PUSHT,
    ),
)
# PushT with a goal pose drawn per episode (rtdp.envs.pusht.GOAL_RANGE); the
# goal is observed as keypoints, in the same representation as the block
register_task(
    TaskSpec(
        name="pusht_goal",
        env_id="rtdp/PushTGoal-v0",
        env_kwargs={"obs_mode": "state", "goal_mode": "random"},
        lowdim_keys=(*_PUSHT_KP, "goal_keypoint"),
        **_PUSHT,
    ),
    entry_point="rtdp.envs.pusht:PushTGoalEnv",
)
register_task(
    TaskSpec(
        name="lift",
        env_id="rtdp/Lift-v0",
        lowdim_keys=("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"),
        action_dim=7,
        max_steps=400,
        eval_seeds=tuple(range(100000, 100050)),
        expert="rtdp.envs.lift:LiftExpert",
        control_rate_hz=20.0,
        hold_action="rtdp.envs.lift:hold_action",
    ),
    entry_point="rtdp.envs.lift:LiftEnv",
)
# Driving scenes on highway-env (the ``drive`` extra): a planner is trained and scored on logged scenes
# (rtdp.workflows.drive), and drives the ego in closed loop through the same gymnasium environment.
register_task(
    TaskSpec(
        name="highway",
        env_id="rtdp/Highway-v0",
        env_kwargs={"scenario": "mixed"},
        lowdim_keys=("ego_state", "ego_past", "command", "agents", "lanes"),
        action_dim=2,
        max_steps=300,
        expert="rtdp.envs.highway:HighwayExpert",
        control_rate_hz=10.0,
        hold_action="rtdp.envs.highway:hold_action",
        verbs={"collect": "rtdp.workflows.drive:run_collect", "eval": "rtdp.workflows.drive:run_eval",
               "bench": "rtdp.workflows.drive:run_bench", "control": "rtdp.workflows.drive:run_control"},
    ),
    entry_point="rtdp.envs.highway:HighwayEnv",
)
