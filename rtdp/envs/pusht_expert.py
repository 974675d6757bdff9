"""Scripted PushT expert: plan one straight push at a time with a contact model.

Physics facts the expert is built on (gym_pusht, pymunk):

* The space's damping is 0, so every body loses all its velocity at each
  10 ms physics substep: the block never slides; it moves only while the
  pusher presses on it (quasi-static pushing).
* Contacts are frictionless (shape friction 0): the pusher can only push the
  block along the contact normal. A push of depth ``δ`` at contact point ``r``
  (from the block's centre of mass) with normal ``n`` gives the impulse
  ``J = δ / (1/m + (r × n)² / I)``, moving the block by ``J n / m`` and turning
  it by ``J (r × n) / I``. :meth:`PushTExpert._rollout` integrates exactly this
  along a straight pusher stroke, which predicts pymunk to within a pixel.
* The pusher is a critically damped PD follower of the action (time constant
  0.1 s): it lags ``2 v / ω`` behind a target moving at speed ``v`` and
  settles on a fixed target without overshoot.

Strategy, every time the previous push is over:

1. enumerate candidate pushes: contact points every few pixels along each
   face of the T, pushed along the face normal, and a few diagonal pushes at
   each outer corner;
2. predict with the contact model how far each would bring the block towards
   the goal (pose error: centroid distance and rotation weighted by the T's
   radius of gyration), and the time it costs (travel around the block on a
   visibility graph plus push length);
3. pick the push with the best progress per step, travel to its start point
   following the shortest collision-free path, push, and re-decide each step,
   from the current state, where the push should stop.

Everything is deterministic given the state and the goal, except two choices
drawn once per episode from the expert's own generator: which way round the
block to prefer when both are comparable, and which way to turn a block that is
upside down. The goal is the bound environment's, read at every reset, so the
same expert serves the fixed-goal and the random-goal task.
"""

from __future__ import annotations

import numpy as np

from rtdp.envs.pusht import AGENT_RADIUS, T_OUTLINE_LOCAL, PushTEnv
from rtdp.errors import ConfigError, ObservationError

_RECTS = np.array([[-60.0, 0.0, 60.0, 30.0], [-15.0, 30.0, 15.0, 120.0]])  # xmin, ymin, xmax, ymax
_SEG_A = T_OUTLINE_LOCAL
_SEG_B = np.roll(T_OUTLINE_LOCAL, -1, axis=0)
_SEG_D = _SEG_B - _SEG_A
_SEG_LEN2 = (_SEG_D**2).sum(-1)
ARENA = (10.0, 502.0)  # pusher centres the expert aims at stay inside this square (walls at 5 and 506)


