"""robosuite Lift (Panda arm, OSC_POSE control) as a gymnasium env, and its scripted expert.

The observation is robomimic's low-dim Lift observation: end-effector position
and quaternion, gripper finger positions, and the 10-D object state (cube
position, cube quaternion, gripper-to-cube vector). Success is robosuite's own
check (cube centre more than 4 cm above the table top); episodes end on
success, as in robomimic's rollouts, or at the 400-step horizon that the
gymnasium registration enforces.

robosuite is imported when an environment is built, never at module import.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from rtdp.errors import ConfigError, require_package

#: Observation keys and sizes, in the order robomimic lists them for low-dim Lift.
OBS_DIMS: dict[str, int] = {
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_gripper_qpos": 2,
    "object": 10,
}
ACTION_DIM = 7
#: robosuite's logger; its import-time advice (private macro file, optional robot
#: packages) is noise for rtdp users, and it logs every controller load at INFO.
_ROBOSUITE_LOGGER = "robosuite_logs"


def default_config() -> dict[str, Any]:
    """Default keyword arguments of :class:`LiftEnv`, with the time steps made explicit.

    ``control_freq`` is the policy rate (20 Hz, robomimic's); robosuite's
    physics step is 2 ms, so every action is held for 25 physics steps.
    """
    return {
        "robot": "Panda",
        "control_freq": 20,
        "horizon": 400,
        "render_mode": "rgb_array",
        "render_camera": "agentview",
        "render_size": (256, 256),
        "model_seed": 0,
    }


@contextlib.contextmanager
def _quiet_robosuite_import() -> Iterator[None]:
    """Drop robosuite's warnings while it is first imported."""
    logger = logging.getLogger(_ROBOSUITE_LOGGER)

    def drop_below_error(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(drop_below_error)
    try:
        yield
    finally:
        logger.removeFilter(drop_below_error)
        logger.setLevel(logging.WARNING)


def _import_robosuite():
    with _quiet_robosuite_import():
        return require_package("robosuite", "sim", "rtdp/Lift-v0")


class LiftEnv(gymnasium.Env):
    """robosuite ``Lift`` with a Panda arm behind the gymnasium API.

    Action: ``(7,)`` in ``[-1, 1]``: OSC_POSE deltas of the end-effector
    position (x 0.05 m) and axis-angle orientation (x 0.5 rad) in the robot
    base frame, then the gripper command (-1 opens, +1 closes). Actions are
    clipped to the box.

    Observation: a dict of float32 vectors, see :data:`OBS_DIMS`.

    ``info`` on every step: ``is_success`` (robosuite's ``_check_success()``)
    and ``score`` (``float(is_success)``). ``terminated`` is True on success.

    Seeding: ``reset(seed=s)`` re-seeds the generator robosuite draws the cube
    placement and the arm's initial joint noise from, so the same seed gives
    the same initial state, independent of what the env did before. The
    simulation is reset in place (robosuite's ``hard_reset=False``): the
    model, including the cube's size (drawn once from ``model_seed``), is
    built once per env, which keeps resets cheap and keeps an offscreen
    render context valid across episodes.

    Rendering: ``render()`` returns an ``(H, W, 3)`` uint8 frame from
    ``render_camera``. The offscreen renderer is created on the first call,
    so an env that never renders never pays for one.

    Args:
        robot: robosuite robot name.
        control_freq: control rate in Hz.
        horizon: robosuite's own horizon; robosuite's ``done`` is ignored
            (gymnasium's ``TimeLimit`` ends episodes), this only sets the
            value robosuite reports.
        render_mode: ``"rgb_array"`` or None (``render()`` works either way).
        render_camera: MuJoCo camera name, e.g. ``"agentview"`` or ``"frontview"``.
        render_size: ``(height, width)`` of rendered frames.
        model_seed: seed of the generator used while building the model
            (the cube's size); per-episode randomness comes from ``reset``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        robot: str = "Panda",
        control_freq: int = 20,
        horizon: int = 400,
        render_mode: str | None = "rgb_array",
        render_camera: str = "agentview",
        render_size: tuple[int, int] = (256, 256),
        model_seed: int = 0,
    ) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"render_mode must be 'rgb_array' or None; got {render_mode!r}")
        if control_freq <= 0 or horizon <= 0:
            raise ConfigError(f"control_freq and horizon must be positive; got {control_freq} and {horizon}")
        if len(render_size) != 2 or min(render_size) <= 0:
            raise ConfigError(f"render_size must be (height, width) with positive sizes; got {render_size!r}")
        robosuite = _import_robosuite()
        from robosuite.controllers import load_part_controller_config
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        # robosuite 1.5 wraps a part controller (the arm's OSC_POSE) into a
        # composite controller config; this is the path robomimic takes for
        # its pre-1.5 datasets, so the action means the same thing.
        arm_config = load_part_controller_config(default_controller="OSC_POSE")
        controller_config = refactor_composite_controller_config(arm_config, robot, ["right"])
        self._env = robosuite.make(
            "Lift",
            robots=robot,
            controller_configs=controller_config,
            has_renderer=False,
            has_offscreen_renderer=False,
            use_camera_obs=False,
            use_object_obs=True,
            reward_shaping=False,
            control_freq=control_freq,
            horizon=horizon,
            ignore_done=True,
            hard_reset=False,
            seed=model_seed,
        )
        if render_camera not in self._env.sim.model.camera_names:
            raise ConfigError(
                f"unknown render_camera {render_camera!r}; cameras: {', '.join(self._env.sim.model.camera_names)}"
            )
        self.render_mode = render_mode
        self.render_camera = render_camera
        self.render_size = (int(render_size[0]), int(render_size[1]))
        self.control_freq = control_freq
        self.control_dt = 1.0 / control_freq
        self.sim_dt = float(self._env.model_timestep)
        self.metadata = {**self.metadata, "render_fps": control_freq}
        self._render_context = None
        self._episode_seed: int | None = None
        self.observation_space = spaces.Dict(
            {k: spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float32) for k, n in OBS_DIMS.items()}
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)

    @property
    def robosuite_env(self):
        """The wrapped robosuite ``Lift`` environment."""
        return self._env

    @property
    def episode_seed(self) -> int | None:
        """Integer that seeded this episode's robosuite generator (None before the first reset)."""
        return self._episode_seed

    @property
    def table_height(self) -> float:
        """Height of the table top in the world frame, metres."""
        return float(self._env.model.mujoco_arena.table_offset[2])

    def _observe(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "robot0_eef_pos": np.asarray(raw["robot0_eef_pos"], dtype=np.float32),
            "robot0_eef_quat": np.asarray(raw["robot0_eef_quat"], dtype=np.float32),
            "robot0_gripper_qpos": np.asarray(raw["robot0_gripper_qpos"], dtype=np.float32),
            # robosuite's object-state: cube_pos, cube_quat (xyzw), gripper_to_cube_pos
            "object": np.asarray(raw["object-state"], dtype=np.float32),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode.

        Args:
            seed: seeds the episode; None continues the env's generator.
            options: unused.

        Returns:
            ``(obs, info)`` with ``info["is_success"]`` and ``info["score"]``.
        """
        super().reset(seed=seed)
        # robosuite keeps the generator it was built with inside the env and
        # inside the placement sampler; both must be replaced, or placement
        # would follow the previous episodes instead of the seed.
        self._episode_seed = int(self.np_random.integers(2**63 - 1))
        rng = np.random.default_rng(self._episode_seed)
        self._env.rng = rng
        self._env.placement_initializer.rng = rng
        raw = self._env.reset()
        success = bool(self._env._check_success())
        return self._observe(raw), {"is_success": success, "score": float(success)}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply one action for one control period (1 / control_freq seconds).

        Args:
            action: ``(7,)`` OSC_POSE delta and gripper command, clipped to [-1, 1].

        Returns:
            ``(obs, reward, terminated, truncated, info)``; reward is robosuite's
            sparse reward (1 on success), ``terminated`` is True on success.

        Raises:
            ConfigError: the action has the wrong shape or non-finite values.
        """
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ConfigError(f"Lift actions have shape ({ACTION_DIM},); got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ConfigError(f"Lift action has non-finite values: {action}")
        raw, reward, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        success = bool(self._env._check_success())
        info = {"is_success": success, "score": float(success)}
        return self._observe(raw), float(reward), success, False, info

    def render(self) -> np.ndarray:
        """Render the scene from ``render_camera``.

        Returns:
            ``(H, W, 3)`` uint8 RGB frame.
        """
        if self._render_context is None:
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            # The context registers itself with the sim; robosuite only sets
            # these mesh groups when it owns the renderer: visual meshes on,
            # collision meshes off.
            self._render_context = MjRenderContextOffscreen(self._env.sim, device_id=-1)
            self._render_context.vopt.geomgroup[0] = 0
            self._render_context.vopt.geomgroup[1] = 1
        height, width = self.render_size
        frame = self._env.sim.render(width=width, height=height, camera_name=self.render_camera)
        # OpenGL reads rows bottom-up
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        """Free the simulation and the render context, if any."""
        if getattr(self, "_env", None) is not None:
            self._render_context = None
            self._env.close()
            self._env = None


class LiftExpert:
    """Scripted pick-and-lift for :class:`LiftEnv`: hover above the cube, descend, close, lift."""

    def __init__(self, env) -> None:
        self.env = env
