"""A simulated robot: an rtdp environment in its own process, advancing on the wall clock.

The environment steps every ``1 / rate_hz`` seconds whether or not a command
arrived, applying the newest command it has (or holding still before the
first one), exactly as a robot keeps moving while its controller thinks. The
loop therefore meets the timing problems real hardware poses: late commands
are applied late, a stalled controller leaves the robot holding, and the
observation it reads was taken some time before it reads it.

Each published observation carries the monotonic time at which the
environment produced it (``CLOCK_MONOTONIC`` is system-wide on Linux, so the
two processes share one time axis).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import numpy as np

from rtdp.controllers._process import stop_process
from rtdp.controllers.drivers.base import ActionLimits, DriverBase, Reading
from rtdp.errors import ActionError, ConfigError, DeviceDisconnectedError, DeviceNotConnectedError, DriverError


def _sim_main(task_name: str, rate_hz: float, conn, module: str | None = None) -> None:
    """Body of the simulator process."""
    from rtdp.envs import get_task, make

    try:
        task = get_task(task_name, module)  # module: where a task registered outside rtdp lives
        env = make(task)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", task.action_dim, [float(v) for v in env.action_space.low],
               [float(v) for v in env.action_space.high]))
    dt = 1.0 / rate_hz
    running, command, obs, next_tick = False, None, None, 0.0
    steps, overruns = 0, 0
    try:
        while True:
            timeout = max(0.0, next_tick - time.monotonic()) if running else 0.05
            while conn.poll(timeout):  # commands until the next tick is due
                msg = conn.recv()
                kind = msg[0]
                if kind == "cmd":
                    command = np.asarray(msg[1], dtype=np.float64)
                elif kind == "reset":
                    obs, _ = env.reset(seed=int(msg[1]))
                    command, steps, running = None, 0, True
                    t = time.monotonic()
                    conn.send(("obs", t, obs, {"score": 0.0, "is_success": False, "episode_done": False,
                                               "step": 0}))
                    next_tick = t + dt
                elif kind == "hold":
                    command = None
                elif kind == "close":
                    return
                timeout = max(0.0, next_tick - time.monotonic()) if running else 0.05
            if not running or time.monotonic() < next_tick:
                continue
            act = task.hold(obs) if command is None else command
            obs, _, terminated, truncated, info = env.step(act.astype(np.float32))
            steps += 1
            t = time.monotonic()
            done = bool(terminated or truncated)
            conn.send(("obs", t, obs, {"score": float(info.get("score", 0.0)),
                                       "is_success": bool(info.get("is_success", False)),
                                       "episode_done": done, "step": steps}))
            if done:
                running = False
            # the next tick stays on the grid; a late step is not followed by a catch-up burst
            next_tick += dt
            if t > next_tick:
                overruns += int((t - next_tick) // dt) + 1
                next_tick += (int((t - next_tick) // dt) + 1) * dt
    except (EOFError, OSError, KeyboardInterrupt):
        return
    finally:
        env.close()


class SimDriver(DriverBase):
    """Drive an rtdp task's environment as if it were hardware.

    Args:
        task: task name (``pusht``, ``pusht_goal``, ``lift``, or any registered task with a
            ``hold_action``).
        rate_hz: how fast the environment advances; default: the task's ``control_rate_hz``.
        max_delta: per-cycle command change limit for the safety layer (None: unlimited).
        start_timeout_s: how long to wait for the simulator process to come up.
    """

    name = "sim"
    # the controller reads half a period after each environment step (see Controller.run_episode)
    loop_phase = 0.5

    def __init__(self, task: str, rate_hz: float | None = None, *, max_delta: float | None = None,
                 start_timeout_s: float = 60.0) -> None:
        from rtdp.envs import get_task

        self.task = get_task(task)
        if not self.task.hold_action:
            # checked here, not at the first tick without a command inside the simulator process
            raise ConfigError(f"the sim driver cannot run task {task!r}: it has no hold_action, so the robot "
                              "could not be kept still before the first command or after stop()")
        if rate_hz is not None and not float(rate_hz) > 0:
            raise ConfigError(f"rate_hz must be positive; got {rate_hz!r}")
        self.rate_hz = float(rate_hz) if rate_hz is not None else float(self.task.control_rate_hz)
        self.max_delta = max_delta
        self.start_timeout_s = start_timeout_s
        self.action_dim = self.task.action_dim
        self._proc = None
        self._conn = None
        self._latest: Reading | None = None
        self._low = self._high = None

    def connect(self) -> None:
        if self._proc is not None:
            return
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        from rtdp.envs import TASK_MODULES

        self._proc = ctx.Process(target=_sim_main, daemon=True, name=f"rtdp-sim-{self.task.name}",
                                 args=(self.task.name, self.rate_hz, child, TASK_MODULES.get(self.task.name)))
        self._proc.start()
        child.close()
        if not self._conn.poll(self.start_timeout_s):
            self.close()
            raise DriverError(f"the {self.task.name} simulator did not start within {self.start_timeout_s:.0f} s")
        msg = self._conn.recv()
        if msg[0] == "error":
            self.close()
            raise DriverError(f"the {self.task.name} simulator failed to start: {msg[1]}")
        _, dim, low, high = msg
        self.action_dim, self._low, self._high = int(dim), np.asarray(low), np.asarray(high)

    def _require(self):
        if self._proc is None or self._conn is None:
            raise DeviceNotConnectedError("the sim driver is not connected; call connect() or use `with driver:`")
        return self._conn

    def reset(self, seed: int) -> Reading:
        """Start an episode with ``seed``; returns its first observation."""
        conn = self._require()
        self._latest = None
        conn.send(("reset", int(seed)))
        return self.read(wait_s=self.start_timeout_s)

    def read(self, wait_s: float = 1.0) -> Reading:
        """The newest observation (waits up to ``wait_s`` for the first one of an episode)."""
        conn = self._require()
        try:
            while conn.poll(0 if self._latest is not None else wait_s):
                msg = conn.recv()
                if msg[0] == "obs":
                    self._latest = Reading(msg[1], msg[2], msg[3])
        except (EOFError, OSError) as exc:
            raise DeviceDisconnectedError(f"the {self.task.name} simulator process went away") from exc
        if self._latest is None:
            if not self._proc.is_alive():
                raise DeviceDisconnectedError(f"the {self.task.name} simulator process exited "
                                              f"(code {self._proc.exitcode})")
            raise DriverError(f"no observation from the {self.task.name} simulator within {wait_s:.1f} s; "
                              "call reset(seed) first")
        return self._latest

    def write(self, action: np.ndarray) -> None:
        conn = self._require()
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,) or not bool(np.isfinite(a).all()):
            raise ActionError(f"sim command must be finite with shape ({self.action_dim},), got {a!r}")
        try:
            conn.send(("cmd", a))
        except (BrokenPipeError, OSError) as exc:
            raise DeviceDisconnectedError(f"the {self.task.name} simulator process went away") from exc

    def stop(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(("hold",))
        except (BrokenPipeError, OSError, ValueError):
            pass

    def close(self) -> None:
        if self._proc is None:
            return
        stop_process(self._conn, self._proc, ("close",))
        self._proc = self._conn = None

    @property
    def limits(self) -> ActionLimits:
        if self._low is None:
            raise DeviceNotConnectedError("limits are known after connect()")
        delta = None if self.max_delta is None else np.full(self.action_dim, float(self.max_delta))
        return ActionLimits(self._low.astype(np.float64), self._high.astype(np.float64), delta)

    def info(self) -> dict[str, Any]:
        return {"task": self.task.name, "rate_hz": self.rate_hz}
