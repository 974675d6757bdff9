"""One way to run any policy checkpoint with any inference configuration.

Evaluation, benchmarking and the control loop name an inference setting by
``sampler`` and ``steps`` (``rtdp bench`` prints them as ``<sampler>-<steps>``):

* a core sampler (``ddpm``, ``ddim``, ``euler``, ``euler_a``, ``heun``,
  ``dpmpp``, ``dpmpp_sde``) on the checkpoint's own noise schedule;
* ``edm``: Euler on the Karras schedule of an EDM policy (BESO's sampler);
* ``stream``: the streaming buffer of an EDM policy, ``steps`` network
  evaluations per observation;
* ``cm``: a consistency policy, ``steps`` chained one-step evaluations.

Which family serves which setting is ``rtdp.policies.registry``'s.

``Runner`` hides which of these runs, so a rollout calls
``runner.predict(obs, rows)`` and ``runner.reset()`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rtdp.core import SAMPLERS
from rtdp.core.cache import CachedNetwork
from rtdp.errors import ConfigError, UnknownNameError

def known_samplers() -> list[str]:
    """Core samplers plus the named settings of every registered family (``edm``, ``stream``, ``cm``, ...)."""
    from rtdp.policies.registry import FAMILIES

    return sorted(SAMPLERS) + sorted({k for f in FAMILIES.values() for k in f.settings})


def calls_per_chunk(sampler: str, steps: int) -> int:
    """Network calls one chunk makes with a sampler at ``steps`` (Heun evaluates twice per step but the last)."""
    return 2 * int(steps) - 1 if sampler == "heun" else int(steps)


def parse_cache(cache: str) -> tuple[str, int]:
    """``"bac10"`` -> ``("bac", 10)``; ``"uniform10"`` -> ``("uniform", 10)``."""
    text = str(cache)
    for mode in ("bac", "uniform"):
        if text.startswith(mode) and text[len(mode):].isdigit() and int(text[len(mode):]) >= 1:
            return mode, int(text[len(mode):])
    raise ConfigError(f"cache must be bac<M> or uniform<M> (M update steps per block and chunk, >= 1), got {cache!r}")


def _block_cache_schedule(policy, sampler: str, steps: int, cache: str, calibration, deepcache) -> dict:
    """The ``{block: update calls}`` schedule a ``cache=`` option asks for, checked against the setting."""
    from rtdp.policies.registry import family_of

    mode, budget = parse_cache(cache)
    if deepcache is not None:
        raise ConfigError("block-wise caching and DeepCache both cache the network: give one of cache / deepcache")
    if sampler in family_of(policy).settings and family_of(policy).settings[sampler] is None:
        raise ConfigError(f"block-wise caching reuses features between the steps of one chunk; sampler {sampler!r} "
                          f"makes 1-3 calls per observation, so there is nothing to reuse")
    blocks_of = getattr(policy.model, "cache_blocks", None)
    if blocks_of is None:
        raise ConfigError(f"cache={cache} caches transformer blocks; {type(policy.model).__name__} has none "
                          f"(the U-Net's feature cache is deepcache=N)")
    n_calls = calls_per_chunk(sampler, steps)
    if budget > n_calls:
        raise ConfigError(f"cache={cache}: {budget} updates per chunk but {sampler}-{steps} makes only {n_calls} calls")
    if mode == "uniform":
        from rtdp.core.bac import uniform_block_schedule

        return uniform_block_schedule([b.name for b in blocks_of()], n_calls, budget)
    setting = f"{sampler}-{steps}"
    if calibration is None:
        raise ConfigError(f"cache={cache} needs the BAC calibration of {setting} (rtdp.workflows.calibrate; "
                          f"rtdp bench makes one beside the checkpoint)")
    if calibration.setting != setting or calibration.n_steps != n_calls:
        raise ConfigError(f"the BAC calibration is for {calibration.setting} ({calibration.n_steps} calls), "
                          f"not {setting} ({n_calls} calls): calibrate this setting")
    names = {b.name for b in blocks_of()}
    if {b.name for b in calibration.blocks} != names:
        raise ConfigError("the BAC calibration names other blocks than this network has: calibrate it again")
    return calibration.schedule(budget)


GUIDANCE_OPTIONS = ("guidance_scale", "guidance_skip_cos")
ANCHOR_OPTIONS = ("anchors", "anchor_step")


def _anchor_options(policy, family, sampler: str, steps: int, options: dict[str, Any],
                    cache: str | None, deepcache: int | None) -> dict[str, Any]:
    """``options`` with the anchors normalised once, after checking that this policy and setting can start from them."""
    from rtdp.policies.ddpm import DdpmPolicy

    if sampler in family.per_observation:
        raise ConfigError(f"an anchored start (anchors / anchor_step, +anchor<T>) begins a whole chunk from an anchor; "
                          f"{sampler} is served per observation from its own noise buffer, so it has no chunk start")
    if not isinstance(policy, DdpmPolicy) or sampler in family.settings:
        raise ConfigError(f"an anchored start (anchors / anchor_step, +anchor<T>) runs the core samplers on a DDPM "
                          f"policy's schedule (policy=unet or transformer); got policy={family.name} "
                          f"({type(policy).__name__}) with sampler {sampler!r}")
    if cache is not None:
        raise ConfigError(f"cache={cache} is scheduled for {sampler}-{steps}'s calls; an anchored start makes one more "
                          "(the estimate that picks the anchor): drop one of them")
    if deepcache is not None:
        # the first call sees pure noise at the top of the schedule, the next an anchor near step T:
        # features of the one say nothing about the other
        raise ConfigError("DeepCache would reuse the deep features of the anchor-picking call (pure noise, top of the "
                          "schedule) at the anchor's small noise level: drop one of deepcache / anchors")
    if options.get("anchors") is None or options.get("anchor_step") is None:
        given = "anchors" if options.get("anchors") is not None else "anchor_step"
        raise ConfigError(f"an anchored start needs both anchors (K, horizon, action_dim) in env units and "
                          f"anchor_step T; got only {given} (rtdp.workflows.bench.action_anchors makes anchors "
                          "from a replay buffer)")
    cfg = policy.config
    anchors = options["anchors"]
    try:
        anchors = torch.as_tensor(np.asarray(anchors.detach().cpu() if isinstance(anchors, torch.Tensor) else anchors,
                                             dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"anchors must be an array (K, {cfg.horizon}, {cfg.action_dim}) in env units: "
                          f"{exc}") from None
    if anchors.ndim != 3 or anchors.shape[0] < 1 or tuple(anchors.shape[1:]) != (cfg.horizon, cfg.action_dim):
        raise ConfigError(f"anchors must have shape (K, {cfg.horizon}, {cfg.action_dim}) = (K >= 1, horizon, "
                          f"action_dim) in env units, got {tuple(anchors.shape)}")
    policy.anchor_sigmas(options["anchor_step"], steps)  # T in range for this checkpoint and these steps
    policy.normalizer.require_set()
    normalised = policy.normalizer.normalize("action", anchors.to(device=policy.device, dtype=policy.dtype))
    return {**options, "anchors": policy.check_anchors(normalised)}


class Runner:
    """A policy plus an inference setting.

    Args:
        policy: any rtdp policy.
        sampler: a core sampler name or a family's named setting (``known_samplers()``); None: the policy's default.
        steps: sampler steps, evaluations per observation (stream), or chained steps (cm).
        seed: seed of the sampling noise.
        precision: None for the plain network, or a packed inference form of the
            U-Net (``"fp32"``, ``"bf16"``, ``"int8"``, ``"int8dyn"``; see ``rtdp.core.fastnet``).
        deepcache: DeepCache interval (U-Net deep features recomputed every
            ``deepcache`` network calls within a chunk); None: off.
        cache: block-wise caching of a transformer policy, ``"bac<M>"`` (BAC's
            schedule, M update steps per block and chunk) or ``"uniform<M>"``
            (every block at the same M evenly spaced steps); None: off.
        calibration: the ``rtdp.core.bac.BacCalibration`` of this sampler
            setting, which ``cache="bac<M>"`` needs.
        compile: run the plain network through ``torch.compile`` (not with
            ``precision`` or the caches).
        cuda_graph: replay the network from CUDA graphs (a policy on a CUDA
            device; the plain network only).
        options: extra keyword arguments of ``predict_action_chunk``: ``guidance_scale`` /
            ``guidance_skip_cos`` (a goal-conditioned EDM policy), or ``anchors`` (K, horizon, Da)
            in env units with ``anchor_step`` T (a DDPM policy's anchored start, ``+anchor<T>``;
            the anchors are normalised once here).

    Raises:
        UnknownNameError: unknown sampler.
        ConfigError: a sampler this policy cannot run, or bad steps.
    """

    def __init__(self, policy, sampler: str | None = None, steps: int | None = None, *, seed: int = 0,
                 precision: str | None = None, deepcache: int | None = None, cache: str | None = None,
                 calibration: Any = None, compile: bool = False, cuda_graph: bool = False,
                 **options: Any) -> None:
        from rtdp.policies.registry import FAMILIES, family_of

        self.policy = policy
        # anchors=None / anchor_step=None mean "no anchored start", as leaving them out does
        options = {k: v for k, v in options.items() if not (k in ANCHOR_OPTIONS and v is None)}
        self.options = options
        self.generator = torch.Generator().manual_seed(int(seed))
        family = self.family = family_of(policy)
        name = family.default_sampler(policy) if sampler is None else str(sampler)
        if name not in known_samplers():
            raise UnknownNameError("sampler", name, known_samplers())
        if not family.serves(name):
            if name in SAMPLERS:
                raise ConfigError(f"a policy={family.name} checkpoint samples with "
                                  f"sampler={' | '.join(family.settings)}, got {name!r}")
            owners = [f"policy={f.name}" for f in FAMILIES.values() if name in f.settings]
            raise ConfigError(f"sampler {name!r} needs a {' or '.join(owners)} checkpoint, got policy={family.name} "
                              f"({type(policy).__name__})")
        unknown = sorted(set(options) - set(GUIDANCE_OPTIONS) - set(ANCHOR_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown inference options {unknown}; known: "
                              f"{', '.join(GUIDANCE_OPTIONS + ANCHOR_OPTIONS)}")
        guidance = sorted(set(options) & set(GUIDANCE_OPTIONS))
        if guidance and not getattr(policy.config, "goal_keys", ()):
            raise ConfigError(
                f"{', '.join(guidance)} need a goal-conditioned EDM checkpoint (policy.goal_keys set); "
                f"this {type(policy).__name__} has no goal"
            )
        if deepcache is not None:
            if isinstance(deepcache, bool) or int(deepcache) != deepcache or int(deepcache) < 1:
                raise ConfigError(f"deepcache must be an interval >= 1, got {deepcache!r}")
            if name in family.per_observation:
                raise ConfigError(f"DeepCache reuses features between the steps of one chunk; {name} is served per "
                                  "observation (streaming: 1-2 network calls on a shifted buffer), so there is "
                                  "nothing to reuse")
        self.name = name
        self.precision = precision
        self.deepcache = deepcache
        self.cache = cache
        self.steps = policy.config.num_inference_steps if steps is None else steps
        if name not in family.per_observation:
            self.steps = policy._check_steps(self.steps)
        if set(options) & set(ANCHOR_OPTIONS):
            self.options = options = _anchor_options(policy, family, name, self.steps, options, cache, deepcache)
        schedule = None
        if cache is not None:
            schedule = _block_cache_schedule(policy, name, self.steps, cache, calibration, deepcache)
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        policy = self.policy = policy.with_network(precision, deepcache=deepcache, cache_schedule=schedule,
                                                   compile=self.compile, cuda_graph=self.cuda_graph)
        # a per-observation setting (streaming) serves through its wrapper, which keeps the episode's buffer
        self.stream = family.per_observation[name](policy, self.steps) if name in family.per_observation else None
        if self.stream is None and deepcache is not None and self.steps < 2:
            raise ConfigError(f"DeepCache needs >= 2 network calls per chunk to reuse anything; "
                              f"{name}-{self.steps} makes {self.steps}")
        # a named setting runs the core sampler it maps to ("edm": Euler on the EDM policy's Karras schedule),
        # or the family's own sampling (None)
        self.core_sampler = family.settings[name] if name in family.settings else name

    @property
    def n_action_steps(self) -> int:
        """Actions returned per call."""
        return self.stream.n_action_steps if self.stream is not None else self.policy.config.n_action_steps

    @property
    def plan_length(self) -> int:
        """Most actions one call can return: the rest of the horizon (streaming: its rung)."""
        if self.stream is not None:
            return self.stream.n_action_steps
        cfg = self.policy.config
        return cfg.horizon - cfg.n_obs_steps + 1

    @property
    def last_nfe(self) -> int:
        """Network evaluations of the last call."""
        return self.stream.last_nfe if self.stream is not None else self.policy.last_nfe

    @property
    def last_sample_nfe(self) -> float:
        """Network evaluations per sample of the last call (mean over the batch)."""
        return float(self.stream.last_nfe) if self.stream is not None else float(self.policy.last_sample_nfe)

    def reset(self) -> None:
        """Start new episodes (clears streaming buffers)."""
        if self.stream is not None:
            self.stream.reset()

    @torch.no_grad()
    def predict(self, obs: Mapping[str, Any], rows: np.ndarray | None = None, *,
                noise: torch.Tensor | None = None, inpaint: tuple[Any, Any] | None = None,
                n_actions: int | None = None) -> torch.Tensor:
        """Actions (B, n_action_steps, Da) in env units.

        Args:
            obs: ``{key: (B, To, *shape)}``.
            rows: for streaming, which episodes' buffers these observations continue.
            noise: initial noise for one-shot samplers (ignored by streaming).
            inpaint: ``(actions (B, K, Da), weights (K,))`` committed actions the
                chunk's first K actions must agree with (real-time chunking).
            n_actions: actions to return (default ``n_action_steps``); up to the
                rest of the predicted horizon (``plan_length``). Not for streaming.

        Raises:
            ConfigError: inpainting asked of the streaming sampler.
        """
        if isinstance(self.policy.model, CachedNetwork):  # cached features belong to one chunk
            self.policy.model.reset()
        if self.stream is not None:
            if inpaint is not None:
                raise ConfigError("real-time chunking inpaints a whole chunk; the streaming sampler keeps its own "
                                  "buffer of committed actions, so use seam=switch with sampler=stream")
            if n_actions not in (None, self.n_action_steps):
                raise ConfigError("the streaming sampler returns its rung of actions per observation; "
                                  "n_actions cannot change it")
            return self.stream.predict_action_chunk(obs, generator=self.generator, rows=rows, **self.options)
        return self.policy.predict_action_chunk(obs, sampler=self.core_sampler, steps=self.steps,
                                                generator=self.generator, noise=noise, inpaint=inpaint,
                                                n_actions=n_actions, **self.options)

