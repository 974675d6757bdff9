"""One registry of policy families, read by train, eval, bench and control.

A family is a name (``policy=NAME`` on every command line), a model class
(whose ``config_class`` is the family's config), the inference settings it
serves and how its command-line keys map to its config. The command-line
keys of ``policy.*`` are derived from the config dataclass (every field but
the ones the data decides), so every field is settable and none is copied by
hand; a family adds extra keys (``size``, ``teacher``) in ``cli_extras``.

Adding a family is one module with its config and model class plus one
``register_family(PolicyFamily(...))`` call; nothing else in rtdp names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from rtdp.errors import ConfigError, UnknownNameError
from rtdp.models.base import register_model_type


@dataclasses.dataclass(frozen=True)
class PolicyFamily:
    """What the pipeline needs to know about one policy family.

    Attributes:
        name: the family's name on the command line (``policy=NAME``).
        policy_class: the model class (a ``rtdp.policies.base.DiffusionPolicy``).
        settings: named inference settings the family serves beyond the core
            samplers, each mapped to the core sampler it runs (None: the
            family's own sampling), e.g. ``{"edm": "euler", "stream": None}``.
        per_observation: settings served by a stateful wrapper that keeps a
            buffer across an episode's calls and returns a few actions per
            observation instead of a whole chunk (``stream``: Streaming
            Diffusion Policy), ``{name: factory(policy, steps)}``; the
            wrapper has ``n_action_steps``, ``last_nfe``, ``reset()`` and
            ``predict_action_chunk(obs, generator=, rows=)``.
        core_samplers: whether the core samplers (ddpm, ddim, ...) run on it.
        default_setting: the setting a run without ``sampler=`` uses, given the
            policy (default: the config's ``sampler``).
        bench_configs: the configurations ``rtdp bench`` times by default.
        cli_fields: config fields settable as ``policy.<field>`` (None: all
            but the data-decided ones).
        cli_extras: more command-line keys, ``{key: (default, help)}``.
        resolve: maps the command-line keys to config field values (e.g.
            ``size`` to ``down_dims``); default: the fields as given.
        build: builds the policy from its command-line node and the data,
            for families that are not trained from scratch (distillation).
        unet_sizes: takes ``size=`` names of ``rtdp.policies.SIZES`` (fresh
            networks for timing, ``rtdp bench size=...``).
        description: one line for ``--help``.
    """

    name: str
    policy_class: type
    settings: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    per_observation: Mapping[str, Callable[[Any, int], Any]] = dataclasses.field(default_factory=dict)
    core_samplers: bool = True
    default_setting: Callable[[Any], str] | None = None
    bench_configs: tuple[str, ...] = ()
    cli_fields: tuple[str, ...] | None = None
    cli_extras: Mapping[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    build: Callable[..., Any] | None = None
    unet_sizes: bool = False
    description: str = ""

    @property
    def config_class(self) -> type:
        return self.policy_class.config_class

    @property
    def model_type(self) -> str:
        return self.policy_class.model_type

    def default_sampler(self, policy) -> str:
        """The inference setting a run without ``sampler=`` uses."""
        return self.default_setting(policy) if self.default_setting is not None else policy.config.sampler

    def serves(self, sampler: str) -> bool:
        """Whether ``sampler`` (a core sampler or a named setting) runs on this family."""
        from rtdp.core import SAMPLERS

        return sampler in self.settings or (self.core_samplers and sampler in SAMPLERS)

    def fields(self) -> list[str]:
        """Config fields settable from the command line."""
        cls = self.config_class
        data = set(getattr(cls, "data_fields", ()))
        names = [f for f in cls.field_names() if f not in data]
        return names if self.cli_fields is None else [f for f in names if f in self.cli_fields]

    def cli_defaults(self) -> dict[str, Any]:
        """The ``policy`` node of the command line: ``name``, the settable fields and the extras, with defaults."""
        defaults = {}
        for f in dataclasses.fields(self.config_class):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        node: dict[str, Any] = {"name": self.name}
        for key in self.fields():
            node[key] = json.loads(json.dumps(defaults.get(key)))  # tuples -> lists
        for key, (value, _) in self.cli_extras.items():
            node[key] = value
        return node

    def cli_help(self) -> dict[str, str]:
        """The help line of every command-line key, from the config classes' ``Attributes:`` docstrings."""
        out: dict[str, str] = {"name": f"the policy family ({self.description or self.name})"}
        for cls in reversed(self.config_class.__mro__):
            out.update(_attribute_docs(cls.__doc__ or ""))
        out.update({k: h for k, (_, h) in self.cli_extras.items()})
        return {k: out.get(k, "") for k in self.cli_defaults()}

    def config_from_cli(self, node: Mapping[str, Any], **data: Any):
        """The family's config from a command-line node plus the data-decided fields.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        node = dict(node)
        known = set(self.cli_defaults())
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"policy={self.name} has no keys {unknown}; known: {', '.join(sorted(known))}")
        values = self.resolve(node) if self.resolve is not None else node
        values = {k: v for k, v in values.items() if k != "name" and k not in self.cli_extras}
        return self.config_class.from_dict({**values, **data})


def _attribute_docs(doc: str) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Attributes:`` section."""
    out: dict[str, str] = {}
    section = re.split(r"\n\s*Attributes:\s*\n", doc, maxsplit=1)
    if len(section) < 2:
        return out
    current = None
    for line in section[1].splitlines():
        m = re.match(r"\s+(\w+)(?: \(.*?\))?: (.*)", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            current = m[1]
            out[current] = m[2].strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
        elif not line.strip() and out:
            current = None
    return out


FAMILIES: dict[str, PolicyFamily] = {}


def register_family(family: PolicyFamily) -> PolicyFamily:
    """Add a family (and its model type, so its checkpoints load)."""
    FAMILIES[family.name] = family
    register_model_type(family.policy_class)
    return family


def get_family(name: str) -> PolicyFamily:
    """A family by its command-line name.

    Raises:
        UnknownNameError: no such family, listing the known ones.
    """
    if name not in FAMILIES:
        raise UnknownNameError("policy", name, list(FAMILIES))
    return FAMILIES[name]


def family_of(policy) -> PolicyFamily:
    """The family of a policy object (by its model type)."""
    for fam in FAMILIES.values():
        if fam.model_type == type(policy).model_type:
            return fam
    raise UnknownNameError("policy family of model type", type(policy).model_type,
                           [f.model_type for f in FAMILIES.values()])


def build_policy(name: str, node: Mapping[str, Any], *, lowdim_shapes: Mapping, image_shapes: Mapping,
                 action_dim: int, stats: Mapping | None = None):
    """A new policy of family ``name`` from its command-line node and the data's shapes and statistics."""
    family = get_family(name)
    if family.build is not None:
        return family.build(family, dict(node), lowdim_shapes=lowdim_shapes, image_shapes=image_shapes,
                            action_dim=action_dim, stats=stats)
    config = family.config_from_cli(node, lowdim_shapes=dict(lowdim_shapes), image_shapes=dict(image_shapes),
                                    action_dim=int(action_dim))
    policy = family.policy_class(config)
    if stats is not None:
        policy.set_normalizer(stats)
    return policy


def fresh_policy(name: str, size: str, *, lowdim_shapes: Mapping, image_shapes: Mapping | None = None,
                 action_low, action_high, seed: int = 0):
    """A randomly initialised policy of family ``name`` and U-Net ``size`` (timing runs; no training data).

    The normaliser maps observations from [-1, 1] and actions from [action_low, action_high].

    Raises:
        ConfigError: a family that takes no ``size``, an unknown size, or no shapes.
    """
    import numpy as np
    import torch

    from rtdp.policies.diffusion_unet import SIZES

    family = get_family(name)
    if not family.unet_sizes:
        raise ConfigError(f"fresh networks are U-Nets of a named size; policy={name} has no size "
                          f"(families with sizes: {', '.join(f.name for f in FAMILIES.values() if f.unet_sizes)})")
    if size not in SIZES:
        raise ConfigError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not lowdim_shapes and not image_shapes or len(action_low) == 0:
        raise ConfigError("a fresh policy needs observation shapes and the action range")
    torch.manual_seed(int(seed))
    config = family.config_class(lowdim_shapes={k: tuple(v) for k, v in lowdim_shapes.items()},
                                 image_shapes={k: tuple(v) for k, v in (image_shapes or {}).items()},
                                 action_dim=len(action_low), down_dims=size)
    policy = family.policy_class(config).eval()
    stats = {k: {"min": -np.ones(int(np.prod(v))), "max": np.ones(int(np.prod(v)))} for k, v in lowdim_shapes.items()}
    stats["action"] = {"min": np.asarray(action_low, dtype=np.float64), "max": np.asarray(action_high, dtype=np.float64)}
    policy.set_normalizer(stats)
    return policy


# ------------------------------------------------------------ the built-in families


def _unet_size(node: dict[str, Any]) -> dict[str, Any]:
    """``size`` names the U-Net's widths unless ``down_dims`` gives them."""
    node = dict(node)
    size = node.pop("size", None)
    if node.get("down_dims") is None:
        node["down_dims"] = size
    return node


_SIZE = {"size": ("small", "U-Net size: small (32/64/128) | medium (64/128/256) | dp_lowdim | dp_image; "
                           "down_dims overrides it")}


def _build_distilled(family: PolicyFamily, node: dict[str, Any], *, stats=None, **shapes: Any):
    """A student of ``family`` on its EDM teacher's network, starting from the teacher's weights (or ``init``)."""
    from rtdp.policies import load_policy
    from rtdp.policies.edm_unet import EdmUnetPolicy

    if not node.get("teacher"):
        raise ConfigError(f"policy={family.name} distils an EDM policy: pass policy.teacher=<edm run>/checkpoint")
    teacher = load_policy(node["teacher"])
    if type(teacher) is not EdmUnetPolicy:
        raise ConfigError(f"policy.teacher must be an EDM checkpoint (policy=edm), got {type(teacher).__name__}")
    own = {k: node[k] for k in family.fields() if k in node}
    # a one-step student: no streaming ladder, one network evaluation
    data = {**teacher.config.to_dict(), "ladder_prob": 0.0, "num_inference_steps": 1, **own}
    student = family.policy_class(family.config_class.from_dict(data))
    student.load_state_dict(teacher.state_dict())
    if node.get("init"):
        # continue from an earlier student (e.g. a DAgger round) instead of the teacher's weights
        start = load_policy(node["init"])
        if not isinstance(start, family.policy_class):
            raise ConfigError(f"policy.init must be a policy={family.name} checkpoint, got {type(start).__name__}")
        try:
            student.load_state_dict(start.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"policy.init={node['init']} does not match the teacher's network: {exc}") from None
    student.set_teacher(teacher)
    return student


_DISTILLED = {"teacher": (None, "an EDM checkpoint folder (rtdp train policy=edm ...)/checkpoint: required"),
              "init": (None, "a checkpoint of this family to start from (a DAgger round) instead of the teacher")}


def _register_builtins() -> None:
    from rtdp.policies.consistency import ConsistencyUnetPolicy
    from rtdp.policies.diffusion_unet import DiffusionUnetPolicy
    from rtdp.policies.edm_unet import EdmUnetPolicy
    from rtdp.policies.onestep import OneStepUnetPolicy
    from rtdp.policies.planner import AnchorPlanner, DiffusionPlanner, RegressionPlanner
    from rtdp.policies.streaming import StreamingPolicy
    from rtdp.policies.transformer import TransformerDiffusionPolicy

    register_family(PolicyFamily(
        name="unet", policy_class=DiffusionUnetPolicy, bench_configs=("ddpm-100", "ddim-10", "dpmpp-8", "dpmpp-5"),
        cli_extras=_SIZE, resolve=_unet_size, unet_sizes=True,
        description="Diffusion Policy's CNN: 1-D conditional U-Net, DDPM"))
    register_family(PolicyFamily(
        name="edm", policy_class=EdmUnetPolicy, settings={"edm": "euler", "stream": None},
        per_observation={"stream": StreamingPolicy},
        default_setting=lambda p: "edm" if p.config.sampler == "euler" else p.config.sampler,
        bench_configs=("edm-3", "stream-1", "stream-2"), cli_extras=_SIZE, resolve=_unet_size, unet_sizes=True,
        description="BESO/EDM score policy on the U-Net; few-step and streaming"))
    register_family(PolicyFamily(
        name="consistency", policy_class=ConsistencyUnetPolicy, settings={"cm": None}, core_samplers=False,
        default_setting=lambda p: "cm", bench_configs=("cm-1", "cm-2"),
        cli_fields=("cd_scales", "cd_sigma_min", "cd_target_ema", "cd_anchor_weight", "cd_obs_noise"),
        cli_extras=_DISTILLED, build=_build_distilled, unet_sizes=True,
        description="consistency policy distilled from an EDM policy; 1 network evaluation per chunk"))
    register_family(PolicyFamily(
        name="onestep", policy_class=OneStepUnetPolicy, settings={"onestep": None}, core_samplers=False,
        default_setting=lambda p: "onestep", bench_configs=("onestep-1",),
        cli_fields=("od_stochastic", "od_fake_steps", "od_fake_lr", "od_regress_weight"), cli_extras=_DISTILLED,
        build=_build_distilled, unet_sizes=True,
        description="one-step policy distilled from an EDM policy by distribution matching (OneDP)"))
    register_family(PolicyFamily(
        name="transformer", policy_class=TransformerDiffusionPolicy,
        bench_configs=("ddpm-100", "ddpm-100+bac10", "ddpm-100+uniform10", "ddim-10"),
        description="Diffusion Policy's transformer (TransformerForDiffusion), DDPM"))

    register_family(PolicyFamily(
        name="anchor", policy_class=AnchorPlanner, settings={"anchor": None}, core_samplers=False,
        default_setting=lambda p: "anchor", bench_configs=("anchor-2", "anchor-1"),
        description="DiffusionDrive driving planner: truncated diffusion from k-means anchors, 2 DDIM steps"))
    register_family(PolicyFamily(
        name="diffusion_plan", policy_class=DiffusionPlanner, settings={"ddim": None}, core_samplers=False,
        default_setting=lambda p: "ddim", bench_configs=("ddim-20", "ddim-2"),
        description="driving planner: vanilla diffusion from Gaussian noise, one trajectory query, DDIM"))
    register_family(PolicyFamily(
        name="regression", policy_class=RegressionPlanner, settings={"regress": None}, core_samplers=False,
        default_setting=lambda p: "regress", bench_configs=("regress-1",),
        description="driving planner: single-mode regression of one learned query (Transfuser's head), 1 call"))


_register_builtins()
