"""Inference beside the control loop: the policy runs while the current chunk executes.

Two workers with one interface (``submit``, ``poll``, ``busy``, ``close``):

* ``ProcessWorker`` (default): the policy lives in its own process, at a lower
  scheduling priority (``nice``). The loop's process never waits for the
  interpreter lock held by the sampler's Python code, and the kernel gives the
  loop the CPU first when both want it. Measured by ``benchmarks/control.sh``
  (``rtdp control ... worker=thread`` against ``worker=process``).
* ``ThreadWorker``: the policy in a thread of the loop's process; cheaper to
  start and shares memory, but the sampler's Python between torch calls holds
  the GIL the loop needs to wake up on time.

``InlineWorker`` computes a result on submit and releases it after a given
latency on the loop's (fake) clock, so unit tests can script slow or late
inference exactly.

A policy is described by a ``PolicySpec`` (a checkpoint or a freshly
initialised network of a named size, plus the inference setting) so the
worker process can build it itself; nothing is pickled but plain values.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rtdp.controllers._process import stop_process
from rtdp.errors import ConfigError, RtdpError

WORKERS = ("process", "thread")


@dataclass(frozen=True)
class PolicySpec:
    """How to build the policy and its inference setting, in plain values.

    Attributes:
        checkpoint: a checkpoint folder; None for a fresh network (timing only).
        size: U-Net size of a fresh network (``small`` .. ``dp_lowdim``).
        policy: policy family of a fresh network (``rtdp.policies.registry``: ``unet``, ``edm``, ``consistency``).
        modules: modules the worker process imports first (where a family or task registered outside rtdp lives).
        obs_shapes: observation key -> shape of one step, for a fresh network.
        action_low, action_high: action range of a fresh network (its normaliser).
        sampler, steps, precision, deepcache: the ``Runner`` setting.
        seed: sampling-noise seed.
        threads: torch threads of the worker.
        nice: scheduling-priority increment of the worker process (process worker only).
        cpus: CPUs the worker process is pinned to (process worker only; None: any).
    """

    checkpoint: str | None = None
    size: str | None = None
    policy: str = "unet"
    modules: tuple[str, ...] = ()
    obs_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    sampler: str | None = None
    steps: int | None = None
    precision: str | None = None
    deepcache: int | None = None
    seed: int = 0
    threads: int = 2
    nice: int = 10
    cpus: tuple[int, ...] | None = None


def fresh_policy(spec: PolicySpec):
    """A randomly initialised policy of ``spec.size`` for the given shapes (timing runs)."""
    from rtdp.policies.registry import fresh_policy as fresh

    if spec.size is None:
        raise ConfigError("a fresh policy needs size= (small | medium | dp_lowdim | dp_image)")
    return fresh(spec.policy, spec.size, lowdim_shapes=spec.obs_shapes, action_low=spec.action_low,
                 action_high=spec.action_high, seed=spec.seed)


def build_runner(spec: PolicySpec):
    """The ``Runner`` a spec describes (loads the checkpoint or builds a fresh network)."""
    from rtdp.policies import load_policy
    from rtdp.policies.runner import Runner

    policy = load_policy(spec.checkpoint) if spec.checkpoint else fresh_policy(spec)
    policy.eval()
    return Runner(policy, spec.sampler, spec.steps, seed=spec.seed, precision=spec.precision,
                  deepcache=spec.deepcache)


@dataclass(frozen=True)
class InferenceResult:
    """One action chunk and when it was computed.

    Attributes:
        actions: (Ta, D) in env / driver units.
        t_obs: time of the observation it was predicted from.
        t_submit, t_done: when the loop asked and when the loop received the chunk
            (loop clock; the loop looks once per cycle, so this is a whole number of periods).
        nfe: network evaluations.
        compute_s: time the policy itself took (measured by the worker).
    """

    actions: np.ndarray
    t_obs: float
    t_submit: float
    t_done: float
    nfe: int
    compute_s: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.t_done - self.t_submit


class InferenceError(RtdpError):
    """The inference worker failed or died."""


def _predict(runner, obs: dict[str, np.ndarray], inpaint) -> tuple[np.ndarray, int, float]:
    t0 = time.perf_counter()
    batch = {k: np.asarray(v)[None] for k, v in obs.items()}
    if inpaint is not None:
        inpaint = (np.asarray(inpaint[0])[None], np.asarray(inpaint[1]))
    # the whole rest of the horizon comes back: the controller executes n_action_steps of it
    # and keeps the others in reserve for when the next chunk is late
    actions = runner.predict(batch, np.zeros(1, dtype=np.int64), inpaint=inpaint,
                             n_actions=None if runner.stream is not None else runner.plan_length)
    out = np.asarray(actions[0], dtype=np.float64)
    return out, int(runner.last_nfe), time.perf_counter() - t0


def _worker_main(spec_dict: dict[str, Any], conn) -> None:
    """Body of the worker process: build the runner, then answer requests until told to stop."""
    if spec_dict.get("cpus"):
        # before torch starts its thread pool, which inherits the mask
        os.sched_setaffinity(0, set(spec_dict["cpus"]))
    import torch

    try:
        if spec_dict.get("nice"):
            os.nice(int(spec_dict["nice"]))
        torch.set_num_threads(int(spec_dict["threads"]))
        for module in spec_dict.get("modules") or ():
            importlib.import_module(module)  # registers a family or task defined outside rtdp
        spec = PolicySpec(**{**spec_dict, "obs_shapes": {k: tuple(v) for k, v in spec_dict["obs_shapes"].items()}})
        runner = build_runner(spec)
        conn.send(("ready", runner.n_action_steps, runner.plan_length))
    except Exception as exc:  # reported to the loop, which raises a typed error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "reset":
            runner.reset()
            continue
        _, req_id, obs, inpaint = msg
        try:
            actions, nfe, compute_s = _predict(runner, obs, inpaint)
            conn.send(("result", req_id, actions, nfe, compute_s))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _WorkerBase:
    """Bookkeeping shared by the workers: one request in flight at a time."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self._pending: tuple[int, float, float] | None = None  # (id, t_obs, t_submit)
        self._next_id = 0
        self.n_action_steps = 0  # actions executed per chunk (Ta)
        self.plan_length = 0     # actions a chunk carries (Ta plus the reserve)

    @property
    def busy(self) -> bool:
        """A request is in flight."""
        return self._pending is not None

    def _start(self, t_obs: float) -> int:
        if self._pending is not None:
            raise InferenceError("a request is already in flight; poll() it first")
        self._next_id += 1
        self._pending = (self._next_id, float(t_obs), self.clock.now())
        return self._next_id

    def _finish(self, actions: np.ndarray, nfe: int, compute_s: float = 0.0) -> InferenceResult:
        _, t_obs, t_submit = self._pending
        self._pending = None
        return InferenceResult(actions, t_obs, t_submit, self.clock.now(), nfe, compute_s)

    def warmup(self, obs: dict[str, np.ndarray], n: int = 5, idle=None) -> list[float]:
        """Run ``n`` blocking requests (excluded from statistics); returns their compute times (s).

        Args:
            idle: called every ~20 ms while waiting (e.g. a driver read that keeps a
                servo bus watchdog fed).
        """
        lat = []
        for _ in range(n):
            self.submit(obs, self.clock.now())
            t_idle = time.monotonic()
            while (res := self.poll()) is None:
                time.sleep(0.0005)
                if idle is not None and time.monotonic() - t_idle > 0.02:
                    idle()
                    t_idle = time.monotonic()
            lat.append(res.compute_s or res.latency_s)
        self.reset()
        return lat


