"""How a vehicle would drive a plan: NAVSIM's proposal simulation, batched.

NAVSIM v1 scores the states a tracker produces while following a plan, not the plan's poses: a 4 s plan
is interpolated to 10 Hz, tracked by an LQR controller and propagated by a kinematic bicycle model, and
every PDM term is read from those simulated states. This module does the same for (M, 41, 3) reference
trajectories in the ego frame (x forward, y left, heading), starting at the origin with the ego's speed.

The controller follows nuPlan's decomposition. Longitudinally, one acceleration per step minimises
``q (v + a·H·dt − v_ref(t + H·dt))² + r a²`` (the speed error one lookahead ahead). Laterally, the
state (lateral error, heading error, steering angle) against the reference pose of the current step
evolves linearly over the next H steps for the speed and curvature profile ahead; one steering rate,
held over the horizon, minimises the final state's quadratic cost plus the rate's. Near a stop
(reference and vehicle below 0.2 m/s) a proportional loop brakes and the steering holds.

The bicycle passes its commands through nuPlan's first-order lags (0.2 s on acceleration, 0.05 s on
the steering angle) and integrates with Euler steps.

Simplified against nuPlan: the reference speed and curvature come from Savitzky-Golay derivatives of
the interpolated poses instead of a jerk-penalised least-squares fit; the bicycle's reference point is
the vehicle's centre; the initial steering angle and acceleration are 0; speed never goes below 0.
"""

from __future__ import annotations

import numpy as np

WHEELBASE = 3.089  # m (nuPlan's vehicle)
MAX_STEER = np.pi / 3  # rad
HORIZON = 10  # steps ahead the controller looks
Q_SPEED, R_ACCEL = 10.0, 1.0
Q_LATERAL, R_STEER_RATE = np.diag([1.0, 10.0, 0.0]), 1.0
STOP_SPEED, STOP_GAIN = 0.2, 0.5
ACCEL_LAG, STEER_LAG = 0.2, 0.05  # s: time constants of the actuators' first-order lags
_MIN_SPEED = 0.1  # m/s: slower, the reference heading is not read from the motion


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def reference_profiles(ref: np.ndarray, d1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speed (M, T) and curvature (M, T) of (M, T, 3) reference poses; ``d1`` (T, T) differentiates in time."""
    vel = np.einsum("ij,mjk->mik", d1, ref[..., :2])
    speed = np.linalg.norm(vel, axis=-1)
    yaw_rate = np.unwrap(ref[..., 2], axis=1) @ d1.T
    curvature = np.where(speed > _MIN_SPEED, yaw_rate / np.maximum(speed, _MIN_SPEED), 0.0)
    return speed, curvature


def simulate(ref: np.ndarray, speed0: np.ndarray, d1: np.ndarray, dt: float) -> tuple[np.ndarray, ...]:
    """A vehicle tracking the reference poses ``ref`` (M, T, 3): its poses (M, T, 3) (x, y, heading),
    speeds (M, T) and longitudinal accelerations (M, T) (the lagged acceleration state).

    Args:
        ref: reference poses at ``dt`` spacing, ``ref[:, 0]`` the vehicle's pose at t = 0 (the origin).
        speed0: (M,) the vehicle's speed at t = 0 along its heading, m/s.
        d1: (T, T) first-derivative operator over the time axis (a Savitzky-Golay filter's).
        dt: seconds between states.
    """
    m, n = ref.shape[:2]
    v_ref, kappa = reference_profiles(ref, d1)
    out, speeds, accels = np.zeros((m, n, 3)), np.zeros((m, n)), np.zeros((m, n))
    out[:, 0] = ref[:, 0]
    x, y, heading = (ref[:, 0, i].copy() for i in range(3))
    v, steer, acc = np.maximum(np.asarray(speed0, dtype=np.float64), 0.0), np.zeros(m), np.zeros(m)
    speeds[:, 0] = v
    steps, b = np.arange(HORIZON), HORIZON * dt  # b: how much one acceleration moves the speed H steps ahead
    for k in range(n - 1):
        look = min(k + HORIZON, n - 1)
        accel = Q_SPEED * b * (v_ref[:, look] - v) / (Q_SPEED * b * b + R_ACCEL)
        stopping = (v_ref[:, look] <= STOP_SPEED) & (v <= STOP_SPEED)
        accel = np.where(stopping, -STOP_GAIN * (v - v_ref[:, look]), accel)

        # lateral: z_H = A z_0 + B u + g over the horizon's speeds and curvatures
        rx, ry, rh = ref[:, k, 0], ref[:, k, 1], ref[:, k, 2]
        z = np.stack([-(x - rx) * np.sin(rh) + (y - ry) * np.cos(rh), _wrap(heading - rh), steer], -1)
        v_ahead = v[:, None] + accel[:, None] * steps * dt  # (M, H)
        curv = kappa[:, np.minimum(k + steps, n - 1)]
        a_mat = np.broadcast_to(np.eye(3), (m, 3, 3)).copy()
        b_vec, g_vec = np.zeros((m, 3)), np.zeros((m, 3))
        for j in range(HORIZON):
            step = np.broadcast_to(np.eye(3), (m, 3, 3)).copy()
            step[:, 0, 1] = v_ahead[:, j] * dt
            step[:, 1, 2] = v_ahead[:, j] * dt / WHEELBASE
            a_mat = step @ a_mat
            b_vec = np.einsum("mij,mj->mi", step, b_vec) + np.array([0.0, 0.0, dt])
            g_vec = np.einsum("mij,mj->mi", step, g_vec)
            g_vec[:, 1] -= v_ahead[:, j] * curv[:, j] * dt
        free = np.einsum("mij,mj->mi", a_mat, z) + g_vec
        qb = b_vec @ Q_LATERAL
        rate = -np.sum(qb * free, -1) / (np.sum(qb * b_vec, -1) + R_STEER_RATE)
        rate = np.where(stopping, 0.0, rate)

        # the actuators' lags, then one Euler step of the kinematic bicycle
        acc = acc + dt / (dt + ACCEL_LAG) * (accel - acc)
        new_steer = np.clip(steer + dt / (dt + STEER_LAG) * rate * dt, -MAX_STEER, MAX_STEER)
        x = x + v * np.cos(heading) * dt
        y = y + v * np.sin(heading) * dt
        heading = heading + v * np.tan(steer) / WHEELBASE * dt
        v, steer = np.maximum(v + acc * dt, 0.0), new_steer
        out[:, k + 1], speeds[:, k + 1], accels[:, k + 1] = np.stack([x, y, heading], -1), v, acc
    return out, speeds, accels