def _to_body(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points ``(..., 2)`` into the frame of a block at ``pose`` (3,)."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    d = points - pose[:2]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def _to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Body points ``(..., 2)`` of a block at ``pose`` (3,) into the world."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    return np.stack(
        [c * points[..., 0] - s * points[..., 1] + pose[0], s * points[..., 0] + c * points[..., 1] + pose[1]], axis=-1
    )


def _closest_on_outline(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of the T's outline to body-frame points ``p`` (K, 2).

    Returns:
        ``(q, dist)``: ``(K, 2)`` closest points and ``(K,)`` distances.
    """
    rel = p[:, None, :] - _SEG_A  # K, 8, 2
    t = np.clip((rel * _SEG_D).sum(-1) / _SEG_LEN2, 0.0, 1.0)
    q = _SEG_A + t[..., None] * _SEG_D
    d2 = ((p[:, None, :] - q) ** 2).sum(-1)
    j = np.argmin(d2, axis=1)
    idx = np.arange(len(p))
    return q[idx, j], np.sqrt(d2[idx, j])


def _inside_t(p: np.ndarray) -> np.ndarray:
    """Whether body-frame points ``p`` (..., 2) lie inside the T."""
    x, y = p[..., 0], p[..., 1]
    inside = np.zeros(x.shape, dtype=bool)
    for x0, y0, x1, y1 in _RECTS:
        inside |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return inside


def _segment_clearance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Smallest distance between body-frame segments ``p→q`` (N, 2) and the T.

    Zero when a segment crosses the T.
    """
    out = np.full(len(p), np.inf)
    d = q - p
    for x0, y0, x1, y1 in _RECTS:
        # slab test: does the segment enter the rectangle?
        t0, t1 = np.zeros(len(p)), np.ones(len(p))
        hit = np.ones(len(p), dtype=bool)
        for k, lo, hi in ((0, x0, x1), (1, y0, y1)):
            dk = d[:, k]
            small = np.abs(dk) < 1e-12
            hit &= ~(small & ((p[:, k] < lo) | (p[:, k] > hi)))
            with np.errstate(divide="ignore", invalid="ignore"):
                ta = (lo - p[:, k]) / dk
                tb = (hi - p[:, k]) / dk
            lo_t = np.where(small, -np.inf, np.minimum(ta, tb))
            hi_t = np.where(small, np.inf, np.maximum(ta, tb))
            t0, t1 = np.maximum(t0, lo_t), np.minimum(t1, hi_t)
        hit &= t0 <= t1
        # otherwise the closest pair involves an endpoint or a rectangle corner
        def box_dist(pt):
            dx = np.maximum(np.maximum(x0 - pt[:, 0], 0.0), pt[:, 0] - x1)
            dy = np.maximum(np.maximum(y0 - pt[:, 1], 0.0), pt[:, 1] - y1)
            return np.hypot(dx, dy)

        dist = np.minimum(box_dist(p), box_dist(q))
        dd = np.maximum((d**2).sum(-1), 1e-12)
        for cx, cy in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
            t = np.clip(((cx - p[:, 0]) * d[:, 0] + (cy - p[:, 1]) * d[:, 1]) / dd, 0.0, 1.0)
            dist = np.minimum(dist, np.hypot(p[:, 0] + t * d[:, 0] - cx, p[:, 1] + t * d[:, 1] - cy))
        out = np.minimum(out, np.where(hit, 0.0, dist))
    return out


def _point_clearance(p: np.ndarray) -> np.ndarray:
    """Distance from body-frame points ``p`` (N, 2) to the T (0 inside)."""
    _, dist = _closest_on_outline(p)
    return np.where(_inside_t(p), 0.0, dist)


def _candidates(
    gap: float, spacing: float, corner_angles: tuple[float, ...], approach: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pushes in the block frame.

    Returns:
        ``(start, direction, run_up)``: ``(K, 2)`` pusher centre where the push
        starts (``gap`` pixels before touching), ``(K, 2)`` unit push
        directions, and ``(K, 2)`` the point ``approach`` pixels further back
        along the push line from which the pusher runs up to the start
        (the start itself where a pocket of the T leaves no room).
    """
    area2 = (_SEG_A[:, 0] * _SEG_B[:, 1] - _SEG_B[:, 0] * _SEG_A[:, 1]).sum()
    tangents = _SEG_D / np.sqrt(_SEG_LEN2)[:, None]
    # inward normal: interior on the left of a counter-clockwise outline
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], -1) * np.sign(area2)
    starts, dirs = [], []
    for a, length, t, n in zip(_SEG_A, np.sqrt(_SEG_LEN2), tangents, normals):
        m = max(1, int(round(length / spacing)))
        for f in np.linspace(0.0, 1.0, m + 1):
            touching = a + f * length * t - n * AGENT_RADIUS  # pusher centre when it touches
            starts.append(touching - n * gap)
            dirs.append(n)
    # diagonal pushes at the outer corners (where the two adjacent faces meet convexly)
    for i in range(len(_SEG_A)):
        n1, n2 = normals[i - 1], normals[i]
        t1, t2 = tangents[i - 1], tangents[i]
        if (t1[0] * t2[1] - t1[1] * t2[0]) * np.sign(area2) <= 0:
            continue
        for ang in corner_angles:
            n = np.cos(ang) * n1 + np.sin(ang) * n2
            n /= np.linalg.norm(n)
            starts.append(_SEG_A[i] - n * (AGENT_RADIUS + gap))
            dirs.append(n)
    starts, dirs = np.array(starts), np.array(dirs)
    # a start is valid if the pusher there does not overlap the T, and touching
    # happens at the intended point, not on a neighbouring face of a pocket
    touch = starts + dirs * gap
    ok = (_point_clearance(starts) >= AGENT_RADIUS + 0.5 * gap) & (_point_clearance(touch) >= AGENT_RADIUS - 1e-6)
    starts, dirs = starts[ok], dirs[ok]
    run_up = starts - dirs * approach
    free = (_point_clearance(run_up) >= AGENT_RADIUS + gap) & (
        _segment_clearance(run_up, starts) >= AGENT_RADIUS + 0.5 * gap
    )
    return starts, dirs, np.where(free[:, None], run_up, starts)


class PushTExpert:
    """Deterministic push planner for :class:`rtdp.envs.pusht.PushTEnv`.

    Only ``obs["state"]`` and the episode's goal are read, so the actions are
    a function of what a policy observes (block pose and pusher position, the
    pusher's speed from the previous observation, and the goal, which a
    random-goal env also puts in ``obs["goal_keypoint"]``), of the push under
    way, and of two per-episode choices.

    Args:
        env: a :class:`~rtdp.envs.pusht.PushTEnv`, wrapped or not; read for the
            block's mass properties and, at :meth:`reset`, its generator and
            the episode's goal pose.
        travel_lead: how far ahead along the travel path the target runs at
            full speed, pixels; the pusher then moves about half that per step.
        min_lead: the same when the pusher is at rest; the lead grows with
            speed, so the pusher accelerates over a few steps.
        push_lead: how far ahead of the pusher the target runs while pushing.
        seed: fixes the per-episode choices for every episode instead of
            drawing them from the env's generator at :meth:`reset`.

    Raises:
        ConfigError: ``env`` is not a PushT environment.
    """

    def __init__(
        self,
        env,
        *,
        travel_lead: float = 40.0,
        min_lead: float = 20.0,
        push_lead: float = 24.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(getattr(env, "unwrapped", None), PushTEnv):
            raise ConfigError(f"PushTExpert needs an rtdp PushT environment; got {env!r}")
        self._env = env.unwrapped
        block = self._env.block_body
        self._mass = float(block.mass)
        self._moment = float(block.moment)
        self._cog = np.array(block.center_of_gravity, dtype=np.float64)
        # area centroid and radius of gyration of the T: the pose error below is
        # the mean squared displacement of the T's area, which tracks coverage
        areas = (_RECTS[:, 2] - _RECTS[:, 0]) * (_RECTS[:, 3] - _RECTS[:, 1])
        centres = np.stack([(_RECTS[:, 0] + _RECTS[:, 2]) / 2, (_RECTS[:, 1] + _RECTS[:, 3]) / 2], -1)
        self._centroid = (areas[:, None] * centres).sum(0) / areas.sum()
        own = ((_RECTS[:, 2] - _RECTS[:, 0]) ** 2 + (_RECTS[:, 3] - _RECTS[:, 1]) ** 2) / 12
        self._rho2 = float((areas * (own + ((centres - self._centroid) ** 2).sum(-1))).sum() / areas.sum())

        self.travel_lead = float(travel_lead)
        self.min_lead = float(min_lead)
        self.push_lead = float(push_lead)
        self.gap = 5.0
        self.clearance = AGENT_RADIUS + 9.0  # travel keeps this far from the T
        self.step_ds = 2.0
        self.max_push = 160.0
        self._cand_start, self._cand_dir, self._cand_run_up = _candidates(self.gap, 6.0, (np.pi / 6, np.pi / 3), 15.0)
        self._seed = seed
        self.reset()

    # ------------------------------------------------------------------ API
    def reset(self) -> None:
        """Forget the current plan, read the episode's goal and draw this episode's choices."""
        self._set_goal(self._env.goal_pose)
        if self._seed is not None:
            rng = np.random.default_rng(self._seed)
        else:
            rng = np.random.default_rng(int(self._env.np_random.integers(2**31)))
        self.side = 1.0 if rng.random() < 0.5 else -1.0  # +1: prefer counter-clockwise travel
        self.turn_bias = 0.35 * (1.0 if rng.random() < 0.5 else -1.0)
        self._plan: dict | None = None
        self._tabu: dict[int, int] = {}
        self._prev_agent: np.ndarray | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Next target pusher position, ``(2,)`` float32 pixels.

        Args:
            obs: observation dict with ``state`` (5,) (agent x, y, block x, y, angle).

        Raises:
            ObservationError: ``obs`` has no finite 5-element ``state``.
        """
        state = np.asarray(obs.get("state", np.empty(0)) if isinstance(obs, dict) else np.empty(0), dtype=np.float64)
        if state.shape != (5,) or not np.all(np.isfinite(state)):
            raise ObservationError(
                "PushTExpert.act needs obs['state'] = [agent x, agent y, block x, block y, angle] (5 finite floats)"
            )
        agent, pose = state[:2], state[2:5]
        goal = self._env.goal_pose
        if not np.array_equal(goal, self._goal):
            # the env was reset without calling reset() here: a plan towards the old goal is void
            self._set_goal(goal)
            self._plan, self._tabu = None, {}
        speed = 0.0 if self._prev_agent is None else float(np.linalg.norm(agent - self._prev_agent))
        self._prev_agent = agent
        # the travel target runs further ahead as the pusher speeds up, so it
        # accelerates over a few steps instead of jumping off at full speed
        self._lead = float(np.clip(self.min_lead + 2.5 * speed, self.min_lead, self.travel_lead))
        for _ in range(3):
            if self._plan is None:
                self._plan = self._choose(agent, pose)
            target = self._follow(agent, pose)
            if target is not None:
                return np.clip(target, 0.0, 512.0).astype(np.float32)
            self._plan = None
        return np.clip(agent, 0.0, 512.0).astype(np.float32)

    # ------------------------------------------------------------------ model
    def _set_goal(self, goal: np.ndarray) -> None:
        """Aim at ``goal`` (3,): block origin x, y and angle."""
        self._goal = np.array(goal, dtype=np.float64)
        self._goal_centroid = _to_world(self._centroid, self._goal)

    def _error(self, cog: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Pose error, px², of blocks whose centre of mass is ``cog`` (..., 2)."""
        c, s = np.cos(theta), np.sin(theta)
        off = self._centroid - self._cog
        cx = cog[..., 0] + c * off[0] - s * off[1] - self._goal_centroid[0]
        cy = cog[..., 1] + s * off[0] + c * off[1] - self._goal_centroid[1]
        # wrapped so that a block turned by about π goes the episode's preferred way
        dth = np.mod(theta - self._goal[2] + np.pi - self.turn_bias, 2 * np.pi) - np.pi + self.turn_bias
        return cx**2 + cy**2 + self._rho2 * dth**2

    def predict_push(self, pose: np.ndarray, agent: np.ndarray, direction: np.ndarray, length: float) -> np.ndarray:
        """Block pose after the pusher moves in a straight line, by the contact model.

        Args:
            pose: ``(3,)`` block pose (origin x, y, angle).
            agent: ``(2,)`` pusher start, world pixels.
            direction: ``(2,)`` unit direction of the stroke.
            length: stroke length, pixels.

        Returns:
            ``(3,)`` predicted block pose.
        """
        n = int(round(length / self.step_ds))
        _, cog, theta = self._rollout(pose, np.asarray(agent, float)[None], np.asarray(direction, float)[None], n, True)
        c, s = np.cos(theta[0]), np.sin(theta[0])
        origin = cog[0] - np.array([c * self._cog[0] - s * self._cog[1], s * self._cog[0] + c * self._cog[1]])
        return np.array([origin[0], origin[1], theta[0]])

    def _rollout(self, pose: np.ndarray, agent: np.ndarray, direction: np.ndarray, n: int, final: bool = False):
        """Pose error along straight pusher strokes.

        Args:
            pose: ``(3,)`` block pose (origin x, y, angle).
            agent: ``(K, 2)`` pusher start positions, world.
            direction: ``(K, 2)`` unit stroke directions, world.
            n: number of ``step_ds`` increments.

        Returns:
            ``(K, n + 1)`` pose error after each increment (column 0: now);
            with ``final``, also the final ``(K, 2)`` centres of mass and ``(K,)`` angles.
        """
        k = len(agent)
        c0, s0 = np.cos(pose[2]), np.sin(pose[2])
        cog0 = pose[:2] + np.array([c0 * self._cog[0] - s0 * self._cog[1], s0 * self._cog[0] + c0 * self._cog[1]])
        cog = np.tile(cog0, (k, 1))
        theta = np.full(k, pose[2])
        a = agent.copy()
        errors = np.empty((k, n + 1))
        errors[:, 0] = self._error(cog, theta)
        inv_m, inv_i = 1.0 / self._mass, 1.0 / self._moment
        for i in range(n):
            a += direction * self.step_ds
            c, s = np.cos(theta), np.sin(theta)
            # pusher centre relative to the centre of mass, in the block frame
            dx, dy = a[:, 0] - cog[:, 0], a[:, 1] - cog[:, 1]
            body = np.stack([c * dx + s * dy + self._cog[0], -s * dx + c * dy + self._cog[1]], -1)
            q, dist = _closest_on_outline(body)
            pen = AGENT_RADIUS - dist
            touching = pen > 0
            if touching.any():
                nb = (q - body) / np.maximum(dist, 1e-9)[:, None]  # into the block
                nw = np.stack([c * nb[:, 0] - s * nb[:, 1], s * nb[:, 0] + c * nb[:, 1]], -1)
                rb = q - self._cog
                rw = np.stack([c * rb[:, 0] - s * rb[:, 1], s * rb[:, 0] + c * rb[:, 1]], -1)
                rxn = rw[:, 0] * nw[:, 1] - rw[:, 1] * nw[:, 0]
                impulse = np.where(touching, pen / (inv_m + rxn**2 * inv_i), 0.0)
                cog = cog + (impulse * inv_m)[:, None] * nw
                theta = theta + impulse * rxn * inv_i
            errors[:, i + 1] = self._error(cog, theta)
        return (errors, cog, theta) if final else errors

    # ------------------------------------------------------------------ paths
    def _graph_nodes(self, pose: np.ndarray) -> np.ndarray:
        r = self.clearance + 1.0
        corners = np.array([[-60, 0], [60, 0], [60, 30], [15, 120], [-15, 120], [-60, 30]], dtype=np.float64)
        signs = np.array([[-1, -1], [1, -1], [1, 1], [1, 1], [-1, 1], [-1, 1]], dtype=np.float64)
        return _to_world(corners + r * signs, pose)

    def _edge_ok(self, p: np.ndarray, q: np.ndarray, pose: np.ndarray, need: np.ndarray) -> np.ndarray:
        return _segment_clearance(_to_body(p, pose), _to_body(q, pose)) >= need - 1e-6

    def _edge_cost(self, p: np.ndarray, q: np.ndarray, pose: np.ndarray) -> np.ndarray:
        length = np.linalg.norm(q - p, axis=-1)
        centre = _to_world(self._centroid, pose)
        turn = (p[..., 0] - centre[0]) * (q[..., 1] - centre[1]) - (p[..., 1] - centre[1]) * (q[..., 0] - centre[0])
        # going round the block against the episode's preferred sense costs more
        return length * np.where(turn * self.side < 0, 1.4, 1.0)

    def _paths(self, start: np.ndarray, goals: np.ndarray, pose: np.ndarray):
        """Shortest collision-free paths from ``start`` to each of ``goals`` (K, 2).

        Returns:
            ``(cost, via, nodes)``: ``(K,)`` path costs (inf if unreachable),
            per goal the sequence of graph nodes to pass through, and the
            ``(6, 2)`` node positions (offset outer corners of the T).
        """
        nodes = self._graph_nodes(pose)
        nn = len(nodes)
        # corners beyond the arena cannot be used: the pusher cannot pass a block that touches a wall
        usable = np.all((nodes > ARENA[0]) & (nodes < ARENA[1]), axis=1)
        clear_start = float(_point_clearance(_to_body(start[None], pose))[0])
        clear_goals = _point_clearance(_to_body(goals, pose))
        r = self.clearance
        # an edge may come as close to the T as its own end points are, no closer
        ii, jj = np.meshgrid(np.arange(nn), np.arange(nn), indexing="ij")
        ok_nn = self._edge_ok(nodes[ii.ravel()], nodes[jj.ravel()], pose, np.full(nn * nn, r)).reshape(nn, nn)
        ok_nn &= usable[:, None] & usable[None, :]
        cost_nn = np.where(ok_nn, self._edge_cost(nodes[ii], nodes[jj], pose), np.inf)
        need_s = min(r, clear_start - 0.5)
        ok_sn = self._edge_ok(np.tile(start, (nn, 1)), nodes, pose, np.full(nn, need_s))
        dist = np.where(ok_sn & usable, self._edge_cost(np.tile(start, (nn, 1)), nodes, pose), np.inf)
        prev = np.full(nn, -1)
        # Bellman-Ford on six nodes: cheaper than a heap here
        for _ in range(nn):
            via = dist[:, None] + cost_nn
            best = via.min(0)
            better = best < dist - 1e-9
            if not better.any():
                break
            prev = np.where(better, via.argmin(0), prev)
            dist = np.minimum(dist, best)
        k = len(goals)
        need_g = np.minimum(r, clear_goals - 0.5)
        gi = np.repeat(np.arange(k), nn)
        ni = np.tile(np.arange(nn), k)
        ok_ng = self._edge_ok(nodes[ni], goals[gi], pose, need_g[gi]).reshape(k, nn) & usable[None, :]
        cost_ng = np.where(ok_ng, self._edge_cost(nodes[ni], goals[gi], pose).reshape(k, nn), np.inf)
        total = dist[None, :] + cost_ng
        last = total.argmin(1)
        cost = total[np.arange(k), last]
        ok_direct = self._edge_ok(np.tile(start, (k, 1)), goals, pose, np.minimum(need_g, need_s))
        direct = np.where(ok_direct, self._edge_cost(np.tile(start, (k, 1)), goals, pose), np.inf)
        use_direct = direct <= cost
        cost = np.where(use_direct, direct, cost)
        vias = []
        for g in range(k):
            if use_direct[g] or not np.isfinite(cost[g]):
                vias.append(())
                continue
            seq, j = [], int(last[g])
            while j >= 0 and len(seq) <= nn:
                seq.append(j)
                j = int(prev[j])
            vias.append(tuple(reversed(seq)))
        return cost, vias, nodes

    # ------------------------------------------------------------------ planning
    def _reach(self, points: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """How far ``points`` (K, 2) can move along ``direction`` (K, 2) inside the arena."""
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = (ARENA[0] - points) / direction
            hi = (ARENA[1] - points) / direction
        reach = np.where(direction > 1e-9, hi, np.where(direction < -1e-9, lo, np.inf))
        return np.maximum(reach.min(axis=1), 0.0)

    def _stroke_errors(self, pose: np.ndarray, agent: np.ndarray, direction: np.ndarray, length: float) -> np.ndarray:
        """Pose errors along strokes, ``inf`` where the stroke would leave the arena."""
        n = int(length / self.step_ds)
        errors = self._rollout(pose, agent, direction, n)
        travel = np.arange(n + 1) * self.step_ds
        return np.where(travel[None, :] <= self._reach(agent, direction)[:, None], errors, np.inf)

    def _run_ups(self, starts: np.ndarray, pose: np.ndarray, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """World run-up points of candidates ``index``; the start itself where the run-up leaves the arena."""
        run_ups = _to_world(self._cand_run_up[index], pose)
        inside = np.all((run_ups > ARENA[0]) & (run_ups < ARENA[1]), axis=-1)
        return np.where(inside[..., None], run_ups, starts)

    def _choose(self, agent: np.ndarray, pose: np.ndarray) -> dict | None:
        """Pick the candidate push with the best predicted progress per step."""
        starts = _to_world(self._cand_start, pose)
        c, s = np.cos(pose[2]), np.sin(pose[2])
        cd = self._cand_dir
        dirs = np.stack([c * cd[:, 0] - s * cd[:, 1], s * cd[:, 0] + c * cd[:, 1]], -1)
        errors = self._stroke_errors(pose, starts, dirs, self.gap + self.max_push)
        e0 = errors[:, 0]
        best_i = errors.argmin(1)
        best_e = errors[np.arange(len(errors)), best_i]
        gain = np.sqrt(e0) - np.sqrt(best_e)
        in_arena = np.all((starts > ARENA[0]) & (starts < ARENA[1]), axis=1)
        run_ups = self._run_ups(starts, pose)
        cost, _, _ = self._paths(agent, run_ups, pose)
        travel_steps = (cost + np.linalg.norm(starts - run_ups, axis=1)) / (self.travel_lead / 2)
        steps = travel_steps + best_i * self.step_ds / (self.push_lead / 2) + 6.0
        rate = np.where(in_arena & np.isfinite(cost) & (gain > 1e-3), gain / steps, -np.inf)
        allowed = rate.copy()
        allowed[list(self._tabu)] = -np.inf
        self._tabu = {k: v - 1 for k, v in self._tabu.items() if v > 1}
        k = int(np.argmax(allowed))
        if not np.isfinite(allowed[k]):
            # every useful push has failed recently: retrying one beats standing still
            k = int(np.argmax(rate))
            if not np.isfinite(rate[k]):
                return None
        return {
            "index": k,
            "phase": "travel",
            "error0": float(e0[k]),
            "predicted": float(best_e[k]),
            "length": float(best_i[k] * self.step_ds),
            # a plan that overruns its estimate this much is stuck (e.g. the block is against a wall)
            "budget": int(2 * steps[k] + 15),
            "steps": 0,
        }

    def _follow(self, agent: np.ndarray, pose: np.ndarray) -> np.ndarray | None:
        """Target for the current plan, or None when the plan is over."""
        plan = self._plan
        if plan is None:
            return None
        k = plan["index"]
        plan["steps"] += 1
        if plan["steps"] > plan["budget"]:
            self._tabu[k] = 3
            return None
        start = _to_world(self._cand_start[k], pose)
        if plan["phase"] == "travel":
            c, s = np.cos(pose[2]), np.sin(pose[2])
            d = self._cand_dir[k]
            u = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
            rel = agent - start
            # on the run-up line (or at the start): the push takes over without stopping
            run_up = self._run_ups(start, pose, k)
            if abs(rel[0] * u[1] - rel[1] * u[0]) < 4.0 and -np.linalg.norm(start - run_up) - 4.0 <= rel @ u <= 2.0:
                plan["phase"] = "push"
                plan["origin"] = start
                plan["dir"] = u
            else:
                cost, vias, nodes = self._paths(agent, run_up[None], pose)
                if not np.isfinite(cost[0]):
                    self._tabu[k] = 3
                    return None
                path = [agent] + [nodes[j] for j in vias[0]] + [run_up, start]
                return self._carrot(path, self._lead)
        u, origin = plan["dir"], plan["origin"]
        along = float((agent - origin) @ u)
        errors = self._stroke_errors(pose, agent[None], u[None], min(self.max_push, plan["length"] + 40.0))[0]
        i = int(np.argmin(errors))
        rem = i * self.step_ds
        if 0 < i < len(errors) - 1 and np.isfinite(errors[i + 1]):
            # sub-increment minimum of the parabola through the three lowest samples
            curv = errors[i - 1] - 2 * errors[i] + errors[i + 1]
            if curv > 0:
                rem += float(np.clip(0.5 * (errors[i - 1] - errors[i + 1]) / curv, -0.5, 0.5)) * self.step_ds
        if rem < 0.5:
            achieved = plan["error0"] - float(errors[0])
            if achieved < 0.25 * (plan["error0"] - plan["predicted"]):
                self._tabu[k] = 2  # the model was wrong here (walls, contact lost): try elsewhere first
            return None
        # on the push line (which corrects sideways drift), never past where the push should end
        return origin + u * (along + min(rem, self.push_lead))

    @staticmethod
    def _carrot(path: list[np.ndarray], lead: float) -> np.ndarray:
        """The point ``lead`` pixels along a polyline (its end if shorter)."""
        left = lead
        for p, q in zip(path[:-1], path[1:]):
            seg = float(np.linalg.norm(q - p))
            if seg >= left:
                return p + (q - p) * (left / max(seg, 1e-9))
            left -= seg
        return path[-1]
