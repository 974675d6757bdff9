"""PushT: push a T-shaped block onto a goal pose with a round pusher.

A thin layer over the ``gym_pusht`` simulator (pymunk, 100 Hz physics, 10 Hz
control) that gives it Diffusion Policy's observation names and metrics:

* ``agent_pos`` (2,): pusher centre, pixels.
* ``state`` (5,): ``[agent x, agent y, block x, block y, block angle mod 2π]``,
  Diffusion Policy's ``data/state``.
* ``keypoint`` (9, 2): Diffusion Policy's nine block keypoints, pixels, computed
  from the block pose exactly as its ``data/keypoint`` (see
  :data:`BLOCK_KEYPOINTS_LOCAL`).
* ``img`` (96, 96, 3) uint8, only with ``obs_mode="image"``.
* ``goal_keypoint`` (9, 2): the same nine keypoints placed at the episode's
  goal pose, only with ``goal_mode="random"``.

The goal is Diffusion Policy's fixed pose :data:`GOAL_POSE` by default. With
``goal_mode="random"`` (the ``pusht_goal`` task) every reset draws a new goal
from :data:`GOAL_RANGE`; coverage, score, success, ``info["goal_pose"]`` and the
goal outline drawn by :meth:`PushTEnv.render` all follow the episode's goal.

The action is the pusher's target position in pixels, ``[0, 512]²``; a PD
controller drives the kinematic pusher towards it. Every step reports
``info["coverage"]`` (area of block ∩ goal over goal area), ``info["score"]``
(``clip(coverage / 0.95, 0, 1)``, also the reward) and ``info["is_success"]``
(coverage ≥ 0.95, which also terminates the episode, as in Diffusion Policy).
The 300-step limit comes from the registration in :mod:`rtdp.envs`.

The scripted expert lives in :mod:`rtdp.envs.pusht_expert`, which imports this
module (never the other way round).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rtdp.errors import ActionError, ConfigError, ObservationError, require_package

#: Goal pose of the block origin, ``(x, y, angle)``, fixed by gym_pusht.
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])

#: Random goals (``goal_mode="random"``): the goal's origin is drawn uniformly
#: within ``±position`` pixels of :data:`GOAL_POSE`'s on each axis and its angle
#: uniformly in ``[0, 2π)``. Every point of the T lies within 121 px of its
#: origin, so a goal T stays more than 65 px from the walls (at 5 and 506) and
#: the pusher (30 px wide) can get all the way round the block at any goal.
#: Two goals are on average about 60 px and 90° apart, far more than coverage
#: ≥ 0.95 tolerates, so a policy that ignores the goal fails. The scripted
#: expert succeeds on all of seeds 0..99 and 100000..100049 with this range.
GOAL_RANGE = {"position": 60.0}

GOAL_MODES = ("fixed", "random")

#: Coverage at which an episode counts as a success (and the score saturates).
SUCCESS_COVERAGE = 0.95

#: Pusher radius in pixels (gym_pusht's kinematic circle).
AGENT_RADIUS = 15.0

#: Outline of the T in the block's own frame, pixels, one closed polygon.
#: The bar spans x ∈ [-60, 60], y ∈ [0, 30]; the stem x ∈ [-15, 15], y ∈ [30, 120].
T_OUTLINE_LOCAL = np.array(
    [[-60.0, 0.0], [60.0, 0.0], [60.0, 30.0], [15.0, 30.0], [15.0, 120.0], [-15.0, 120.0], [-15.0, 30.0], [-60.0, 30.0]]
)

#: Diffusion Policy's nine block keypoints in the block's own frame, pixels.
#:
#: Diffusion Policy defines them once (``PymunkKeypointManager.create_from_pusht_env``):
#: draw the T at pose (256, 300, 0) on a white 512×512 canvas, take every
#: non-white pixel, pick 9 by farthest-point sampling starting from a pixel
#: drawn by ``np.random.default_rng(0)``, then add ``uniform(0, 1)`` jitter from
#: the same generator. :func:`derive_block_keypoints` repeats that procedure;
#: the values are stored here so that observations do not depend on the
#: pygame build that draws the mask. A keypoint in the world is
#: ``R(angle) @ local + block position`` (block origin, not centre of mass).
BLOCK_KEYPOINTS_LOCAL = np.array(
    [
        [9.269786713763871, 90.04097352393619],
        [-60.983472364471474, -1.1867297607997276],
        [60.91275557727772, -1.3933642242328201],
        [-0.2705034390160016, 25.54362499146542],
        [-14.064927576212233, 122.81585355412153],
        [39.002738500170146, 32.857404276587566],
        [-39.966414424694534, 32.729655446429945],
        [-16.82434437939744, 62.86317892234989],
        [23.54146122024909, -1.7002881094626152],
    ]
)

OBS_MODES = ("state", "image")
_KEYPOINT_REACH = float(np.ceil(np.linalg.norm(BLOCK_KEYPOINTS_LOCAL, axis=1).max()))


def hold_action(obs: dict[str, np.ndarray]) -> np.ndarray:
    """The action that keeps the pusher where it is: its own position as the target.

    Args:
        obs: a PushT observation with ``agent_pos`` (2,), pixels.

    Returns:
        ``(2,)`` float64 target position.

    Raises:
        ObservationError: ``obs`` has no ``agent_pos`` of shape (2,).
    """
    if "agent_pos" not in obs:
        raise ObservationError(f"holding the PushT pusher needs obs['agent_pos']; got keys {sorted(obs)}")
    pos = np.asarray(obs["agent_pos"], dtype=np.float64)
    if pos.shape != (2,):
        raise ObservationError(f"obs['agent_pos'] must have shape (2,); got {pos.shape}")
    return pos.copy()


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """World keypoints of the block.

    Args:
        block_pose: ``(..., 3)`` block origin ``x, y`` and angle (radians).

    Returns:
        ``(..., 9, 2)`` keypoints in pixels, float64.
    """
    pose = np.asarray(block_pose, dtype=np.float64)
    c, s = np.cos(pose[..., 2]), np.sin(pose[..., 2])
    lx, ly = BLOCK_KEYPOINTS_LOCAL[:, 0], BLOCK_KEYPOINTS_LOCAL[:, 1]
    x = c[..., None] * lx - s[..., None] * ly + pose[..., 0, None]
    y = s[..., None] * lx + c[..., None] * ly + pose[..., 1, None]
    return np.stack([x, y], axis=-1)


def derive_block_keypoints(n_keypoints: int = 9, seed: int = 0) -> np.ndarray:
    """Recompute Diffusion Policy's local block keypoints from a pygame drawing.

    Follows the recipe described at :data:`BLOCK_KEYPOINTS_LOCAL`; with the
    defaults it reproduces those values wherever pygame draws the T as
    gym_pusht's drawing code does. Needs pygame and gym_pusht.

    Returns:
        ``(n_keypoints, 2)`` float64 keypoints in the block frame.
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    pygame = require_package("pygame", extra="", purpose="deriving PushT keypoints")
    pymunk = require_package("pymunk", extra="", purpose="deriving PushT keypoints")
    pusht = require_package("gym_pusht.envs.pusht", extra="", purpose="deriving PushT keypoints")
    from gym_pusht.envs.pymunk_override import DrawOptions

    origin = np.array([256.0, 300.0])
    space = pymunk.Space()
    pusht.PushTEnv.add_tee(space, tuple(origin), 0)
    canvas = pygame.Surface((512, 512))
    canvas.fill(pygame.Color("white"))
    space.debug_draw(DrawOptions(canvas))
    img = pygame.surfarray.array3d(canvas).transpose(1, 0, 2)
    rows, cols = np.nonzero((img != 255).any(axis=-1))  # row-major pixel order matters for the seed
    local = np.stack([cols, rows], axis=-1).astype(np.float64) - origin

    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(len(local)))]
    min_dist = np.linalg.norm(local - local[chosen[0]], axis=-1)
    for _ in range(n_keypoints - 1):
        chosen.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, np.linalg.norm(local - local[chosen[-1]], axis=-1))
    return local[chosen] + rng.uniform(0, 1, size=(n_keypoints, 2))