class ProcessWorker(_WorkerBase):
    """The policy in its own (spawned) process.

    Args:
        spec: what to build in the worker.
        clock: the loop's clock (for timestamps).
        start_timeout_s: how long to wait for the worker to load the policy.
        idle: called every ~20 ms while the worker starts (see ``warmup``).
    """

    def __init__(self, spec: PolicySpec, clock, *, start_timeout_s: float = 120.0, idle=None) -> None:
        super().__init__(clock)
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools in a broken state
        self._conn, child = ctx.Pipe()
        d = asdict(spec)
        self._proc = ctx.Process(target=_worker_main, args=(d, child), daemon=True, name="rtdp-inference")
        self._proc.start()
        child.close()
        t_end = time.monotonic() + start_timeout_s
        while not self._conn.poll(0.02):
            if time.monotonic() > t_end or not self._proc.is_alive():
                self.close()
                raise InferenceError(f"the inference worker did not start within {start_timeout_s:.0f} s")
            if idle is not None:
                idle()
        msg = self._conn.recv()
        if msg[0] == "error":
            self.close()
            raise InferenceError(f"the inference worker could not build the policy: {msg[1]}")
        self.n_action_steps, self.plan_length = int(msg[1]), int(msg[2])

    def submit(self, obs: dict[str, np.ndarray], t_obs: float, inpaint=None) -> None:
        req = self._start(t_obs)
        self._conn.send(("predict", req, obs, inpaint))

    def poll(self) -> InferenceResult | None:
        if self._pending is None or not self._conn.poll():
            if self._pending is not None and not self._proc.is_alive():
                raise InferenceError(f"the inference worker died (exit code {self._proc.exitcode})")
            return None
        msg = self._conn.recv()
        if msg[0] == "error":
            self._pending = None
            raise InferenceError(f"inference failed in the worker: {msg[1]}")
        return self._finish(msg[2], msg[3], msg[4])

    def reset(self) -> None:
        """New episode (clears streaming buffers in the worker)."""
        self._conn.send(("reset",))

    @property
    def pid(self) -> int:
        """Process id of the worker."""
        return int(self._proc.pid)

    def close(self) -> None:
        stop_process(self._conn, self._proc, ("stop",))


