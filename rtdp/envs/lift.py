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

from rtdp.errors import ActionError, ConfigError, ObservationError, require_package

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
            self._env.close()
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
            ActionError: the action has the wrong shape or non-finite values.
        """
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ActionError(f"Lift actions have shape ({ACTION_DIM},); got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ActionError(f"Lift action has non-finite values: {action}")
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


def _quat_mul(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Hamilton product of two ``(x, y, z, w)`` quaternions."""
    x1, y1, z1, w1 = q1
    x2, y2, z2, w2 = q2
    return np.array(
        [
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        ]
    )


def _quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Axis-angle vector (radians) of an ``(x, y, z, w)`` quaternion, angle in [0, pi]."""
    q = q / np.linalg.norm(q)
    if q[3] < 0:  # q and -q are the same rotation; take the short way round
        q = -q
    sin_half = np.linalg.norm(q[:3])
    if sin_half < 1e-12:
        return np.zeros(3)
    return q[:3] * (2.0 * np.arctan2(sin_half, q[3]) / sin_half)


def hold_action(obs: dict[str, np.ndarray]) -> np.ndarray:
    """The action that keeps the arm where it is: zero OSC_POSE deltas and gripper command 0.

    OSC_POSE actions are displacements from the current pose, so holding needs
    nothing from the observation; ``obs`` is taken for the common signature.

    Returns:
        ``(7,)`` float64 zeros.
    """
    return np.zeros(ACTION_DIM)


def _yaw(q: np.ndarray) -> float:
    """Heading (radians) of the body x axis of an ``(x, y, z, w)`` quaternion, projected on the table."""
    x, y, z, w = q
    return float(np.arctan2(2.0 * (x * y + z * w), 1.0 - 2.0 * (y * y + z * z)))


def _wrap(angle: float, period: float) -> float:
    """Map an angle to [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


class LiftExpert:
    """Scripted pick-and-lift for :class:`LiftEnv`.

    Every action is a clipped proportional step computed from the current
    observation; the phases switch on observable events so that a policy
    reading the same observations can tell which phase it is in:

    * ``approach``: gripper open; the hand moves to the cube, a hover height
      above it while more than 3 cm away horizontally, sinking as it closes
      in, at the grasp height (cube centre) once within 1 cm. Throughout, it
      turns to point straight down with its fingers square to the cube's
      faces (the cube looks the same after a 90 degree turn, so it never
      turns more than 45 degrees).
    * ``close``: once the hand is within ``grasp_tolerance`` of the grasp
      point, the gripper closes while the hand holds its place; it stays in
      this phase until the fingers stop moving.
    * ``lift``: fingers stopped on the cube (opening above ``empty_opening``):
      the hand rises with the gripper closed. Robosuite reports success when
      the cube is 4 cm up, and the env ends the episode.

    A grasp that closes on nothing, or a cube that leaves the hand, sends the
    expert back to ``approach`` with the gripper open.

    Per-episode variation (hover height, speed) comes from the expert's own
    generator, seeded from the env's episode seed, so demonstrations are
    reproducible.

    Args:
        env: a :class:`LiftEnv`, possibly wrapped (e.g. by ``gymnasium.make``).
        hover_range: range of the hover height above the cube centre, metres.
        gain_range: range of the proportional gain, action units per metre
            (one action unit is a 5 cm OSC_POSE goal offset).
        rot_gain: proportional gain on the orientation error, units per radian.
        grasp_tolerance: distance to the grasp point that starts closing, metres.
        empty_opening: finger opening below which the grasp is empty, metres.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        hover_range: tuple[float, float] = (0.04, 0.08),
        gain_range: tuple[float, float] = (8.0, 12.0),
        rot_gain: float = 3.0,
        grasp_tolerance: float = 0.01,
        empty_opening: float = 0.01,
    ) -> None:
        self.env = env
        self.hover_range = hover_range
        self.gain_range = gain_range
        self.rot_gain = rot_gain
        self.grasp_tolerance = grasp_tolerance
        self.empty_opening = empty_opening
        self.reset()

    def reset(self) -> None:
        """Draw this episode's hover height and speed; call after every ``env.reset``."""
        seed = getattr(self.env.unwrapped, "episode_seed", None)
        # a separate stream from the env's placement generator with the same seed
        rng = np.random.default_rng(None if seed is None else [seed, 1])
        self.hover = float(rng.uniform(*self.hover_range))
        self.gain = float(rng.uniform(*self.gain_range))
        self.phase = "approach"
        self._prev_opening: float | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Next action for an observation of :class:`LiftEnv`.

        Args:
            obs: dict with ``robot0_eef_quat`` (4,), ``robot0_gripper_qpos`` (2,)
                and ``object`` (10,).

        Returns:
            ``(7,)`` float32 action in [-1, 1].

        Raises:
            ObservationError: a key the expert reads is missing.
        """
        missing = [k for k in ("robot0_eef_quat", "robot0_gripper_qpos", "object") if k not in obs]
        if missing:
            raise ObservationError(f"LiftExpert needs observation keys {missing}; got {sorted(obs)}")
        cube_quat = np.asarray(obs["object"][3:7], dtype=np.float64)
        to_cube = np.asarray(obs["object"][7:10], dtype=np.float64)  # cube - hand
        eef_quat = np.asarray(obs["robot0_eef_quat"], dtype=np.float64)
        qpos = obs["robot0_gripper_qpos"]
        opening = float(qpos[0] - qpos[1])
        moving = self._prev_opening is None or abs(opening - self._prev_opening) > 5e-4
        self._prev_opening = opening
        near = float(np.linalg.norm(to_cube))

        if self.phase == "close" and not moving:
            self.phase = "lift" if opening > self.empty_opening else "approach"
        elif self.phase == "lift" and (near > 0.03 or opening < self.empty_opening):
            self.phase = "approach"  # dropped it
        elif self.phase == "approach" and near < self.grasp_tolerance and opening > 0.06:
            self.phase = "close"

        action = np.zeros(ACTION_DIM)
        if self.phase == "approach":
            # descend only once roughly above the cube, so fingers never sweep it
            horizontal = float(np.linalg.norm(to_cube[:2]))
            height = self.hover * float(np.clip(horizontal / 0.02 - 0.5, 0.0, 1.0))
            action[:3] = self.gain * (to_cube + np.array([0.0, 0.0, height]))
            action[6] = -1.0
        elif self.phase == "close":
            action[:3] = self.gain * to_cube
            action[6] = 1.0
        else:
            action[:2] = self.gain * to_cube[:2]
            action[2] = 1.0
            action[6] = 1.0
        action[3:6] = self.rot_gain * self._orientation_error(eef_quat, cube_quat)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _orientation_error(self, eef_quat: np.ndarray, cube_quat: np.ndarray) -> np.ndarray:
        """World-frame axis-angle from the hand's orientation to the grasp orientation, radians."""
        yaw = _yaw(eef_quat)
        # turn by at most 45 degrees to square the fingers with a cube face
        target_yaw = yaw + _wrap(_yaw(cube_quat) - yaw, np.pi / 2)
        # pointing straight down: a half turn about x, then the heading about z
        heading = np.array([0.0, 0.0, np.sin(target_yaw / 2), np.cos(target_yaw / 2)])
        target = _quat_mul(heading, np.array([1.0, 0.0, 0.0, 0.0]))
        conj = eef_quat * np.array([-1.0, -1.0, -1.0, 1.0])
        return _quat_to_rotvec(_quat_mul(target, conj))
