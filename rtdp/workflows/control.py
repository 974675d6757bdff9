"""``rtdp control``: a checkpoint drives a robot, simulated or real, at a fixed rate.

    rtdp control checkpoint=runs/pusht/checkpoint driver=sim episodes=50 json=control.json
    rtdp control size=dp_lowdim driver=dynamixel port=emulator rate_hz=50 duration_s=600

The policy infers in its own worker while the current chunk executes; the
loop, the action scheduler and the safety layer are ``rtdp.controllers``.
A live view shows rate, latency, misses and safety events; at the end a
report (``json=PATH``, keys in DESIGN.md) and a timing plot (period error and
inference latency over time) are written to ``out``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtdp.errors import ConfigError, DeviceDisconnectedError, RtdpError, UnknownNameError

DRIVERS = ("sim", "dynamixel")


class Terminated(RtdpError):
    """The process received SIGTERM; the robot was stopped and released."""


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception so every finally (safe stop) runs
    raise Terminated("terminated by SIGTERM; the robot was stopped and released")


@dataclass
class RunRecord:
    """Everything measured over a control run (all episodes)."""

    lateness_ms: list[np.ndarray] = field(default_factory=list)
    start_s: list[np.ndarray] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    inference_t: list[float] = field(default_factory=list)
    cycles: int = 0
    misses: int = 0
    idle: int = 0
    startup: int = 0
    busy_s: float = 0.0
    duration_s: float = 0.0
    episodes: list[dict[str, Any]] = field(default_factory=list)
    seams: list[dict[str, Any]] = field(default_factory=list)

    def add(self, loop, ep, t_offset: float) -> None:
        st = loop.stats()
        self.lateness_ms.append(loop.lateness_ms().copy())
        self.start_s.append(loop.start_times() + t_offset)
        self.inference_ms += ep.inference_ms
        self.inference_t += [t + t_offset for t in ep.inference_t]
        self.cycles += st.cycles
        self.misses += st.deadline_misses
        self.idle += ep.idle_cycles
        self.startup += ep.startup_cycles
        self.busy_s += st.utilisation * st.duration_s
        self.duration_s += st.duration_s


class LiveView:
    """A terminal line per half second: rate, latency, misses, safety events (rich when on a terminal)."""

    def __init__(self, enabled: bool, title: str) -> None:
        self.enabled, self.title = enabled, title
        self._live = None
        self._last = 0.0
        self.extra = ""

    def __enter__(self):
        if self.enabled:
            from rich.live import Live

            self._live = Live(self.title, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def update(self, ctl) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.5:  # rendering every cycle would cost the loop its timing
            return
        self._last = now
        from rich.table import Table

        lp = ctl.loop
        late = lp.lateness_ms()
        lat = ctl.episode.inference_ms
        ev = {k: v for k, v in ctl.safety.counts().items() if v}
        t = Table(title=self.title, show_header=True)
        for col in ("cycles", "rate Hz", "late p99 ms", "misses", "infer p50/p99 ms", "dropped", "idle", "safety"):
            t.add_column(col)
        starts = lp.start_times()
        span = float(starts[-1] - starts[0]) if starts.size > 1 else 0.0
        rate = (starts.size - 1) / span if span > 0 else 0.0
        t.add_row(str(lp.cycles), f"{rate:.1f}", f"{np.percentile(late, 99):.2f}" if late.size else "-",
                  str(lp.misses), f"{np.median(lat):.0f}/{np.percentile(lat, 99):.0f}" if lat else "-",
                  str(ctl.dropped_total + ctl.scheduler.dropped), str(ctl.episode.idle_cycles),
                  ", ".join(f"{k} {v}" for k, v in ev) or "none")
        if self.extra:
            t.caption = self.extra
        self._live.update(t, refresh=True)


def _make_driver(cfg, task_name: str | None):
    if cfg.driver not in DRIVERS:
        raise UnknownNameError("driver", str(cfg.driver), DRIVERS)
    if cfg.driver == "sim":
        from rtdp.controllers.drivers.sim import SimDriver

        return SimDriver(task_name, cfg.rate_hz, max_delta=cfg.max_delta), None
    return _make_dynamixel(cfg)


def _make_dynamixel(cfg):
    """The Dynamixel driver; ``port=emulator`` starts the bus emulator on a pseudo-terminal first."""
    import subprocess

    from rtdp.controllers.drivers.dynamixel import make_dynamixel_driver

    if not cfg.port:
        raise ConfigError("driver=dynamixel needs port=/dev/ttyUSB0 (your bus adapter) or port=emulator")
    ids = [int(i) for i in cfg.motors]
    cleanup, port = None, str(cfg.port)
    if port == "emulator":
        # the emulator stands in for hardware, which never waits for the CPU: above the loop's priority
        rt = int(cfg.rt_priority) + 1 if int(cfg.rt_priority) > 0 else 0
        proc = subprocess.Popen([sys.executable, "-m", "rtdp.controllers.emulator.dynamixel",
                                 "--motors", ",".join(map(str, ids)), "--model", str(cfg.model),
                                 "--rt-priority", str(rt)],
                                stdout=subprocess.PIPE, text=True)
        port = (proc.stdout.readline() or "").strip()
        if not port:
            proc.kill()
            raise ConfigError("the Dynamixel bus emulator did not start")
        print(f"rtdp control: Dynamixel bus emulator on {port}", file=sys.stderr)

        def cleanup() -> None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    elif cfg.calibration is None:
        raise ConfigError("a real Dynamixel bus needs calibration=<file.json> (joint ranges and offsets, "
                          "LeRobot's format); see rtdp.controllers.drivers.dynamixel.write_calibration")
    driver = make_dynamixel_driver(port, ids, str(cfg.model), cfg.calibration, baudrate=int(cfg.baudrate),
                                   rate_hz=float(cfg.rate_hz or 50.0), max_joint_speed=float(cfg.max_speed))
    driver.rate_hz = float(cfg.rate_hz or 50.0)
    return driver, cleanup


def _split_cpus(cfg) -> tuple[tuple[int, ...] | None, set[int] | None]:
    """``worker_cpus`` -> (the worker's CPUs, the CPUs left to the loop), or (None, None) for no pinning.

    ``auto`` (the default) gives the process worker every CPU but the first when
    there are at least two, and the loop (with the simulator or emulator) the
    first: the loop then never waits for the scheduler to take a core back from
    inference. ``threads`` is capped to the worker's CPUs. ``null`` pins nothing.
    """
    value = cfg.get("worker_cpus")
    if value is None or cfg.worker != "process" and value == "auto":
        return None, None
    if cfg.worker != "process":
        raise ConfigError("worker_cpus pins the inference process: it needs worker=process")
    usable = os.sched_getaffinity(0)
    if value == "auto":
        if len(usable) < 2:
            return None, None
        wanted = tuple(sorted(usable)[1:])
        return wanted, usable - set(wanted)
    try:
        wanted = tuple(sorted({int(c) for c in value}))
    except (TypeError, ValueError):
        raise ConfigError(f"worker_cpus must be auto, null or a list of CPU numbers such as [1], got {value!r}") from None
    if not wanted or not set(wanted) <= usable:
        raise ConfigError(f"worker_cpus={list(wanted)} must be a non-empty subset of this process's CPUs {sorted(usable)}")
    rest = usable - set(wanted)
    if not rest:
        raise ConfigError(f"worker_cpus={list(wanted)} leaves no CPU for the control loop; leave at least one out")
    if int(cfg.threads) > len(wanted):
        raise ConfigError(f"threads={cfg.threads} exceeds the {len(wanted)} CPU(s) in worker_cpus; "
                          f"set threads={len(wanted)}")
    return wanted, rest


def _policy_spec(cfg, driver, obs_example: dict[str, np.ndarray] | None, cpus: tuple[int, ...] | None = None):
    from rtdp.controllers.workers import PolicySpec

    common = dict(sampler=cfg.sampler, steps=cfg.steps, precision=cfg.precision, seed=int(cfg.seed),
                  threads=min(int(cfg.threads), len(cpus)) if cpus else int(cfg.threads),
                  nice=int(cfg.nice) if cfg.worker == "process" else 0, cpus=cpus)
    # the modules defining the checkpoint's family and the task, for a worker process to import first
    common["modules"] = _registering_modules(cfg, driver)
    if cfg.checkpoint:
        return PolicySpec(checkpoint=str(cfg.checkpoint), **common)
    lim = driver.limits
    shapes = {k: tuple(np.shape(v)) for k, v in (obs_example or {}).items() if k in _fresh_obs_keys(cfg, driver)}
    family = cfg.policy.name if cfg.get("policy") else "unet"
    return PolicySpec(size=str(cfg.size), policy=str(family), obs_shapes=shapes,
                      action_low=tuple(float(v) for v in lim.low), action_high=tuple(float(v) for v in lim.high),
                      **common)


def _registering_modules(cfg, driver) -> tuple[str, ...]:
    """Modules outside rtdp that registered the policy family or the task in use (a spawned worker imports them)."""
    from rtdp.models.base import MODEL_TYPES, read_meta
    from rtdp.policies.registry import FAMILIES

    classes = []
    if cfg.checkpoint:
        classes.append(MODEL_TYPES.get(read_meta(cfg.checkpoint)["model_type"]))
    elif cfg.get("policy"):
        classes.append(FAMILIES[cfg.policy.name].policy_class)
    from rtdp.envs import TASK_MODULES

    task = getattr(driver, "task", None)
    mods = [c.__module__ for c in classes if c is not None]
    if task is not None and task.name in TASK_MODULES:
        mods.append(TASK_MODULES[task.name])
    return tuple(m for m in dict.fromkeys(mods) if not m.startswith("rtdp."))


def _fresh_obs_keys(cfg, driver) -> tuple[str, ...]:
    if cfg.driver == "sim":
        return tuple(driver.task.lowdim_keys)
    return ("joint_pos",)


def _checkpoint_info(cfg) -> tuple[str | None, tuple[str, ...], int, int]:
    """(task, obs keys, n_obs_steps, n_action_steps) of the checkpoint, without building the network."""
    from rtdp.policies import read_config

    conf = read_config(cfg.checkpoint)
    meta_path = Path(cfg.checkpoint) / "meta.json"
    task = json.loads(meta_path.read_text()).get("task") if meta_path.exists() else None
    keys = (*conf.get("lowdim_shapes", {}), *conf.get("image_shapes", {}))
    return task, tuple(keys), int(conf["n_obs_steps"]), int(conf["n_action_steps"])


def _make_worker(cfg, spec, clock, idle=None):
    from rtdp.controllers.workers import WORKERS, ProcessWorker, ThreadWorker, build_runner

    if cfg.worker not in WORKERS:
        raise UnknownNameError("worker", str(cfg.worker), WORKERS)
    if cfg.worker == "process":
        return ProcessWorker(spec, clock, idle=idle)
    import torch

    torch.set_num_threads(int(cfg.threads))
    return ThreadWorker(build_runner(spec), clock)


def plot_timing(path: Path, rec: RunRecord, rate_hz: float, chunk_s: float, title: str) -> Path:
    """Period error per cycle and inference latency per request over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if rec.start_s:
        a.plot(np.concatenate(rec.start_s), np.concatenate(rec.lateness_ms), ".", ms=1.5)
    a.set_ylabel("cycle start lateness (ms)")
    a.set_title(title)
    if rec.inference_t:
        b.plot(rec.inference_t, rec.inference_ms, ".", ms=3, color="tab:orange")
    b.axhline(chunk_s * 1e3, color="k", ls="--", lw=1, label=f"chunk duration {chunk_s * 1e3:.0f} ms")
    b.set_ylabel("inference latency (ms)")
    b.set_xlabel("time (s)")
    b.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_control(cfg) -> dict[str, Any]:
    """Run ``rtdp control`` and return its report."""
    from rtdp.cli import task_name as config_task_name
    from rtdp.controllers.clock import MonotonicClock
    from rtdp.controllers.controller import Controller
    from rtdp.controllers.loop import RateLoop, realtime_priority
    from rtdp.controllers.schedule import SEAMS
    from rtdp.workflows.metrics import wilson_interval
    from rtdp.workflows.report import print_table

    if not cfg.checkpoint and not cfg.size:
        raise ConfigError("rtdp control needs checkpoint=<dir> (or size=dp_lowdim for a timing run with a fresh network)")
    if cfg.checkpoint and cfg.size:
        raise ConfigError("give checkpoint (a trained policy) or size (a fresh network for timing), not both")
    if cfg.seam not in SEAMS:
        raise UnknownNameError("seam", str(cfg.seam), SEAMS)
    if cfg.driver == "dynamixel" and cfg.duration_s is None:
        raise ConfigError("driver=dynamixel runs for a set time: pass duration_s=...")
    task_name, obs_keys, n_obs, n_act = config_task_name(cfg), None, 2, 8
    if cfg.checkpoint:
        ck_task, obs_keys, n_obs, n_act = _checkpoint_info(cfg)
        task_name = task_name or ck_task
    if cfg.driver == "sim" and task_name is None:
        from rtdp.envs import TASKS

        raise ConfigError(f"driver=sim simulates a task: pass task=NAME (known: {', '.join(TASKS)}) or a checkpoint "
                          "trained on one")
    worker_cpus, loop_cpus = _split_cpus(cfg)
    clock = MonotonicClock()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = RunRecord()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell starts background jobs (`rtdp control ... &`, nohup) with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler; the robot must still stop on SIGINT, so the run installs it.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_cpus = os.sched_getaffinity(0) if loop_cpus else None
    if loop_cpus:
        # the loop, and the simulator or emulator it starts next, keep off the worker's CPUs
        os.sched_setaffinity(0, loop_cpus)
    driver = cleanup = worker = None
    safety_events: dict[str, int] = {}
    seam_stats = []
    dropped = 0
    driver_stats: dict[str, Any] = {}
    rt_applied = "normal"
    error: RtdpError | None = None
    ctl, t0, warm, chunk_s = None, 0.0, [0.0], 0.0
    rate = float(cfg.rate_hz or 50.0)
    threads_used = int(cfg.threads)
    cpus_seen: dict[str, Any] = {"loop": None, "worker": None}
    try:
        driver, cleanup = _make_driver(cfg, task_name)
        with driver:
            rate = float(cfg.rate_hz or getattr(driver, "rate_hz", 50.0))
            if cfg.driver == "sim":
                seeds = driver.task.seeds(int(cfg.episodes))
                first = driver.reset(seeds[0])
            else:
                seeds = [None]
                first = driver.read()
            if obs_keys is None:
                obs_keys = _fresh_obs_keys(cfg, driver)
            missing = [k for k in obs_keys if k not in first.obs]
            if missing:
                raise ConfigError(f"the policy reads {missing}, which driver={cfg.driver} does not observe "
                                  f"(it has {sorted(first.obs)})")
            spec = _policy_spec(cfg, driver, first.obs, worker_cpus)
            threads_used = spec.threads
            print(f"rtdp control: starting the inference worker ({cfg.worker}) ...", file=sys.stderr)
            # reading while the worker starts keeps a servo bus watchdog fed (the robot holds meanwhile)
            worker = _make_worker(cfg, spec, clock, idle=driver.read)
            example = {k: np.stack([first.obs[k]] * n_obs) for k in obs_keys}
            warm = worker.warmup(example, 10, idle=driver.read)
            # the CPUs each side really has (what the kernel reports, not what was asked)
            cpus_seen = {"loop": sorted(os.sched_getaffinity(0)),
                         "worker": sorted(os.sched_getaffinity(worker.pid)) if hasattr(worker, "pid") else None}
            if cfg.driver != "sim":
                # the episode starts from the robot as it is then (read by the controller), and the
                # driver recovers whatever the start-up cost it (a bus watchdog that tripped while the
                # worker loaded) before the clock runs
                first = None
            chunk_s = worker.n_action_steps / rate
            live_on = sys.stdout.isatty() if cfg.live is None else bool(cfg.live)
            title = f"rtdp control  {cfg.driver}  {rate:g} Hz  {cfg.worker} worker  seam={cfg.seam}"
            t_begin = clock.now()
            # real-time priority for the loop thread only: the simulator, emulator and worker started above
            rt = realtime_priority(int(cfg.rt_priority))
            with LiveView(live_on, title) as view, rt:
                for n, seed in enumerate(seeds):
                    if cfg.driver == "sim":
                        # every episode, the first included, starts now: the simulator kept stepping (holding)
                        # while the worker started, and that must not spend the episode's step budget
                        first = driver.reset(seed)
                    loop = RateLoop(rate, clock)
                    if ctl is None:
                        ctl = Controller(driver, worker, loop, obs_keys=obs_keys, n_obs_steps=n_obs, seam=cfg.seam,
                                         overlap=int(cfg.overlap), watchdog_s=float(cfg.watchdog_s),
                                         latency_s=float(np.percentile(warm, 99)), on_cycle=view.update)
                    else:
                        ctl.loop = loop
                    t0 = clock.now() - t_begin
                    ep = ctl.run_episode(duration_s=cfg.duration_s, first=first)
                    driver.stop()
                    rec.add(loop, ep, t0)
                    seam_stats.append(ctl.scheduler.seam_stats().to_dict())
                    rec.episodes.append({"seed": seed, "success": ep.success, "score": ep.score, "cycles": ep.cycles,
                                         "idle_cycles": ep.idle_cycles, "stopped_by_watchdog": ep.stopped_by_watchdog})
                    if seed is not None:
                        done = sum(e["success"] for e in rec.episodes)
                        view.extra = f"episode {n + 1}/{len(seeds)}  success {done}/{n + 1}"
                        if not live_on:
                            print(f"episode {n + 1}/{len(seeds)} seed {seed}: success={ep.success} "
                                  f"score={ep.score:.3f} cycles={ep.cycles}", file=sys.stderr)
                dropped = ctl.dropped_total
                safety_events = ctl.safety.counts()
                driver_stats = dict(getattr(driver, "stats", {}) or {})
            rt_applied = rt.applied
    except DeviceDisconnectedError as exc:
        # the robot went away mid-run: release it (done by the with block), keep what was measured
        attempts = getattr(driver, "torque_off_log", None)
        if attempts is not None:
            ids = sorted({i for i, _, _ in attempts})
            ok = sorted({i for i, good, _ in attempts if good})
            error = DeviceDisconnectedError(f"{exc}; the run stopped; torque-off attempted on servos {ids} "
                                            f"(confirmed on {ok or 'none'})")
        else:
            error = DeviceDisconnectedError(f"{exc}; the run stopped and the robot was released")
        if ctl is not None and ctl.loop.cycles:
            rec.add(ctl.loop, ctl.episode, t0)
            dropped = ctl.dropped_total + ctl.scheduler.dropped
            safety_events = ctl.safety.counts()
            driver_stats = dict(getattr(driver, "stats", {}) or {})
    finally:
        if worker is not None:
            worker.close()
        if cleanup is not None:
            cleanup()
        if old_cpus is not None:
            os.sched_setaffinity(0, old_cpus)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)

    late = np.concatenate(rec.lateness_ms) if rec.lateness_ms else np.zeros(0)
    inf = np.asarray(rec.inference_ms)
    steady = max(rec.cycles - rec.startup, 1)
    report: dict[str, Any] = {
        "driver": cfg.driver, "task": task_name, "checkpoint": cfg.checkpoint, "size": cfg.size,
        "sampler": cfg.sampler, "steps": cfg.steps, "precision": cfg.precision,
        "worker": cfg.worker, "seam": cfg.seam, "overlap": int(cfg.overlap),
        "rate_hz": rate, "duration_s": rec.duration_s, "cycles": rec.cycles,
        "deadline_misses": rec.misses,
        "period_error_ms_p50": float(np.percentile(late, 50)) if late.size else 0.0,
        "period_error_ms_p99": float(np.percentile(late, 99)) if late.size else 0.0,
        "period_error_ms_max": float(late.max()) if late.size else 0.0,
        "utilisation": rec.busy_s / max(rec.duration_s, 1e-9),
        "idle_fraction": rec.idle / steady, "idle_cycles": rec.idle, "startup_cycles": rec.startup,
        "inference_ms_p50": float(np.percentile(inf, 50)) if inf.size else None,
        "inference_ms_p99": float(np.percentile(inf, 99)) if inf.size else None,
        "warmup_inference_ms_p99": float(np.percentile(warm, 99)) * 1e3,
        "chunk_ms": chunk_s * 1e3, "chunks": int(inf.size),
        "dropped_actions": int(dropped), "safety_events": safety_events,
        "seam_gap_mean": float(np.mean([s["gap_mean"] for s in seam_stats])) if seam_stats else 0.0,
        "seam_step_mean": float(np.mean([s["step_mean_seam"] for s in seam_stats])) if seam_stats else 0.0,
        "inside_step_mean": float(np.mean([s["step_mean_inside"] for s in seam_stats])) if seam_stats else 0.0,
        "threads": threads_used,
        "worker_cpus": cpus_seen["worker"],
        "loop_cpus": cpus_seen["loop"],
        "driver_stats": driver_stats,
        "scheduling": rt_applied,
        # where the loop's time went per cycle (read / worker poll + submit / safety + write), slowest cycles listed
        "cycle_ms": ctl.cycle_breakdown() if ctl is not None else {},
    }
    if error is not None:
        report["error"] = str(error)
    if cfg.driver == "sim":
        n_ok = sum(e["success"] for e in rec.episodes)
        report.update(episodes=len(rec.episodes), success_rate=n_ok / max(len(rec.episodes), 1),
                      success_ci95=list(wilson_interval(n_ok, len(rec.episodes))),
                      mean_score=float(np.mean([e["score"] for e in rec.episodes])) if rec.episodes else 0.0,
                      per_episode=rec.episodes)
    plot = plot_timing(out / "timing.png", rec, rate, chunk_s, title)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    rows = [("driver", f"{cfg.driver} at {rate:g} Hz, {cfg.worker} worker, seam {cfg.seam}"),
            ("loop scheduling", rt_applied),
            ("cycles / misses", f"{rec.cycles} / {rec.misses}"),
            ("period error p50 / p99 / max", f"{report['period_error_ms_p50']:.3f} / {report['period_error_ms_p99']:.3f} / "
                                             f"{report['period_error_ms_max']:.3f} ms"),
            ("inference p50 / p99", f"{report['inference_ms_p50'] or 0:.1f} / {report['inference_ms_p99'] or 0:.1f} ms "
                                    f"(chunk {chunk_s * 1e3:.0f} ms)"),
            ("idle fraction", f"{report['idle_fraction']:.4f} ({rec.idle} cycles)"),
            ("dropped actions", str(dropped)),
            ("safety events", ", ".join(f"{k} {v}" for k, v in safety_events.items() if v) or "none")]
    if cfg.driver == "sim":
        lo, hi = report["success_ci95"]
        rows.append(("success", f"{report['success_rate']:.0%} ({lo:.0%}-{hi:.0%}) of {report['episodes']}, "
                                f"mean score {report['mean_score']:.3f}"))
    rows.append(("report", f"{out / 'report.json'}, {plot}"))
    print_table("rtdp control", rows)
    if error is not None:
        raise error
    return report


def run(cfg) -> None:
    """CLI entry."""
    if cfg.get("select") is not None:
        raise ConfigError("select= chooses among a driving planner's candidates (task=highway); an action policy "
                          "returns one chunk")
    run_control(cfg)
