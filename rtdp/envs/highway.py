"""Driving scenes on highway-env (``rtdp/Highway-v0``): highway, merge, roundabout and intersection.

The ego is a kinematic bicycle (highway-env's ``Vehicle``) driven by a
continuous action ``(acceleration m/s^2, steering rad)``; the other vehicles
are highway-env's IDM/MOBIL drivers. The scripted expert drives like a
person: IDM car following with comfort limits, lane changes and target
speeds drawn at random among the safe ones (keep / left / right, slower /
faster), so that the same situation has several good futures.

Every simulation step (10 Hz) is logged, and :meth:`HighwayEnv.scenes` cuts
the finished episode into *scenes* (one per second, from 2 s after the start
to 4 s before the end): what a planner sees (ego state and 2 s of past poses,
the 16 nearest vehicles as tokens, lane centrelines, the route command) and
what it is scored against (the expert's next 4 s as 8 poses at 2 Hz and the
other vehicles' logged futures at 10 Hz), all in the ego frame at the scene
time (x forward, y left). ``rtdp.envs.highway_score`` holds the scorer and
``/docs`` of the keys are in ``SCENE_KEYS``.

highway-env loads when an environment is made (the ``drive`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np

# the scene's time grid and scenario names are the scorer's (one definition): the plan is PLAN_STEPS poses
# PLAN_DT apart (8 at 2 Hz), agent futures FUTURE_STEPS at 10 Hz (0.0 .. 4.0 s)
from rtdp.envs.highway_idm import restore_idm_constants
from rtdp.envs.highway_score import N_STEPS as FUTURE_STEPS
from rtdp.envs.highway_score import PLAN_DT, PLAN_STEPS, SCENARIOS
from rtdp.errors import ConfigError, MissingDependencyError

SIM_HZ = 10  # simulation and control rate; one logged step per env.step
PAST_STEPS = 4  # ego poses at -2.0 .. -0.5 s
N_AGENTS, N_LANES, LANE_POINTS = 16, 64, 20
ROUTE_POINTS, ROUTE_SPACING = 32, 5.0
# metres of each lane sampled around the ego's projection: a 4 s plan at 30 m/s ends 120 m ahead, and the
# drivable area (the lane corridors) must reach it
LANE_BEHIND, LANE_AHEAD = 20.0, 130.0
AGENT_RANGE = 80.0
SCENE_EVERY_S = 1.0
COMMANDS = ("left", "straight", "right", "unknown")

# version of the scene contents (keys, shapes, lane sampling, expert); caches of scenes are keyed by it
# 2: vehicles keyed per episode (1 keyed them by id()); 3: every episode starts from highway-env's IDM constants
SCENE_FORMAT = 3

# shape of every scene array (see /docs in highway_score and the module docstring)
SCENE_KEYS: dict[str, tuple[int, ...]] = {
    "ego_state": (4,),  # speed, longitudinal acceleration, yaw rate, speed limit
    "ego_past": (PAST_STEPS, 3),
    "command": (len(COMMANDS),),
    "agents": (N_AGENTS, 9),  # x, y, cos h, sin h, vx, vy, length, width, valid
    "lanes": (N_LANES, LANE_POINTS, 4),  # x, y, half width, valid
    "route": (ROUTE_POINTS, 2),
    "action": (PLAN_STEPS, 2),
    "agent_future": (N_AGENTS, FUTURE_STEPS, 3),
    "agent_future_valid": (N_AGENTS, FUTURE_STEPS),
    "scenario": (1,),
}
OBS_KEYS = ("ego_state", "ego_past", "command", "agents", "lanes")

# per scenario: highway-env id, its config, the ego's target-speed range (m/s) and the speed limit
_SCENARIO_CFG: dict[str, dict[str, Any]] = {
    "highway": dict(env_id="highway-v0", speeds=(20.0, 30.0), limit=30.0,
                    config={"lanes_count": 4, "vehicles_count": 20, "duration": 30, "vehicles_density": 1.2}),
    "merge": dict(env_id="merge-v0", speeds=(18.0, 28.0), limit=30.0, config={}),
    # curves: a person keeps the lateral acceleration v^2 / r under ~3 m/s^2 (roundabout r ~ 20 m, turns ~ 10 m)
    "roundabout": dict(env_id="roundabout-v0", speeds=(5.0, 8.0), limit=10.0, config={}),
    "intersection": dict(env_id="intersection-v0", speeds=(3.0, 6.0), limit=8.0,
                         config={"duration": 18, "initial_vehicle_count": 8, "spawn_probability": 0.5}),
}
_DURATION_S = {"highway": 30.0, "merge": 15.0, "roundabout": 14.0, "intersection": 18.0}
ACC_RANGE = (-6.0, 6.0)
STEER_RANGE = (-math.pi / 3, math.pi / 3)


def scenario_of(name: str) -> str:
    """``name`` itself when it is a known scenario (or ``"mixed"``).

    Raises:
        ConfigError: an unknown scenario, listing the known ones.
    """
    if name not in (*SCENARIOS, "mixed"):
        raise ConfigError(f"scenario must be one of {', '.join(SCENARIOS)} or mixed, got {name!r}")
    return name


def _require_highway_env():
    try:
        import highway_env  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "the highway scenes need highway-env: pip install -e '.[drive]' (highway-env 1.12)") from exc


def _ego_vehicle_class():
    """The ego's class, built on first use so that highway-env is imported only then."""
    from highway_env import utils
    from highway_env.vehicle.behavior import IDMVehicle
    from highway_env.vehicle.kinematics import Vehicle

    class EgoVehicle(IDMVehicle):
        """The ego: applies the action it is given; ``expert_action`` is what the scripted expert would do.

        ``act()`` without an action (highway-env's ``Road.act`` calls every
        vehicle so) keeps the last command instead of driving itself.
        """

        # comfort limits of a person (NAVSIM's comfort bounds are 2.4 / -4.05 m/s^2)
        COMFORT_ACC_MAX = 2.0
        COMFORT_ACC_MIN = -3.5
        LANE_CHANGE_DELAY = 1.0
        LANE_CHANGE_COOLDOWN = 5.0  # s after a lane change before the next is considered: no zig-zag
        JERK_MAX = 3.0  # m/s^3, rate limit on the commanded acceleration
        # softer lateral and heading loops than highway-env's (0.6 s / 0.2 s): a lane change takes ~3 s
        KP_LATERAL = 1 / 1.5
        KP_HEADING = 1 / 0.4

        def act(self, action: dict | str | None = None) -> None:
            if isinstance(action, dict):
                Vehicle.act(self, action)

        def setup_expert(self, rng: np.random.Generator, speeds: tuple[float, float], lane_changes: bool) -> None:
            self.rng = rng
            self.speed_range = speeds
            self.enable_lane_change = lane_changes
            self.target_speed = float(np.clip(self.speed, *speeds))
            self.speed_timer = 0.0
            self.last_acc = 0.0
            self.timer = 0.0
            self.since_change = 0.0

        def change_lane_policy(self) -> None:
            # a lane change in progress runs to its end; otherwise once a second, maybe, a safe side lane at random
            if self.lane_index != self.target_lane_index:
                return
            if not utils.do_every(self.LANE_CHANGE_DELAY, self.timer):
                return
            self.timer = 0
            if self.rng.random() > 0.25 or abs(self.speed) < 1 or self.since_change < self.LANE_CHANGE_COOLDOWN:
                return
            if abs(self.lane.local_coordinates(self.position)[1]) > 0.5:  # not settled in the lane yet
                return
            options = [li for li in self.road.network.side_lanes(self.lane_index)
                       if self.road.network.get_lane(li).is_reachable_from(self.position) and self._safe_change(li)]
            if options:
                self.target_lane_index = options[int(self.rng.integers(len(options)))]
                self.since_change = 0.0

        def _safe_change(self, lane_index) -> bool:
            # MOBIL's safety criterion: the new follower must not brake harder than b_safe, nor the ego
            ahead, behind = self.road.neighbour_vehicles(self, lane_index)
            if behind is not None and self.acceleration(behind, self) < -self.LANE_CHANGE_MAX_BRAKING_IMPOSED:
                return False
            if ahead is not None and self.acceleration(self, ahead) < -self.LANE_CHANGE_MAX_BRAKING_IMPOSED:
                return False
            return True

        def expert_action(self, dt: float) -> dict[str, float]:
            """One control step of the scripted expert: random speed / lane choices, IDM, lane keeping."""
            self.speed_timer += dt
            self.since_change += dt
            if self.speed_timer >= 3.0:  # every 3 s: slower, keep or faster, within the scenario's range
                self.speed_timer = 0.0
                self.target_speed = float(np.clip(self.target_speed + self.rng.choice([-4.0, 0.0, 4.0]),
                                                  *self.speed_range))
            self.timer = (self.timer or 0.0) + dt
            self.follow_road()
            if self.enable_lane_change:
                self.change_lane_policy()
            steering = float(np.clip(self.steering_control(self.target_lane_index), -0.5, 0.5))
            front, rear = self.road.neighbour_vehicles(self, self.lane_index)
            acc = self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear)
            if self.lane_index != self.target_lane_index:
                front, rear = self.road.neighbour_vehicles(self, self.target_lane_index)
                acc = min(acc, self.acceleration(ego_vehicle=self, front_vehicle=front, rear_vehicle=rear))
            acc = float(np.clip(acc, -5.0, self.COMFORT_ACC_MAX))
            step = self.JERK_MAX * dt
            if acc > -4.0:  # emergency braking is not rate-limited
                acc = float(np.clip(acc, self.last_acc - step, self.last_acc + step))
            acc = max(acc, -self.speed / dt)  # brake to a stop, never into reverse
            self.last_acc = acc
            return {"acceleration": acc, "steering": steering}

    return EgoVehicle


