"""Names of inference configurations: ``<sampler>-<steps>[+<option>...]`` (DESIGN.md).

``rtdp bench`` names every configuration this way (``ddpm-100``, ``edm-3``,
``ddpm-100+bac10``, ``edm-3+int8``); ``parse_config`` turns a name into the
sampler, its steps and the options ``rtdp.core.accelerate`` and the samplers
take, for action policies and the image model alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rtdp.errors import ConfigError

_NAME = re.compile(r"^(?P<sampler>[a-z_]+)-(?P<steps>\d+)(?P<opts>(\+[a-z0-9.]+)*)$")
DEFAULT_CACHE_BUDGET = 10  # +bac / +uniform without a number: update steps per block and chunk
DEFAULT_ANCHOR_STEP = 30  # +anchor without a number: the training step anchors are noised to (of 100 in DP's schedule)
# Packed inference forms of the network (rtdp.core.fastnet), by option name.
PRECISION_OPTIONS = {"fast": "fp32", "bf16": "bf16", "int8": "int8", "int8dyn": "int8dyn"}


@dataclass
class BenchConfig:
    """A parsed configuration name."""

    name: str
    sampler: str
    steps: int
    options: dict[str, Any] = field(default_factory=dict)


def parse_config(name: str) -> BenchConfig:
    """Parse ``<sampler>-<steps>[+option...]``.

    Options: ``+g<scale>`` (classifier-free guidance scale), ``+skip<cos>``
    (guidance skipping threshold), ``+fast`` / ``+bf16`` / ``+int8`` / ``+int8dyn``
    (the network's packed fp32, bf16, weight-only int8 or dynamic int8 form),
    ``+deepcache<N>`` (U-Net deep features reused, recomputed every N calls; N = 3 by default),
    ``+bac<M>`` / ``+uniform<M>`` (transformer blocks cached: BAC's schedule or
    every block at the same evenly spaced steps, M updates per block and chunk;
    M = 10 by default), ``+compile`` (the network through ``torch.compile``),
    ``+anchor<T>`` (truncated start from k-means anchors of the training actions,
    noised to training step T, then ``steps`` sampler steps from there; one more
    network call per chunk picks the anchor; T = 30 by default), ``+pdm`` (a driving
    planner chooses among its candidates by their predicted PDM score,
    ``rtdp.envs.plan_selection``). T is checked
    against the policy's ``num_train_timesteps`` where the policy is known
    (``rtdp.policies.runner.Runner``), not here.

    Raises:
        ConfigError: a malformed name, steps <= 0 or an unknown option.
    """
    m = _NAME.match(str(name))
    if m is None:
        raise ConfigError(
            f"configuration {name!r} must read <sampler>-<steps>[+option...], e.g. ddpm-100, edm-3, stream-1, "
            "edm-3+g0, edm-3+skip0.95"
        )
    steps = int(m["steps"])
    if steps <= 0:
        raise ConfigError(f"configuration {name!r}: steps must be >= 1")
    options: dict[str, Any] = {}
    for opt in filter(None, m["opts"].split("+")):
        key = re.match(r"[a-z]*", opt).group(0)
        value = opt[len(key):]
        if key == "deepcache":
            options["deepcache"] = int(value) if value else 3
        elif key in ("bac", "uniform") and (value.isdigit() or not value):
            if "cache" in options:
                raise ConfigError(f"configuration {name!r}: give at most one of +bac<M>, +uniform<M>")
            options["cache"] = f"{key}{value or DEFAULT_CACHE_BUDGET}"
        elif opt == "compile":
            options["compile"] = True
        elif opt == "pdm":
            options["select"] = "pdm"
        elif opt in PRECISION_OPTIONS:
            if "precision" in options:
                raise ConfigError(f"configuration {name!r}: give at most one of +{', +'.join(PRECISION_OPTIONS)}")
            options["precision"] = PRECISION_OPTIONS[opt]
        elif key == "anchor" and (value.isdigit() or not value):
            if "anchor_step" in options:
                raise ConfigError(f"configuration {name!r}: give +anchor<T> at most once")
            options["anchor_step"] = int(value) if value else DEFAULT_ANCHOR_STEP
        elif key == "g" and value:
            options["guidance_scale"] = float(value)
        elif key == "skip" and value:
            options["guidance_skip_cos"] = float(value)
        else:
            raise ConfigError(f"configuration {name!r}: unknown option +{opt}; known: +g<scale>, +skip<cos>, +deepcache<N>, "
                              f"+bac<M>, +uniform<M>, +compile, +anchor<T> (anchored start at training step T), "
                              f"+{', +'.join(PRECISION_OPTIONS)}")
    return BenchConfig(str(name), m["sampler"], steps, options)