class PushTEnv(gym.Env):
    """Diffusion Policy's PushT task on the gym_pusht simulator.

    Args:
        obs_mode: ``"state"`` (``agent_pos``, ``state``, ``keypoint``) or
            ``"image"`` (the same plus ``img``, the 96×96 RGB render).
        render_size: side of the square frames :meth:`render` returns.
        render_mode: only ``"rgb_array"`` (or None, which means the same) is
            supported; :meth:`render` always returns an RGB array.
        goal_mode: ``"fixed"`` (Diffusion Policy's :data:`GOAL_POSE`) or
            ``"random"``: a goal drawn at every reset (see :data:`GOAL_RANGE`),
            deterministic given the reset seed and independent of the start
            state, which stays gym_pusht's for that seed; the observation then
            also has ``goal_keypoint``.

    Raises:
        ConfigError: unknown ``obs_mode``, ``goal_mode`` or ``render_mode``, or a bad ``render_size``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs_mode: str = "state",
        render_size: int = 256,
        render_mode: str | None = "rgb_array",
        goal_mode: str = "fixed",
    ) -> None:
        if obs_mode not in OBS_MODES:
            raise ConfigError(f"obs_mode must be one of {', '.join(OBS_MODES)}; got {obs_mode!r}")
        if goal_mode not in GOAL_MODES:
            raise ConfigError(f"goal_mode must be one of {', '.join(GOAL_MODES)}; got {goal_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ConfigError(f"render_mode must be 'rgb_array' (or None); got {render_mode!r}")
        if int(render_size) != render_size or render_size < 8:
            raise ConfigError(f"render_size must be an integer >= 8; got {render_size!r}")
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        sim = require_package("gym_pusht.envs.pusht", extra="", purpose="rtdp/PushT-v0")

        self.obs_mode = obs_mode
        self.goal_mode = goal_mode
        self.render_mode = "rgb_array"
        self.render_size = int(render_size)
        # gym_pusht renders its 96x96 observation only in "pixels*" modes; its
        # state vector is rebuilt here, so the inner mode only decides rendering.
        self._sim = sim.PushTEnv(
            obs_type="pixels_agent_pos" if obs_mode == "image" else "state",
            render_mode="rgb_array",
            visualization_width=self.render_size,
            visualization_height=self.render_size,
        )
        self._sim._setup()  # build the bodies now so that their properties can be read before reset
        self.dt = self._sim.dt
        self.n_substeps = int(round(1.0 / (self._sim.dt * self._sim.control_hz)))

        obs = {
            "agent_pos": spaces.Box(0.0, 512.0, shape=(2,), dtype=np.float32),
            "state": spaces.Box(
                low=np.zeros(5, dtype=np.float32),
                high=np.array([512, 512, 512, 512, 2 * np.pi], dtype=np.float32),
                dtype=np.float32,
            ),
            # keypoints reach past the block origin's range (a start may overlap a wall)
            "keypoint": spaces.Box(-_KEYPOINT_REACH, 512.0 + _KEYPOINT_REACH, shape=(9, 2), dtype=np.float32),
        }
        if obs_mode == "image":
            obs["img"] = spaces.Box(0, 255, shape=(96, 96, 3), dtype=np.uint8)
        if goal_mode == "random":
            reach = GOAL_RANGE["position"] + _KEYPOINT_REACH
            centre = np.broadcast_to(GOAL_POSE[:2], (9, 2)).astype(np.float32)
            obs["goal_keypoint"] = spaces.Box(centre - reach, centre + reach, dtype=np.float32)
        self.observation_space = spaces.Dict(obs)
        self.action_space = spaces.Box(0.0, 512.0, shape=(2,), dtype=np.float32)
        self._img: np.ndarray | None = None
        self._goal = GOAL_POSE.copy()
        # random goals come from their own stream, so that the start state
        # (gym_pusht's generator) and the expert's choices (ours) are the same
        # as on the fixed-goal task for the same seed
        self._goal_rng: np.random.Generator | None = None

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode.

        Without options the initial state is gym_pusht's: agent and block
        positions and the block angle drawn from the env's generator, so a
        seed gives the same start here as in gym_pusht / LeRobot. With
        ``goal_mode="random"`` the episode's goal is drawn too, from a
        generator of its own seeded by ``seed``.

        Args:
            seed: seeds the generator; the same seed gives the same start.
            options: ``{"reset_to_state": [ax, ay, bx, by, angle]}`` starts from
                that exact state instead (unlike gym_pusht, the block ends up
                exactly at ``bx, by``: its angle is set before its position).

        Returns:
            ``(obs, info)``.
        """
        super().reset(seed=seed)
        state = None if options is None else options.get("reset_to_state")
        if self.goal_mode == "random":
            self._goal = self._draw_goal(seed)
        # Seeding the simulator's generator from ours keeps one source of
        # randomness and reproduces gym_pusht's starts for the same seed.
        obs, _ = self._sim.reset(seed=seed)
        self._sim.goal_pose = self._goal.copy()  # gym_pusht's reset restores its fixed goal
        if self.obs_mode == "image":
            # the image shows the goal outline: redraw it with this episode's goal
            self._img = obs["pixels"] if self.goal_mode == "fixed" else self._sim.get_obs()["pixels"]
        else:
            self._img = None
        if state is not None:
            self.set_state(state)
        info = self._info(self.coverage())
        info["is_success"] = False
        return self._obs(), info

    def step(self, action: np.ndarray):
        """Move the pusher's target to ``action`` for one control period (0.1 s).

        Args:
            action: ``(2,)`` target pusher position, pixels.

        Returns:
            ``(obs, reward, terminated, truncated, info)``; reward is the score.

        Raises:
            ActionError: the action does not have shape (2,) or is not finite.
        """
        act = np.asarray(action, dtype=np.float64)
        if act.shape != (2,) or not np.all(np.isfinite(act)):
            raise ActionError(f"PushT action must be 2 finite floats (target x, y in pixels); got {action!r}")
        obs, _, _, _, _ = self._sim.step(act)
        if self.obs_mode == "image":
            self._img = obs["pixels"]
        coverage = self.coverage()
        info = self._info(coverage)
        return self._obs(), info["score"], bool(info["is_success"]), False, info

    def render(self) -> np.ndarray:
        """RGB frame, ``(render_size, render_size, 3)`` uint8, last action drawn as a cross."""
        return self._sim.render()

    def close(self) -> None:
        self._sim.close()

    # ------------------------------------------------------------------ helpers
    @property
    def goal_pose(self) -> np.ndarray:
        """``(3,)`` this episode's goal pose of the block origin: x, y, angle."""
        return self._goal.copy()

    @property
    def agent_body(self):
        """The pymunk body of the pusher (kinematic)."""
        return self._sim.agent

    @property
    def block_body(self):
        """The pymunk body of the T block."""
        return self._sim.block

    def get_state(self) -> np.ndarray:
        """``(5,)`` float64 ``[agent x, agent y, block x, block y, block angle mod 2π]``."""
        agent, block = self._sim.agent.position, self._sim.block.position
        return np.array([agent.x, agent.y, block.x, block.y, self._sim.block.angle % (2 * np.pi)])

    def set_state(self, state: np.ndarray) -> None:
        """Place agent and block exactly, at rest.

        Args:
            state: ``(5,)`` ``[agent x, agent y, block x, block y, block angle]``.

        Raises:
            ConfigError: ``state`` is not 5 finite numbers.
        """
        st = np.asarray(state, dtype=np.float64).reshape(-1)
        if st.shape != (5,) or not np.all(np.isfinite(st)):
            raise ConfigError(f"a PushT state is 5 finite floats [agent x, y, block x, y, angle]; got {state!r}")
        # A fresh space: pymunk keeps each body's position-correction velocity
        # from the last contact solve (not exposed) and applies it on the next
        # step, which would nudge a teleported block by up to a pixel or two.
        self._sim._setup()
        self._sim.goal_pose = self._goal.copy()  # _setup restores gym_pusht's fixed goal
        agent, block = self._sim.agent, self._sim.block
        agent.position = (st[0], st[1])
        # pymunk rotates a body about its centre of mass, which moves the
        # origin; setting the angle first keeps the origin where asked.
        block.angle = st[4]
        block.position = (st[2], st[3])
        self._sim.space.reindex_shapes_for_body(block)
        self._sim.space.reindex_shapes_for_body(agent)
        if self.obs_mode == "image":
            self._img = self._sim.get_obs()["pixels"]

    def coverage(self) -> float:
        """Area of block ∩ goal divided by the goal's area (this episode's goal)."""
        return float(self._sim._get_coverage())

    # ------------------------------------------------------------------ internals
    def _draw_goal(self, seed: int | None) -> np.ndarray:
        """The next random goal pose, ``(3,)``; ``seed`` restarts the goal stream."""
        if seed is not None:
            # a fixed second entry keeps this stream apart from the start state's
            self._goal_rng = np.random.default_rng([int(seed), 0x607A1])
        elif self._goal_rng is None:
            self._goal_rng = np.random.default_rng(int(self.np_random.integers(2**63)))
        rng = self._goal_rng
        xy = GOAL_POSE[:2] + rng.uniform(-GOAL_RANGE["position"], GOAL_RANGE["position"], size=2)
        return np.array([xy[0], xy[1], rng.uniform(0.0, 2 * np.pi)])

    def _obs(self) -> dict[str, np.ndarray]:
        state = self.get_state()
        obs = {
            "agent_pos": state[:2].astype(np.float32),
            "state": state.astype(np.float32),
            "keypoint": block_keypoints(state[2:]).astype(np.float32),
        }
        if self.obs_mode == "image":
            obs["img"] = np.ascontiguousarray(self._img, dtype=np.uint8)
        if self.goal_mode == "random":
            obs["goal_keypoint"] = block_keypoints(self._goal).astype(np.float32)
        return obs

    def _info(self, coverage: float) -> dict[str, Any]:
        block = self._sim.block
        return {
            "coverage": coverage,
            "score": float(np.clip(coverage / SUCCESS_COVERAGE, 0.0, 1.0)),
            "is_success": bool(coverage >= SUCCESS_COVERAGE),
            "block_pose": np.array([block.position.x, block.position.y, block.angle]),
            "goal_pose": self._goal.copy(),
            # contact points per physics substep, as Diffusion Policy's data/n_contacts
            "n_contacts": int(np.ceil(getattr(self._sim, "n_contact_points", 0) / self.n_substeps)),
        }


class PushTGoalEnv(PushTEnv):
    """:class:`PushTEnv` with ``goal_mode="random"`` by default: ``rtdp/PushTGoal-v0``.

    Registering this class rather than passing ``goal_mode`` through the task's
    kwargs makes a plain ``gymnasium.make("rtdp/PushTGoal-v0")`` draw goals too.
    """

    def __init__(
        self,
        obs_mode: str = "state",
        render_size: int = 256,
        render_mode: str | None = "rgb_array",
        goal_mode: str = "random",
    ) -> None:
        super().__init__(obs_mode=obs_mode, render_size=render_size, render_mode=render_mode, goal_mode=goal_mode)