def _to_frame(xy: np.ndarray, origin: np.ndarray, heading: float) -> np.ndarray:
    """World (highway-env: y down) points (..., 2) into the frame at ``origin``/``heading``: x forward, y left."""
    c, s = math.cos(heading), math.sin(heading)
    d = np.asarray(xy, dtype=np.float64) - origin
    return np.stack([c * d[..., 0] + s * d[..., 1], -(-s * d[..., 0] + c * d[..., 1])], axis=-1)


def _rel_heading(h: np.ndarray | float, heading: float) -> np.ndarray:
    """World heading into the ego frame (y left flips the sense of rotation), wrapped to (-pi, pi]."""
    d = -(np.asarray(h, dtype=np.float64) - heading)
    return (d + np.pi) % (2 * np.pi) - np.pi


class HighwayEnv(gymnasium.Env):
    """``rtdp/Highway-v0``: one highway-env scenario with a logged, continuously controlled ego.

    Args:
        scenario: one of ``SCENARIOS``, or ``"mixed"``: the scenario of an
            episode is ``SCENARIOS[seed % 4]``.
        render_mode: ``"rgb_array"`` for ``render()``.
        duration_s: episode length (default per scenario: 30/15/14/18 s).
        observe: build the observation on every step; False returns an empty
            dict from ``reset``/``step`` and leaves it to :meth:`observation`
            (scene logging and a planner that replans every few steps skip the
            lane geometry of the steps in between).

    Observation: the scene keys ``OBS_KEYS`` at the current step (past poses
    padded with the first pose at the start). Action: ``(2,)`` acceleration
    m/s^2 and steering rad. ``info``: ``is_success`` (no collision, still on
    the road), ``score`` (same, as 0/1 so far), ``crashed``, ``offroad``,
    ``scenario``, ``progress_m``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": SIM_HZ}

    def __init__(self, scenario: str = "mixed", render_mode: str | None = None,
                 duration_s: float | None = None, observe: bool = True) -> None:
        self.observe = bool(observe)
        _require_highway_env()
        self.scenario_setting = scenario_of(scenario)
        self.render_mode = render_mode
        self.duration_s = duration_s
        self.action_space = gymnasium.spaces.Box(np.array([ACC_RANGE[0], STEER_RANGE[0]], dtype=np.float32),
                                                 np.array([ACC_RANGE[1], STEER_RANGE[1]], dtype=np.float32))
        self.observation_space = gymnasium.spaces.Dict({
            k: gymnasium.spaces.Box(-np.inf, np.inf, SCENE_KEYS[k], np.float32) for k in OBS_KEYS})
        self._envs: dict[str, Any] = {}
        self.scenario = SCENARIOS[0]
        self.log: list[dict] = []

    # ------------------------------------------------------------------ episode

    def _inner(self, scenario: str):
        if scenario not in self._envs:
            sc = _SCENARIO_CFG[scenario]
            config = {**sc["config"], "simulation_frequency": SIM_HZ, "policy_frequency": SIM_HZ,
                      "offroad_terminal": False, "duration": 1e6}  # rtdp ends episodes itself
            env = gymnasium.make(sc["env_id"], config=config, render_mode=self.render_mode)
            u = env.unwrapped
            # highway-env's rewards assume its discrete actions (merge-v0 fails on a continuous one);
            # rtdp scores driving itself, so they are switched off before the action type changes
            u._reward = lambda action: 0.0
            u._rewards = lambda action: {}
            u.config["action"] = {"type": "ContinuousAction", "acceleration_range": ACC_RANGE,
                                  "steering_range": STEER_RANGE, "clip": True}
            u.define_spaces()
            self._envs[scenario] = env
        return self._envs[scenario]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        seed = 0 if seed is None else int(seed)
        self.scenario = SCENARIOS[seed % len(SCENARIOS)] if self.scenario_setting == "mixed" else self.scenario_setting
        env = self._inner(self.scenario)
        self.rng = np.random.default_rng(seed)
        if self.scenario == "intersection":
            env.unwrapped.config["destination"] = f"o{int(self.rng.integers(1, 4))}"
        restore_idm_constants()
        env.reset(seed=seed)
        u = env.unwrapped
        old = u.vehicle
        ego = _ego_vehicle_class()(u.road, old.position, heading=old.heading, speed=old.speed,
                                   target_lane_index=old.lane_index, route=None)
        if self.scenario == "intersection":
            ego.plan_route_to(u.config["destination"])
        if self.scenario == "roundabout":
            ego.plan_route_to(str(self.rng.choice(["exs", "nxs", "wxs"])))
        u.road.vehicles[u.road.vehicles.index(old)] = ego
        u.controlled_vehicles[0] = ego
        u.action_type.controlled_vehicle = ego
        sc = _SCENARIO_CFG[self.scenario]
        ego.setup_expert(self.rng, sc["speeds"], lane_changes=self.scenario in ("highway", "merge"))
        self.ego = ego
        self.inner = u
        self.steps = 0
        self.start_x = np.array(ego.position, dtype=np.float64)
        self.progress = 0.0
        self.crashed = self.offroad = False
        self.log = []
        self._next_key = 0
        self._record()
        return self._maybe_observation(), self._info()

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (2,) or not np.all(np.isfinite(a)):
            raise ConfigError(f"a highway action is (acceleration m/s^2, steering rad), finite; got {action!r}")
        norm = np.array([np.interp(a[0], ACC_RANGE, (-1, 1)), np.interp(a[1], STEER_RANGE, (-1, 1))], np.float32)
        before = np.array(self.ego.position, dtype=np.float64)
        self._inner(self.scenario).step(norm)
        self.steps += 1
        self.progress += float(np.dot(np.array(self.ego.position) - before,
                                      [math.cos(self.ego.heading), math.sin(self.ego.heading)]))
        self.crashed = self.crashed or bool(self.ego.crashed)
        self.offroad = self.offroad or not bool(self.ego.on_road)
        self._record()
        terminated = self.crashed or self.offroad
        truncated = self.steps >= int(round(self._duration() * SIM_HZ))
        return self._maybe_observation(), self.progress, terminated, truncated, self._info()

    def observation(self) -> dict[str, np.ndarray]:
        """The observation (``OBS_KEYS``) at the current step."""
        return self._observation(len(self.log) - 1)

    def scene_inputs(self) -> dict[str, np.ndarray]:
        """The observation plus the ``route`` polyline at the current step: what a planner that checks its
        candidates against the road and the route reads (``rtdp.envs.plan_selection``)."""
        scene = self._scene_inputs(len(self.log) - 1)
        return {k: scene[k] for k in (*OBS_KEYS, "route")}

    def _maybe_observation(self) -> dict[str, np.ndarray]:
        return self.observation() if self.observe else {}

    def _duration(self) -> float:
        return float(self.duration_s or _DURATION_S[self.scenario])

    def _info(self) -> dict[str, Any]:
        ok = not (self.crashed or self.offroad)
        return {"is_success": ok, "score": float(ok), "crashed": self.crashed, "offroad": self.offroad,
                "scenario": self.scenario, "progress_m": self.progress}

    def render(self):
        return self._inner(self.scenario).render()

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    # ------------------------------------------------------------------ logging

    def _record(self) -> None:
        """Log the ego and every vehicle on the road at this step (world frame)."""
        ego = self.ego
        vehicles = {}
        for v in self.inner.road.vehicles:
            if v is ego:
                continue
            # a key of the episode in first-seen order, not id(v): ids order vehicles at equal distances
            # differently from run to run, and CPython may give a removed vehicle's id to a new one
            key = getattr(v, "_log_key", None)
            if key is None:
                key = v._log_key = self._next_key
                self._next_key += 1
            vehicles[key] = (float(v.position[0]), float(v.position[1]), float(v.heading), float(v.speed),
                               float(v.LENGTH), float(v.WIDTH))
        self.log.append({
            "ego": (float(ego.position[0]), float(ego.position[1]), float(ego.heading), float(ego.speed),
                    float(ego.action.get("acceleration", 0.0)) if ego.action else 0.0),
            "vehicles": vehicles,
            "lane_index": ego.lane_index,
            "route_plan": list(ego.route) if ego.route else None,
            "lanes": None,  # filled lazily: the geometry near the ego at this step
            "route": None,
            "command": None,
        })

    def _ego_pose(self, i: int) -> tuple[np.ndarray, float]:
        e = self.log[max(0, min(i, len(self.log) - 1))]["ego"]
        return np.array(e[:2]), e[2]

    def _observation(self, i: int) -> dict[str, np.ndarray]:
        scene = self._scene_inputs(i)
        return {k: scene[k] for k in OBS_KEYS}

    def _scene_inputs(self, i: int) -> dict[str, np.ndarray]:
        """What a planner sees at logged step ``i`` (ego frame at that step)."""
        origin, heading = self._ego_pose(i)
        entry = self.log[i]
        x, y, h, speed, acc = entry["ego"]
        prev = self.log[max(0, i - 1)]["ego"][2]
        yaw_rate = float(_rel_heading(prev, h)) * SIM_HZ if i > 0 else 0.0
        limit = _SCENARIO_CFG[self.scenario]["limit"]
        past = np.zeros((PAST_STEPS, 3), np.float32)
        for k in range(PAST_STEPS):
            j = i - int(round((PAST_STEPS - k) * PLAN_DT * SIM_HZ))
            p, ph = self._ego_pose(max(0, j))
            past[k, :2] = _to_frame(p, origin, heading)
            past[k, 2] = _rel_heading(ph, heading)
        agents = np.zeros((N_AGENTS, 9), np.float32)
        ids = self._nearest(i)
        for row, vid in enumerate(ids):
            vx_, vy_, vh, vs, vl, vw = entry["vehicles"][vid]
            rel = _to_frame(np.array([vx_, vy_]), origin, heading)
            rh = float(_rel_heading(vh, heading))
            agents[row] = (rel[0], rel[1], math.cos(rh), math.sin(rh), vs * math.cos(rh), vs * math.sin(rh), vl, vw, 1.0)
        lanes, route, command = self._geometry(i)
        return {
            "ego_state": np.array([speed, acc, yaw_rate, limit], np.float32),
            "ego_past": past,
            "command": command,
            "agents": agents,
            "lanes": lanes,
            "route": route,
            "scenario": np.array([SCENARIOS.index(self.scenario)], np.float32),
            "_agent_ids": ids,
        }

    def _nearest(self, i: int) -> list[int]:
        origin, _ = self._ego_pose(i)
        vehicles = self.log[i]["vehicles"]
        dist = sorted((math.hypot(v[0] - origin[0], v[1] - origin[1]), vid) for vid, v in vehicles.items())
        return [vid for d, vid in dist if d <= AGENT_RANGE][:N_AGENTS]

    def _geometry(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lane centrelines, the route centreline and the route command around the ego at step ``i``."""
        entry = self.log[i]
        if entry["lanes"] is not None:
            return entry["lanes"], entry["route"], entry["command"]
        origin, heading = self._ego_pose(i)
        network = self.inner.road.network
        found = []
        for _from, tos in network.graph.items():
            for _to, lanes in tos.items():
                for lane in lanes:
                    s0, _ = lane.local_coordinates(origin)
                    lo, hi = max(0.0, s0 - LANE_BEHIND), min(lane.length, s0 + LANE_AHEAD)
                    if hi <= lo:
                        continue  # the lane lies wholly outside the window along its own length
                    # evenly over the part in the window, both ends included, so that consecutive lanes join
                    # and a short curved piece (a roundabout's) keeps its shape
                    s = np.linspace(lo, hi, LANE_POINTS)
                    pts = np.array([lane.position(float(si), 0.0) for si in s])
                    dist = float(np.min(np.hypot(*(pts - origin).T)))
                    if dist > LANE_AHEAD:
                        continue
                    half = np.array([lane.width_at(float(si)) / 2 for si in s])
                    rel = _to_frame(pts, origin, heading)
                    found.append((dist, np.concatenate([rel, half[:, None], np.ones((LANE_POINTS, 1))], axis=1)))
                    if hi >= lane.length - 1e-6:
                        found += self._connectors(network, lane, _to, origin, heading)
        found.sort(key=lambda t: t[0])
        lanes = np.zeros((N_LANES, LANE_POINTS, 4), np.float32)
        for row, (_, arr) in enumerate(found[:N_LANES]):
            lanes[row] = arr
        route = self._route_points(entry, origin, heading)
        command = np.zeros(len(COMMANDS), np.float32)
        turn = math.atan2(route[-1, 1] - route[-2, 1], route[-1, 0] - route[-2, 0])
        command[0 if turn > math.radians(30) else 2 if turn < -math.radians(30) else 1] = 1.0
        entry["lanes"], entry["route"], entry["command"] = lanes, route, command
        return lanes, route, command

    @staticmethod
    def _connectors(network, lane, node: str, origin: np.ndarray, heading: float) -> list:
        """Short corridors from a lane's end to the start of each lane leaving ``node`` where the two do not meet.

        highway-env's roundabout and intersection pieces leave gaps of a few
        metres at their joints (its vehicles steer across them); the paved
        surface is continuous, so the drivable area bridges them.
        """
        end = np.asarray(lane.position(lane.length, 0.0), dtype=np.float64)
        width = lane.width_at(lane.length) / 2
        out = []
        for nxt_lanes in network.graph.get(node, {}).values():
            for nxt in nxt_lanes:
                start = np.asarray(nxt.position(0.0, 0.0), dtype=np.float64)
                gap = float(np.hypot(*(start - end)))
                if gap < 0.5 or gap > 15.0:
                    continue
                pts = end + np.linspace(0.0, 1.0, LANE_POINTS)[:, None] * (start - end)
                rel = _to_frame(pts, origin, heading)
                half = np.full((LANE_POINTS, 1), max(width, nxt.width_at(0.0) / 2))
                dist = float(np.min(np.hypot(*(pts - origin).T)))
                out.append((dist, np.concatenate([rel, half, np.ones((LANE_POINTS, 1))], axis=1)))
        return out

    def _route_points(self, entry: dict, origin: np.ndarray, heading: float) -> np.ndarray:
        """Points every ``ROUTE_SPACING`` m along the ego's lane and the lanes its route continues on.

        After the current lane the route's next road is taken (same lane
        number where it exists, else lane 0); without a route, the first road
        leaving the lane's end. Where the road network ends the last point repeats.
        """
        network = self.inner.road.network
        index = entry["lane_index"]
        lane = network.get_lane(index)
        s, _ = lane.local_coordinates(origin)
        plan = [tuple(r[:2]) for r in (entry["route_plan"] or [])]
        pts = []
        target = max(float(s), 0.0)
        for k in range(ROUTE_POINTS):
            while target > lane.length:
                nxt = self._next_index(network, index, plan)
                if nxt is None:
                    target = lane.length
                    break
                target -= lane.length
                index, lane = nxt, network.get_lane(nxt)
            pts.append(lane.position(float(min(target, lane.length)), 0.0))
            target += ROUTE_SPACING
        return _to_frame(np.array(pts), origin, heading).astype(np.float32)

    @staticmethod
    def _next_index(network, index, plan: list[tuple[str, str]]):
        _, to, lane_id = index
        roads = network.graph.get(to, {})
        if not roads:
            return None
        nxt = None
        if (index[0], to) in plan:
            pos = plan.index((index[0], to))
            if pos + 1 < len(plan) and plan[pos + 1][0] == to:
                nxt = plan[pos + 1][1]
            elif pos + 1 >= len(plan):
                return None  # the route ends here
        if nxt is None:
            nxt = sorted(roads)[0]
        lanes = roads[nxt]
        return (to, nxt, lane_id if lane_id is not None and lane_id < len(lanes) else 0)

    # ------------------------------------------------------------------ scenes

    def scenes(self) -> list[dict[str, np.ndarray]]:
        """Cut the logged episode into scenes (see the module docstring); call after the episode ends.

        A scene needs 2 s of past and 4 s of future inside the episode, and
        none is taken from the 4 s before a collision or leaving the road.
        """
        n = len(self.log)
        horizon = int(round(PLAN_STEPS * PLAN_DT * SIM_HZ))
        last = n - 1 - horizon
        first = int(round(PAST_STEPS * PLAN_DT * SIM_HZ))
        every = int(round(SCENE_EVERY_S * SIM_HZ))
        out = []
        for i in range(first, last + 1, every):
            scene = self._scene_inputs(i)
            ids = scene.pop("_agent_ids")
            origin, heading = self._ego_pose(i)
            plan = np.zeros((PLAN_STEPS, 2), np.float32)
            for k in range(PLAN_STEPS):
                p, _ = self._ego_pose(i + int(round((k + 1) * PLAN_DT * SIM_HZ)))
                plan[k] = _to_frame(p, origin, heading)
            future = np.zeros((N_AGENTS, FUTURE_STEPS, 3), np.float32)
            valid = np.zeros((N_AGENTS, FUTURE_STEPS), np.float32)
            for row, vid in enumerate(ids):
                for k in range(FUTURE_STEPS):
                    v = self.log[i + k]["vehicles"].get(vid)
                    if v is None:
                        continue
                    future[row, k, :2] = _to_frame(np.array(v[:2]), origin, heading)
                    future[row, k, 2] = _rel_heading(v[2], heading)
                    valid[row, k] = 1.0
            scene.update(action=plan, agent_future=future, agent_future_valid=valid)
            out.append(scene)
        return out


