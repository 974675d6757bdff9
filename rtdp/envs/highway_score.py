"""NAVSIM v1's PDM score (PDMS) of 4 s plans on highway scenes (see the highway scene format).

``PDMS = NC × DAC × (5·EP + 5·TTC + 2·C) / 12`` per scene, computed on the planner's plan
against the logged (non-reactive) futures of the other vehicles. The plan (8 poses at 2 Hz) gets the
ego pose at t = 0 prepended and is interpolated linearly to 10 Hz (41 steps, aligned with
``agent_future``); without a heading column the heading is the direction of motion of each 0.1 s step.
As in NAVSIM, the terms are read from the states of a vehicle that tracks this reference (an LQR
controller on a kinematic bicycle, :mod:`rtdp.envs.plan_simulation`), unless ``tracked=False``.

* NC: 1, or 0 for an at-fault collision, 0.5 when the agent hit was stationary. Only the first contact
  with each agent counts (as nuPlan); it is not at fault when the ego is stopped or the agent's centre
  is behind the ego's rear (a rear-end by the other vehicle).
* DAC: all four ego corners inside the lane corridors at every step.
* TTC: 0 when, at some step, the moving ego and an agent ahead of it, both projected at constant
  velocity for 0.3, 0.6 or 0.9 s, would overlap (agents already collided with are left out).
* EP: the plan's progress along ``route`` over the best safe (NC = DAC = 1) progress of an IDM proposal
  set at {0.2, ..., 1.0} × the speed limit and of the expert's logged ``action``; 1 below 5 m.
* C: nuPlan's comfort limits. On tracked states as NAVSIM reads them: the vehicle's acceleration
  smoothed over 0.8 s (Savitzky-Golay), jerks its derivative over 1.5 s, yaw rate and acceleration over
  0.5 s. On the plan itself (``tracked=False``): derivatives of the poses through a quadratic 0.7 s
  Savitzky-Golay filter, the first velocity the ego's own.

Simplified against NAVSIM: vehicles are the only obstacles; the drivable area is the lanes' corridors;
nuPlan's collision classification is reduced to the two not-at-fault cases above (a lateral contact is
always at fault); the PDM-Closed proposals are open-loop IDM runs along the route (no LQR tracking or
bicycle model), blending linearly from the ego's lateral offset onto the route over the 4 s, with the
braking clipped at 4.05 m/s², and neither they nor the expert's plan pass through the tracker;
no driving-direction term.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rtdp.envs.plan_simulation import simulate
from rtdp.errors import DatasetError, MissingKeyError, RtdpError

SCENARIOS = ("highway", "merge", "roundabout", "intersection")
EGO_LENGTH, EGO_WIDTH = 5.0, 2.0
TERMS = ("nc", "dac", "ttc", "ep", "comfort", "pdms")

PLAN_STEPS, PLAN_DT = 8, 0.5
DT, N_STEPS = 0.1, 41
STOPPED_SPEED = 0.05  # m/s: below this a vehicle counts as stationary
MIN_MOVE = 0.05  # m per step: shorter moves give no reliable heading
REAR_MARGIN = 0.5  # m: an agent centre this far ahead of the ego's rear still counts as behind
DRIVABLE_TOL = 0.5  # m beyond a lane corridor still drivable: the shoulder, and the paved corner where two lanes meet at an angle
TTC_HORIZONS = (0.3, 0.6, 0.9)  # s: nuPlan's ~0.95 s time-to-collision bound, sampled
EP_MIN_REF = 5.0  # m: NAVSIM scores EP 1 when even the reference barely moves
LEAD_LATERAL = 2.0  # m: an agent this close to the route can lead the IDM
SPEED_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
FALLBACK_SPEED_LIMIT = 15.0  # m/s, PDM-Closed's target speed when the limit is unknown
IDM_A_MAX, IDM_B, IDM_S0, IDM_T, IDM_DELTA = 1.5, 2.0, 2.0, 1.5, 4.0
IDM_DECEL_MAX = 4.05  # m/s²: proposals never brake harder than a comfortable plan may
LON_ACCEL_RANGE = (-4.05, 2.40)
MAX_LAT_ACCEL, MAX_YAW_RATE, MAX_YAW_ACCEL = 4.89, 0.95, 1.93
MAX_LON_JERK, MAX_JERK = 4.13, 8.37
_CHUNK = 32  # scenes scored at once: bounds the memory of the pairwise geometry
_EPS = 1e-9

# Trailing shapes of the arrays the scorer reads (None: any size, checked for consistency).
_SCENE_SHAPES = {
    "ego_state": (4,), "agents": (None, 9), "lanes": (None, None, 4), "route": (None, 2),
    "action": (PLAN_STEPS, 2), "agent_future": (None, N_STEPS, 3), "agent_future_valid": (None, N_STEPS),
}

_SUB = int(round(PLAN_DT / DT))
_KNOT = np.minimum(np.arange(N_STEPS) // _SUB, PLAN_STEPS - 1)  # 2 Hz segment of each 10 Hz step
_FRAC = (np.arange(N_STEPS) - _SUB * _KNOT) / _SUB


class TrajectoryError(RtdpError, ValueError):
    """Plans handed to the scorer have the wrong shape or non-finite values."""


def boxes_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether oriented rectangles overlap, by the separating-axis theorem (touching is not overlap).

    Args:
        a: (..., 5) boxes (x, y, heading, length, width).
        b: (..., 5) boxes, broadcastable against ``a``.

    Returns:
        (...) bool.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, sa, cb, sb = np.cos(a[..., 2]), np.sin(a[..., 2]), np.cos(b[..., 2]), np.sin(b[..., 2])
    # |cos| and |sin| of the relative heading give every |axis_a . axis_b| the projections need
    cos_d, sin_d = np.abs(ca * cb + sa * sb), np.abs(sa * cb - ca * sb)
    la, wa, lb, wb = a[..., 3] / 2, a[..., 4] / 2, b[..., 3] / 2, b[..., 4] / 2
    dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    # on each of the four candidate axes: |centre distance| >= sum of the two projection radii separates
    separated = ((np.abs(dx * ca + dy * sa) >= la + lb * cos_d + wb * sin_d)
                 | (np.abs(-dx * sa + dy * ca) >= wa + lb * sin_d + wb * cos_d)
                 | (np.abs(dx * cb + dy * sb) >= lb + la * cos_d + wa * sin_d)
                 | (np.abs(-dx * sb + dy * cb) >= wb + la * sin_d + wa * cos_d))
    return ~separated


def _corners(boxes: np.ndarray) -> np.ndarray:
    """(..., 5) boxes -> (..., 4, 2) corners."""
    c, s = np.cos(boxes[..., 2:3]), np.sin(boxes[..., 2:3])
    sx = np.array([1.0, 1.0, -1.0, -1.0]) * boxes[..., 3:4] / 2
    sy = np.array([1.0, -1.0, -1.0, 1.0]) * boxes[..., 4:5] / 2
    return np.stack([boxes[..., 0:1] + c * sx - s * sy, boxes[..., 1:2] + s * sx + c * sy], -1)


def _ego_boxes(traj: np.ndarray) -> np.ndarray:
    """(M, T, 3) poses -> (M, T, 5) ego boxes."""
    size = np.broadcast_to([EGO_LENGTH, EGO_WIDTH], traj.shape[:-1] + (2,))
    return np.concatenate([traj, size], -1)


def _heading_from_motion(xy: np.ndarray) -> np.ndarray:
    """(M, T, 2) positions -> (M, T) direction of each step's motion, kept through (near) stops, 0 at T=0."""
    step = np.diff(xy, axis=1)
    direction = np.arctan2(step[..., 1], step[..., 0])
    moving = np.hypot(step[..., 0], step[..., 1]) >= MIN_MOVE
    last = np.maximum.accumulate(np.where(moving, np.arange(1, xy.shape[1]), 0), axis=1)
    held = np.take_along_axis(direction, np.maximum(last - 1, 0), 1)
    return np.concatenate([np.zeros_like(direction[:, :1]), np.where(last > 0, held, 0.0)], 1)


