"""Tracking a planned trajectory: pure pursuit for steering, a proportional speed loop for acceleration.

A driving planner replans at a few hertz; between plans the vehicle follows
the last plan at the simulation rate. The plan is kept in the world frame at
the moment it was made, so it stays put while the vehicle moves along it.
"""

from __future__ import annotations

import math

import numpy as np


class PlanTracker:
    """Pure pursuit (Coulter 1992) on the plan's polyline plus a speed loop on the plan's speed profile.

    Args:
        wheelbase: the bicycle model's effective wheelbase (highway-env's
            kinematic model turns at ``v * tan(delta) / 5`` for small angles: 5 m).
        plan_dt: seconds between plan poses.
        lookahead_s / min_lookahead: the pursued point lies ``max(min_lookahead, v * lookahead_s)`` metres ahead.
        kp_speed: acceleration per m/s of speed error.
        acc_range / max_steer: limits of the command.
    """

    def __init__(self, *, wheelbase: float = 5.0, plan_dt: float = 0.5, lookahead_s: float = 0.8,
                 min_lookahead: float = 6.0, kp_speed: float = 1.5, acc_range: tuple[float, float] = (-5.0, 3.0),
                 max_steer: float = 0.5) -> None:
        self.wheelbase = wheelbase
        self.plan_dt = plan_dt
        self.lookahead_s = lookahead_s
        self.min_lookahead = min_lookahead
        self.kp_speed = kp_speed
        self.acc_range = acc_range
        self.max_steer = max_steer
        self.reset()

    def reset(self) -> None:
        """Forget the plan (a new episode)."""
        self.path: np.ndarray | None = None
        self.t0 = 0.0

    def set_plan(self, plan_ego: np.ndarray, position: np.ndarray, heading: float, t: float) -> None:
        """Take a new plan made at time ``t``: (8, 2) poses in the ego frame (x forward, y left).

        ``position``/``heading`` are the vehicle's world pose when the plan was
        made (highway-env's frame: y down, heading clockwise on screen).
        """
        c, s = math.cos(heading), math.sin(heading)
        x, y_left = plan_ego[:, 0], plan_ego[:, 1]
        y = -y_left  # back to highway-env's y-down frame
        world = np.stack([position[0] + c * x - s * y, position[1] + s * x + c * y], axis=1)
        self.path = np.vstack([np.asarray(position, dtype=np.float64)[None], world])
        self.t0 = float(t)

    def command(self, position: np.ndarray, heading: float, speed: float, t: float) -> np.ndarray:
        """(acceleration m/s^2, steering rad) for the vehicle's current state at time ``t``."""
        if self.path is None:
            return np.array([self.acc_range[0] * 0.4, 0.0])
        path = self.path
        seg = np.diff(path, axis=0)
        seg_len = np.linalg.norm(seg, axis=1)
        # speed the plan asks for now: its distance per step around the current time
        k = int(np.clip((t - self.t0) / self.plan_dt + 0.5, 0, len(seg_len) - 1))
        v_target = float(seg_len[min(k + 1, len(seg_len) - 1)] / self.plan_dt)
        acc = float(np.clip(self.kp_speed * (v_target - speed), *self.acc_range))
        # the pursued point: along the polyline from the closest point, lookahead metres further
        rel = np.asarray(position, dtype=np.float64)
        cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        proj_s = 0.0
        best = math.inf
        for i, (a, d, length) in enumerate(zip(path[:-1], seg, seg_len)):
            u = 0.0 if length < 1e-6 else float(np.clip(np.dot(rel - a, d) / length**2, 0, 1))
            dist = float(np.linalg.norm(a + u * d - rel))
            if dist < best:
                best, proj_s = dist, cum[i] + u * length
        look = max(self.min_lookahead, speed * self.lookahead_s)
        target_s = proj_s + look
        if target_s >= cum[-1]:
            # past the end of the plan: extend along its last direction
            d = seg[-1] / max(seg_len[-1], 1e-6) if seg_len[-1] > 1e-6 else np.array([math.cos(heading),
                                                                                        math.sin(heading)])
            goal = path[-1] + d * (target_s - cum[-1])
        else:
            i = int(np.searchsorted(cum, target_s) - 1)
            u = (target_s - cum[i]) / max(seg_len[i], 1e-6)
            goal = path[i] + u * seg[i]
        dx, dy = goal - rel
        alpha = math.atan2(dy, dx) - heading
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        dist = max(math.hypot(dx, dy), 1e-3)
        steer = math.atan2(2 * self.wheelbase * math.sin(alpha), dist)
        return np.array([acc, float(np.clip(steer, -self.max_steer, self.max_steer))])