def expert_episode(env: HighwayEnv, seed: int) -> list[dict[str, np.ndarray]]:
    """Drive one episode with the scripted expert and return its scenes (empty if it crashed early)."""
    observe, env.observe = env.observe, False  # the scenes are cut from the log afterwards
    try:
        env.reset(seed=seed)
        return _drive_expert(env)
    finally:
        env.observe = observe


def _drive_expert(env: HighwayEnv) -> list[dict[str, np.ndarray]]:
    expert = HighwayExpert(env)
    while True:
        _, _, terminated, truncated, _ = env.step(expert.act(None))
        if terminated or truncated:
            break
    return env.scenes()


class HighwayExpert:
    """The scripted driver (see the module docstring), bound to one :class:`HighwayEnv`."""

    def __init__(self, env) -> None:
        self.env = env.unwrapped

    def reset(self) -> None:
        """Nothing to forget: the expert's state lives on the ego vehicle, which a reset replaces."""

    def act(self, obs: dict[str, np.ndarray] | None) -> np.ndarray:
        a = self.env.ego.expert_action(1.0 / SIM_HZ)
        return np.array([a["acceleration"], a["steering"]], dtype=np.float64)


def hold_action(obs: dict[str, np.ndarray]) -> np.ndarray:
    """Brake gently with the wheels straight: what a driver does when the plan stops coming."""
    return np.array([-2.0, 0.0])