def _to_10hz(plans: np.ndarray) -> np.ndarray:
    """(M, 8, 2|3) plans -> (M, 41, 3) poses at t = 0.0 .. 4.0 s, starting at the origin."""
    knots = np.concatenate([np.zeros_like(plans[:, :1]), plans], 1)
    if plans.shape[-1] == 3:  # unwrap so that interpolation turns the short way
        knots[..., 2] = np.unwrap(knots[..., 2], axis=1)
    lo, hi = knots[:, _KNOT], knots[:, _KNOT + 1]
    poses = lo + _FRAC[None, :, None] * (hi - lo)
    if plans.shape[-1] == 3:
        return poses
    return np.concatenate([poses, _heading_from_motion(poses)[..., None]], -1)


def _tracks(scenes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Agent boxes (M, A, T, 5), velocities (M, A, T, 2) and validity (M, A, T) from the logged futures."""
    fut, agents = scenes["agent_future"], scenes["agents"]
    valid = (scenes["agent_future_valid"] > 0) & (agents[..., 8:9] > 0)  # an invalid row has no size
    step = np.diff(fut[..., :2], axis=2) / DT
    both = (valid[..., :-1] & valid[..., 1:])[..., None]
    total, count = np.zeros(fut.shape[:-1] + (2,)), np.zeros(fut.shape[:-1] + (1,))
    for sl in (np.s_[..., :-1, :], np.s_[..., 1:, :]):  # average of the forward and backward differences
        total[sl] += np.where(both, step, 0.0)
        count[sl] += both
    # an agent seen at one step only keeps the velocity reported at t = 0
    vel = np.where(count > 0, total / np.maximum(count, 1), agents[:, :, None, 4:6])
    size = np.broadcast_to(agents[:, :, None, 6:8], fut.shape[:-1] + (2,))
    return np.concatenate([fut, size], -1), vel, valid


def _nc_and_ttc(traj: np.ndarray, tracks: tuple) -> tuple[np.ndarray, np.ndarray]:
    """No-at-fault-collision and time-to-collision terms, (M,) each, of (M, T, 3) ego trajectories."""
    boxes, vel, valid = tracks
    ego = _ego_boxes(traj)[:, None]  # (M, 1, T, 5)
    ego_vel = np.gradient(traj[..., :2], DT, axis=1)[:, None]
    ego_moving = np.hypot(ego_vel[..., 0], ego_vel[..., 1]) >= STOPPED_SPEED  # (M, 1, T)
    heading = np.stack([np.cos(traj[..., 2]), np.sin(traj[..., 2])], -1)[:, None]
    ahead = np.sum((boxes[..., :2] - ego[..., :2]) * heading, -1)  # agent x in the ego's frame, (M, A, T)

    over = boxes_overlap(ego, boxes) & valid
    first = np.argmax(over, -1)[..., None]  # nuPlan counts only the first contact with each agent
    at = lambda x: np.take_along_axis(np.broadcast_to(x, over.shape), first, -1)[..., 0]  # noqa: E731
    agent_speed = np.hypot(vel[..., 0], vel[..., 1])
    not_at_fault = ~at(ego_moving) | (at(ahead) < -EGO_LENGTH / 2 + REAR_MARGIN)
    value = np.where(at(agent_speed) < STOPPED_SPEED, 0.5, 0.0)
    value = np.where(~over.any(-1) | not_at_fault, 1.0, value)
    nc = value.min(axis=1, initial=1.0)

    collided = np.logical_or.accumulate(over, axis=-1)
    watched = valid & ~collided & (ahead > 0) & ego_moving
    soon = np.zeros_like(over)
    for tau in TTC_HORIZONS:
        e, b = ego.copy(), boxes.copy()
        e[..., :2] += ego_vel * tau
        b[..., :2] += vel * tau
        soon |= boxes_overlap(e, b)
    ttc = np.where(np.any(watched & soon, axis=(1, 2)), 0.0, 1.0)
    return nc, ttc


def _dac(traj: np.ndarray, lanes: np.ndarray) -> np.ndarray:
    """Drivable-area compliance (M,) of (M, T, 3) trajectories in (M, L, P, 4) lanes."""
    pts = _corners(_ego_boxes(traj)).reshape(len(traj), -1, 2)  # (M, N, 2)
    # move each lane's valid points to the front (order kept) so a gap joins its neighbours
    order = np.argsort(lanes[..., 3] <= 0, axis=-1, kind="stable")
    lanes = np.take_along_axis(lanes, order[..., None], 2)
    valid = lanes[..., 3] > 0
    start, half = lanes[..., :-1, :2], lanes[..., :-1, 2]
    # the last valid point closes a zero-length segment, so a one-point lane is a disc
    end = np.where(valid[..., 1:, None], lanes[..., 1:, :2], start)
    half_end = np.where(valid[..., 1:], lanes[..., 1:, 2], half)
    seg_ok = valid[..., :-1]
    drivable = np.zeros(pts.shape[:2], bool)
    for lane in range(lanes.shape[1]):  # one lane at a time keeps the (M, N, S) arrays small
        if not seg_ok[:, lane].any():
            continue
        a, ab = start[:, lane, None], (end - start)[:, lane, None]  # (M, 1, S, 2)
        d = pts[:, :, None] - a
        t = np.clip(np.sum(d * ab, -1) / np.maximum(np.sum(ab * ab, -1), _EPS), 0.0, 1.0)
        dist = np.linalg.norm(d - t[..., None] * ab, axis=-1)
        width = half[:, lane, None] + t * (half_end - half)[:, lane, None]
        drivable |= np.any(seg_ok[:, lane, None] & (dist <= width + DRIVABLE_TOL), -1)
    return drivable.all(-1).astype(np.float64)


def _segments(route: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Route (M, R, 2) -> segment starts (M, S, 2), vectors (M, S, 2), lengths (M, S), arc length at starts."""
    ab = np.diff(route, axis=1)
    length = np.linalg.norm(ab, axis=-1)
    cum = np.concatenate([np.zeros_like(length[:, :1]), np.cumsum(length, 1)[:, :-1]], 1)
    return route[:, :-1], ab, length, cum


def _project(points: np.ndarray, route: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arc length (M, K), signed lateral offset (M, K) and unit tangent (M, K, 2) of points (M, K, 2) on the route.

    The nearest segment wins; the first and last segments extend beyond the route's ends, so that a plan
    longer than the route still makes progress.
    """
    a, ab, length, cum = _segments(route)
    d = points[:, :, None] - a[:, None]
    t = np.sum(d * ab[:, None], -1) / np.maximum(length**2, _EPS)[:, None]
    dist = np.linalg.norm(d - np.clip(t, 0, 1)[..., None] * ab[:, None], axis=-1)
    j = np.argmin(dist, -1)
    tj = np.take_along_axis(t, j[..., None], -1)[..., 0]
    last = ab.shape[1] - 1
    tj = np.clip(tj, np.where(j == 0, -np.inf, 0.0), np.where(j == last, np.inf, 1.0))
    lj = np.take_along_axis(length, j, 1)
    unit = np.take_along_axis(ab, j[..., None], 1) / np.maximum(lj, _EPS)[..., None]
    rel = points - np.take_along_axis(a, j[..., None], 1)
    lateral = unit[..., 0] * rel[..., 1] - unit[..., 1] * rel[..., 0]
    return np.take_along_axis(cum, j, 1) + tj * lj, lateral, unit


def _route_point(route: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position (M, K, 2) and heading (M, K) at arc lengths s (M, K), extrapolating past the ends."""
    a, ab, length, cum = _segments(route)
    j = np.clip(np.sum(cum[:, None] <= s[..., None], -1) - 1, 0, ab.shape[1] - 1)
    seg = np.take_along_axis(ab, j[..., None], 1)
    frac = (s - np.take_along_axis(cum, j, 1)) / np.maximum(np.take_along_axis(length, j, 1), _EPS)
    return np.take_along_axis(a, j[..., None], 1) + frac[..., None] * seg, np.arctan2(seg[..., 1], seg[..., 0])


def _idm_proposals(scenes: Mapping[str, np.ndarray], tracks: tuple, s0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IDM runs along the route behind the logged lead: trajectories (M, F, 41, 3) and progress (M, F)."""
    boxes, vel, valid = tracks
    route, ego_state = scenes["route"], scenes["ego_state"]
    m = len(valid)
    s_a, lat_a, tangent = _project(boxes[..., :2].reshape(m, -1, 2), route)
    s_a, lat_a = s_a.reshape(valid.shape), lat_a.reshape(valid.shape)
    v_a = np.sum(vel * tangent.reshape(vel.shape), -1)  # lead speed along the route
    on_route = valid & (np.abs(lat_a) <= LEAD_LATERAL)
    reach = EGO_LENGTH / 2 + boxes[:, :, 0, 3] / 2  # centre distance at bumper contact, (M, A)

    limit = ego_state[:, 3]
    limit = np.where(np.isfinite(limit) & (limit > 0), limit, FALLBACK_SPEED_LIMIT)
    v_des = limit[:, None] * np.asarray(SPEED_FRACTIONS)  # (M, F)
    v = np.broadcast_to(np.maximum(ego_state[:, :1], 0.0), v_des.shape).copy()
    s = np.broadcast_to(s0[:, None], v_des.shape).copy()
    hist = np.empty(v_des.shape + (N_STEPS,))
    hist[..., 0] = s
    for k in range(N_STEPS - 1):
        ahead = on_route[:, None, :, k] & (s_a[:, None, :, k] > s[..., None])  # (M, F, A)
        gap = np.where(ahead, s_a[:, None, :, k] - s[..., None] - reach[:, None], np.inf)
        lead = np.argmin(gap, -1)[..., None]
        gap = np.take_along_axis(gap, lead, -1)[..., 0]
        v_lead = np.take_along_axis(np.broadcast_to(v_a[:, None, :, k], ahead.shape), lead, -1)[..., 0]
        s_star = IDM_S0 + np.maximum(0.0, v * IDM_T + v * (v - v_lead) / (2 * np.sqrt(IDM_A_MAX * IDM_B)))
        # gap <= 0 is a collision: brake as hard as allowed (s_star / 0.1 is already huge)
        acc = IDM_A_MAX * (1 - (v / v_des) ** IDM_DELTA - (s_star / np.maximum(gap, 0.1)) ** 2)
        v_new = np.maximum(v + np.clip(acc, -IDM_DECEL_MAX, IDM_A_MAX) * DT, 0.0)
        s, v = s + 0.5 * (v + v_new) * DT, v_new
        hist[..., k + 1] = s

    n_prop = v_des.shape[1]
    xy, heading = _route_point(route, hist.reshape(m, -1))
    start, _ = _route_point(route, s0[:, None])
    blend = 1.0 - np.arange(N_STEPS) / (N_STEPS - 1)  # from the ego's pose at t = 0 onto the route at 4 s
    xy = xy.reshape(m, n_prop, N_STEPS, 2) - start[:, :, None, :] * blend[:, None]
    heading = heading.reshape(m, n_prop, N_STEPS)
    heading[..., 0] = 0.0
    return np.concatenate([xy, heading[..., None]], -1), hist[..., -1] - s0[:, None]


def _savgol_operators(n: int, window: int, order: int, dt: float) -> list[np.ndarray]:
    """(n, n) matrices ``D_d`` with ``D_d @ y`` the d-th derivative (d = 0..order) of a Savitzky-Golay fit.

    Each sample's value comes from the least-squares polynomial of degree ``order`` over the ``window``
    samples around it; at the ends the window is the first or last ``window`` samples (SciPy's
    ``mode="interp"``), so the ends are not padded with invented data.
    """
    ops = [np.zeros((n, n)) for _ in range(order + 1)]
    half = window // 2
    for i in range(n):
        lo = min(max(0, i - half), n - window)
        t = (np.arange(lo, lo + window) - i) * dt
        fit = np.linalg.pinv(np.vander(t, order + 1, increasing=True))  # coefficients of t^0..t^order
        for d in range(order + 1):
            ops[d][i, lo:lo + window] = fit[d] * np.prod(np.arange(1, d + 1))
    return ops


# comfort of a plan itself: its poses' derivatives through a quadratic Savitzky-Golay filter of 0.7 s
COMFORT_WINDOW, COMFORT_ORDER = 7, 2
_SG = _savgol_operators(N_STEPS, COMFORT_WINDOW, COMFORT_ORDER, DT)


def _comfort(traj: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """nuPlan's comfort check (M,) on the 10 Hz trajectories (M, 41, 3) starting at the current pose.

    Velocity, acceleration, yaw rate and jerk are Savitzky-Golay derivatives of the poses; the first
    velocity is the ego's measured one (``speed`` (M,) along x), so a plan that starts at another speed
    pays for the jump.
    """
    d1, d2 = _SG[1], _SG[2]
    xy = traj[..., :2]
    vel = np.einsum("ij,mjk->mik", d1, xy)
    vel[:, 0] = np.stack([speed, np.zeros_like(speed)], -1)
    acc = np.einsum("ij,mjk->mik", d1, vel)
    moving = np.linalg.norm(vel, axis=-1) >= MIN_MOVE / DT  # slower: no reliable heading
    idx = np.maximum.accumulate(np.where(moving, np.arange(xy.shape[1]), 0), axis=1)
    heading = np.where(idx > 0, np.take_along_axis(np.arctan2(vel[..., 1], vel[..., 0]), idx, 1), 0.0)
    heading = np.unwrap(heading, axis=1)
    lon = acc[..., 0] * np.cos(heading) + acc[..., 1] * np.sin(heading)
    lat = -acc[..., 0] * np.sin(heading) + acc[..., 1] * np.cos(heading)
    yaw_rate = heading @ d1.T
    ok = ((lon >= LON_ACCEL_RANGE[0]) & (lon <= LON_ACCEL_RANGE[1]) & (np.abs(lat) <= MAX_LAT_ACCEL)
          & (np.abs(yaw_rate) <= MAX_YAW_RATE) & (np.abs(heading @ d2.T) <= MAX_YAW_ACCEL)
          & (np.abs(lon @ d1.T) <= MAX_LON_JERK)
          & (np.linalg.norm(np.einsum("ij,mjk->mik", d1, acc), axis=-1) <= MAX_JERK))
    return ok.all(-1).astype(np.float64)


# NAVSIM on simulated states: accelerations smoothed over 0.8 s, jerks differentiated over 1.5 s, yaw over 0.5 s
_ACC_SMOOTH = _savgol_operators(N_STEPS, 8, 2, DT)[0]
_JERK_D1 = _savgol_operators(N_STEPS, 15, 2, DT)[1]
_YAW_D1 = _savgol_operators(N_STEPS, 5, 2, DT)[1]
_YAW_D2 = _savgol_operators(N_STEPS, 5, 3, DT)[2]


def _comfort_tracked(poses: np.ndarray, speed: np.ndarray, accel: np.ndarray) -> np.ndarray:
    """NAVSIM's comfort check (M,) on a tracking vehicle's states: poses (M, 41, 3), speed and acceleration
    (M, 41). The lateral acceleration is the centripetal ``speed × yaw rate`` (nuPlan reads it from the
    rear axle's frame, where a kinematic bicycle has none: this is the stricter, physical reading)."""
    heading = np.unwrap(poses[..., 2], axis=1)
    yaw_rate = heading @ _YAW_D1.T
    lon, lat = accel @ _ACC_SMOOTH.T, (speed * yaw_rate) @ _ACC_SMOOTH.T
    ok = ((lon >= LON_ACCEL_RANGE[0]) & (lon <= LON_ACCEL_RANGE[1]) & (np.abs(lat) <= MAX_LAT_ACCEL)
          & (np.abs(yaw_rate) <= MAX_YAW_RATE) & (np.abs(heading @ _YAW_D2.T) <= MAX_YAW_ACCEL)
          & (np.abs(lon @ _JERK_D1.T) <= MAX_LON_JERK) & (np.abs(np.hypot(lon, lat) @ _JERK_D1.T) <= MAX_JERK))
    return ok.all(-1).astype(np.float64)


def _check(plans: np.ndarray, scenes: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Validate the inputs; returns float64 copies."""
    missing = [k for k in _SCENE_SHAPES if k not in scenes]
    if missing:
        raise MissingKeyError(f"scenes lack {missing}; score_plans needs {list(_SCENE_SHAPES)} from the highway "
                              "scene format, each with a leading batch axis")
    plans = np.array(plans, dtype=np.float64)
    if plans.ndim != 3 or plans.shape[1] != PLAN_STEPS or plans.shape[2] not in (2, 3):
        raise TrajectoryError(f"plans must have shape (B, 8, 2) or (B, 8, 3): (x, y[, heading]) in the ego frame at "
                              f"t = 0.5 .. 4.0 s; got {plans.shape}. Squeeze the horizon axis of (B, 1, 8, 2).")
    if not np.isfinite(plans).all():
        bad = np.flatnonzero(~np.isfinite(plans).all(axis=(1, 2)))
        raise TrajectoryError(f"plans of scenes {bad[:10].tolist()} hold NaN or inf; a planner must return finite poses")
    n = len(plans)
    out = {}
    for key, tail in _SCENE_SHAPES.items():
        arr = np.asarray(scenes[key], dtype=np.float64)
        if arr.shape[:1] != (n,):
            raise TrajectoryError(f"plans hold {n} scenes but scenes[{key!r}] holds {arr.shape[:1]}; "
                                  "pass one plan per scene")
        if arr.ndim != len(tail) + 1 or any(t is not None and t != s for t, s in zip(tail, arr.shape[1:])):
            raise DatasetError(f"scenes[{key!r}] has shape {arr.shape}; the highway scene format wants (B, "
                               f"{', '.join('*' if t is None else str(t) for t in tail)})")
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr.reshape(n, -1)).all(1))
            raise DatasetError(f"scenes[{key!r}] of scenes {bad[:10].tolist()} holds NaN or inf; rebuild those scenes")
        out[key] = arr
    n_agents = {out[k].shape[1] for k in ("agents", "agent_future", "agent_future_valid")}
    if len(n_agents) != 1:
        raise DatasetError(f"agents, agent_future and agent_future_valid disagree on the number of agents: {n_agents}")
    if out["route"].shape[1] < 2:
        raise DatasetError("scenes['route'] needs at least 2 points to measure progress along it")
    no_lanes = np.flatnonzero(~(out["lanes"][..., 3] > 0).reshape(n, -1).any(1))
    if len(no_lanes):
        raise DatasetError(f"scene {int(no_lanes[0])}: no lanes in range (no valid point in scenes['lanes']), so its "
                           f"drivable area is empty; drop such scenes (all: {no_lanes[:10].tolist()}) before scoring")
    return plans, out


def score_plans(plans: np.ndarray, scenes: Mapping[str, np.ndarray], *,
                tracked: bool = True) -> dict[str, np.ndarray]:
    """PDM score of one 4 s plan per scene.

    Args:
        plans: (B, 8, 2) or (B, 8, 3) (x, y[, heading]) in the ego frame at t = 0.5 .. 4.0 s.
        scenes: batched scene arrays (the highway scene format's keys, each with leading axis B); reads
            ``ego_state``, ``agents``, ``lanes``, ``route``, ``action``, ``agent_future``, ``agent_future_valid``.
        tracked: score the states of a vehicle tracking the plan (NAVSIM's simulation,
            :mod:`rtdp.envs.plan_simulation`); false scores the interpolated plan itself.

    Returns:
        ``{term: (B,) float64}`` for every name in :data:`TERMS`, plus ``"progress"`` (B,) and
        ``"ref_progress"`` (B,) in metres along the route.

    Raises:
        TrajectoryError: plans of the wrong shape, batch size, or with non-finite values.
        MissingKeyError: a scene array is missing.
        DatasetError: a scene array is malformed, or a scene has no valid lane point.
    """
    plans, scenes = _check(plans, scenes)
    n = len(plans)
    out = {k: np.zeros(n) for k in (*TERMS, "progress", "ref_progress")}
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, n))
        sc = {k: v[sl] for k, v in scenes.items()}
        m, route = sl.stop - sl.start, sc["route"]
        tracks = _tracks(sc)
        s0 = _project(np.zeros((m, 1, 2)), route)[0][:, 0]
        traj = _to_10hz(plans[sl])
        if tracked:
            traj, speed, accel = simulate(traj, sc["ego_state"][:, 0], _SG[1], DT)
            comfort = _comfort_tracked(traj, speed, accel)
        else:
            comfort = _comfort(traj, sc["ego_state"][:, 0])
        nc, ttc = _nc_and_ttc(traj, tracks)
        dac = _dac(traj, sc["lanes"])
        progress = np.maximum(_project(traj[:, -1:, :2], route)[0][:, 0] - s0, 0.0)

        # the reference: the best safe progress among the IDM proposals and the expert's logged plan
        proposals, prop_progress = _idm_proposals(sc, tracks, s0)
        n_prop = proposals.shape[1]
        cand = np.concatenate([proposals, _to_10hz(sc["action"])[:, None]], 1).reshape(-1, N_STEPS, 3)
        rep = lambda x: np.repeat(x, n_prop + 1, axis=0)  # noqa: E731
        c_nc, _ = _nc_and_ttc(cand, tuple(rep(x) for x in tracks))
        safe = ((c_nc == 1.0) & (_dac(cand, rep(sc["lanes"])) == 1.0)).reshape(m, n_prop + 1)
        expert = _project(sc["action"][:, -1:], route)[0][:, 0] - s0
        cand_progress = np.concatenate([prop_progress, expert[:, None]], 1)
        ref = np.maximum(np.where(safe, cand_progress, 0.0).max(1), 0.0)
        ep = np.where(ref < EP_MIN_REF, 1.0, np.clip(progress / np.maximum(ref, _EPS), 0.0, 1.0))

        terms = {"nc": nc, "dac": dac, "ttc": ttc, "ep": ep, "comfort": comfort,
                 "pdms": nc * dac * (5 * ep + 5 * ttc + 2 * comfort) / 12, "progress": progress, "ref_progress": ref}
        for k, v in terms.items():
            out[k][sl] = v
    return out


def summarize(scores: Mapping[str, np.ndarray], scenario: np.ndarray) -> dict:
    """Mean terms over all scenes and per scenario.

    Args:
        scores: :func:`score_plans`'s output (at least the names in :data:`TERMS`), (B,) each.
        scenario: (B,) or (B, 1) indices into :data:`SCENARIOS`.

    Returns:
        ``{"scenes": B, "pdms", "nc", "dac", "ttc", "ep", "comfort": mean fractions,
        "per_scenario": {name: the same keys}}`` with plain floats and ints, only for scenarios present.
    """
    missing = [k for k in TERMS if k not in scores]
    if missing:
        raise MissingKeyError(f"scores lack {missing}; pass the dict score_plans returned")
    scenario = np.asarray(scenario, dtype=np.float64).reshape(-1)
    n = len(scenario)
    if n == 0:
        raise DatasetError("no scenes to summarize; score at least one scene")
    if any(np.shape(scores[k]) != (n,) for k in TERMS):
        raise DatasetError(f"scores hold {[np.shape(scores[k]) for k in TERMS]} values but scenario holds {n}")
    index = np.rint(scenario).astype(int)
    if not np.all((index == scenario) & (index >= 0) & (index < len(SCENARIOS))):
        raise DatasetError(f"scenario must hold integer indices into {SCENARIOS}; got {np.unique(scenario)[:10]}")
    order = ("pdms", "nc", "dac", "ttc", "ep", "comfort")

    def means(mask: np.ndarray) -> dict:
        return {"scenes": int(mask.sum()), **{k: float(np.mean(np.asarray(scores[k])[mask])) for k in order}}

    out = means(np.ones(n, bool))
    out["per_scenario"] = {SCENARIOS[i]: means(index == i) for i in range(len(SCENARIOS)) if np.any(index == i)}
    return out