class ThreadWorker(_WorkerBase):
    """The policy in a thread of the loop's process.

    Args:
        runner: a ``Runner`` (or anything with ``predict``, ``reset``, ``n_action_steps``, ``last_nfe``).
        clock: the loop's clock.
    """

    def __init__(self, runner, clock) -> None:
        super().__init__(clock)
        self.runner = runner
        self.n_action_steps, self.plan_length = int(runner.n_action_steps), int(runner.plan_length)
        self._result: tuple[np.ndarray, int, float] | BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, obs: dict[str, np.ndarray], t_obs: float, inpaint=None) -> None:
        self._start(t_obs)
        self._result = None

        def work() -> None:
            # a thread inherits its creator's scheduling; a real-time loop's worker must not
            if hasattr(os, "sched_setscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            try:
                self._result = _predict(self.runner, obs, inpaint)
            except BaseException as exc:  # handed to the loop thread
                self._result = exc

        self._thread = threading.Thread(target=work, daemon=True, name="rtdp-inference")
        self._thread.start()

    def poll(self) -> InferenceResult | None:
        if self._pending is None or self._thread is None or self._thread.is_alive():
            return None
        res = self._result
        if isinstance(res, BaseException):
            self._pending = None
            raise InferenceError(f"inference failed: {type(res).__name__}: {res}") from res
        return self._finish(*res)

    def reset(self) -> None:
        self.runner.reset()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)


class InlineWorker(_WorkerBase):
    """Computes on submit and releases the result ``latency_s`` later on the loop's clock (tests).

    Args:
        predict: ``predict(obs, t_obs, inpaint) -> (L, D)``, L >= Ta.
        clock: the loop's clock (usually a ``FakeClock``).
        latency_s: a float, or a function of the request number returning the latency.
        n_action_steps: Ta.
    """

    def __init__(self, predict, clock, latency_s, n_action_steps: int) -> None:
        super().__init__(clock)
        self.predict_fn = predict
        self.latency = latency_s if callable(latency_s) else (lambda i: float(latency_s))
        self.n_action_steps = self.plan_length = int(n_action_steps)
        self.inpaints: list = []  # what each request asked to inpaint, for tests
        self._ready_at = 0.0
        self._actions: np.ndarray | None = None

    def submit(self, obs: dict[str, np.ndarray], t_obs: float, inpaint=None) -> None:
        req = self._start(t_obs)
        self.inpaints.append(inpaint)
        self._actions = np.asarray(self.predict_fn(obs, t_obs, inpaint), dtype=np.float64)
        self._ready_at = self.clock.now() + self.latency(req)

    def poll(self) -> InferenceResult | None:
        if self._pending is None or self.clock.now() < self._ready_at:
            return None
        return self._finish(self._actions, 0, self.latency(self._pending[0]))

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass
