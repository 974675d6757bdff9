"""Diffusion Policy with a 1-D temporal CNN (Chi et al. 2023, "Diffusion Policy", CNN variant).

Observations of the last ``n_obs_steps`` steps (low-dimensional vectors and
camera images) are encoded once per chunk into a global conditioning vector;
a ``ConditionalUnet1D`` trained with the DDPM epsilon objective denoises a
``horizon``-step action trajectory, sampled through ``rtdp.core``; the policy
returns the ``n_action_steps`` actions starting at the current step.

Everything a user needs to run the policy lives in its state dict: network
weights and the min-max normaliser. Checkpoints are a ``model.safetensors``
plus a ``config.json`` with a ``schema_version``; nothing is pickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rtdp.core import (
    fast_network,
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    SAMPLERS,
    DiscreteEpsDenoiser,
    get_sampler,
    get_sigmas,
    make_alphas_cumprod,
    vp_noise_to_start,
)
from rtdp.core.cache import CachedNetwork, deepcache_schedule
from rtdp.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    MissingKeyError,
    ObservationError,
)
from rtdp.policies.unet1d import ConditionalUnet1D
from rtdp.vision.resnet import ResNetImageEncoder

SCHEMA_VERSION = 1
POLICY_TYPE = "diffusion_unet"
FRACTIONAL_STEP_SAMPLERS = ("euler", "euler_a", "heun")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# U-Net channel widths: "small" (1.4 M parameters) and "medium" (4.6 M) train on
# two CPU cores in tens of minutes; "dp_lowdim" and "dp_image" are Diffusion
# Policy's published sizes for low-dim and image tasks.
SIZES: dict[str, tuple[int, ...]] = {
    "small": (32, 64, 128),
    "medium": (64, 128, 256),
    "dp_lowdim": (256, 512, 1024),
    "dp_image": (512, 1024, 2048),
}


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if any(v < 1 for v in out):
        raise ConfigError(f"{name} must be a sequence of positive ints, got {value!r}")
    return out


@dataclass(kw_only=True)
class DiffusionUnetConfig:
    """Configuration of ``DiffusionUnetPolicy`` (names follow Diffusion Policy).

    Attributes:
        lowdim_shapes: per-step shape of each low-dimensional observation key.
        image_shapes: (H, W, 3) of each camera observation key.
        action_dim: Da.
        n_obs_steps: To, observation steps conditioning a chunk.
        horizon: T, length of the denoised action trajectory.
        n_action_steps: Ta, actions returned per chunk.
        down_dims: U-Net channels per level, or a name in ``SIZES``.
        kernel_size: U-Net temporal kernel size (odd).
        n_groups: GroupNorm groups of the U-Net.
        diffusion_step_embed_dim: width of the step embedding.
        num_train_timesteps: N of the DDPM training schedule.
        beta_schedule: one of ``rtdp.core.BETA_SCHEDULES``.
        clip_sample: clip predicted x0 to [-1, 1] while sampling.
        prediction_type: what the network is trained to predict, one of
            ``rtdp.core.PREDICTION_TYPES`` (diffusers' names): the noise
            (``"epsilon"``, Diffusion Policy's default), the clean trajectory
            (``"sample"``) or ``"v_prediction"``.
        crop_shape: (h, w) image crop (random in training, center at inference); None: no crop.
        sampler: default sampler, a key of ``rtdp.core.SAMPLERS``.
        num_inference_steps: default number of sampler steps.
        image_feature_dim: per-camera feature width.
        num_keypoints: spatial-softmax keypoints of the image encoder.
    """

    lowdim_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    image_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    action_dim: int
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    down_dims: tuple[int, ...] | str = SIZES["small"]
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    crop_shape: tuple[int, int] | None = (84, 84)
    sampler: str = "ddpm"
    num_inference_steps: int = 100
    image_feature_dim: int = 64
    num_keypoints: int = 32

    def __post_init__(self) -> None:
        # Accept lists / hydra containers, store plain tuples so the config
        # round-trips through JSON unchanged.
        self.lowdim_shapes = {
            str(k): _int_tuple(v, f"lowdim_shapes[{k!r}]") for k, v in dict(self.lowdim_shapes).items()
        }
        self.image_shapes = {
            str(k): _int_tuple(v, f"image_shapes[{k!r}]") for k, v in dict(self.image_shapes).items()
        }
        if isinstance(self.down_dims, str):
            if self.down_dims not in SIZES:
                raise ConfigError(
                    f"down_dims must be a tuple of ints or one of {', '.join(SIZES)}, got {self.down_dims!r}"
                )
            self.down_dims = SIZES[self.down_dims]
        self.down_dims = _int_tuple(self.down_dims, "down_dims")
        if self.crop_shape is not None:
            self.crop_shape = _int_tuple(self.crop_shape, "crop_shape")
            if len(self.crop_shape) != 2:
                raise ConfigError(f"crop_shape must be (height, width) or None, got {self.crop_shape}")
        for name in (
            "action_dim",
            "n_obs_steps",
            "horizon",
            "n_action_steps",
            "kernel_size",
            "n_groups",
            "diffusion_step_embed_dim",
            "num_train_timesteps",
            "num_inference_steps",
            "image_feature_dim",
            "num_keypoints",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))
        self.clip_sample = bool(self.clip_sample)

        if not self.lowdim_shapes and not self.image_shapes:
            raise ConfigError(
                "the policy needs at least one observation: lowdim_shapes and image_shapes are both empty"
            )
        both = sorted(set(self.lowdim_shapes) & set(self.image_shapes))
        if both:
            raise ConfigError(f"observation keys must be either low-dim or image, got {both} in both")
        if "action" in self.lowdim_shapes or "action" in self.image_shapes:
            raise ConfigError("'action' is reserved for the action normaliser; rename that observation key")
        for key, shape in self.image_shapes.items():
            if len(shape) != 3 or shape[2] != 3:
                raise ConfigError(f"image_shapes[{key!r}] must be (H, W, 3) channels last, got {shape}")
            if self.crop_shape is not None and (self.crop_shape[0] > shape[0] or self.crop_shape[1] > shape[1]):
                raise ConfigError(f"crop_shape {self.crop_shape} must fit inside image_shapes[{key!r}] = {shape}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(sorted(SAMPLERS))}, got {self.sampler!r}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"num_inference_steps must be <= num_train_timesteps={self.num_train_timesteps}, "
                f"got {self.num_inference_steps}"
            )
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ConfigError(
                f"horizon must be >= n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps}, "
                f"got {self.horizon}"
            )
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ConfigError(
                f"horizon must be a multiple of {factor} (the U-Net halves it {len(self.down_dims) - 1} times), "
                f"got {self.horizon}"
            )
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size}")
        bad = [d for d in self.down_dims if d % self.n_groups]
        if bad:
            raise ConfigError(f"down_dims entries must be multiples of n_groups={self.n_groups}, got {bad}")
        if self.diffusion_step_embed_dim % 2 or self.diffusion_step_embed_dim < 4:
            raise ConfigError(f"diffusion_step_embed_dim must be even and >= 4, got {self.diffusion_step_embed_dim}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DiffusionUnetConfig":
        """Build from ``to_dict`` output or a hydra node.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown DiffusionUnetConfig fields {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @property
    def obs_feature_dim(self) -> int:
        """Width of the per-step observation feature (images then low-dim, sorted by key)."""
        lowdim = sum(math.prod(s) for s in self.lowdim_shapes.values())
        return len(self.image_shapes) * self.image_feature_dim + lowdim + self.extra_feature_dim

    @property
    def extra_feature_dim(self) -> int:
        """Per-step features a subclass appends to the observation features (none here)."""
        return 0


class _FieldStats(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        for name in ("min", "max", "scale", "offset"):
            self.register_buffer(name, torch.zeros(shape))


class LimitsNormalizer(nn.Module):
    """Per-dimension min-max map of each field to [-1, 1] (Diffusion Policy's "limits" mode).

    Statistics are buffers, so they travel in the policy's state dict.
    Dimensions whose range is below ``range_eps`` are only shifted (constant
    -> 0) instead of divided by ~0.

    Args:
        shapes: per-sample shape of every normalised field.
        range_eps: smallest range treated as non-constant.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], range_eps: float = 1e-4) -> None:
        super().__init__()
        self.keys = list(shapes)
        self.range_eps = range_eps
        self._index = {k: i for i, k in enumerate(self.keys)}
        # A list, not a ModuleDict: observation keys may contain dots ("observation.state").
        self.fields = nn.ModuleList(_FieldStats(tuple(shapes[k])) for k in self.keys)
        self.register_buffer("is_set", torch.zeros((), dtype=torch.bool))

    def require_set(self) -> None:
        """Raise unless statistics were set.

        Raises:
            ConfigError: no statistics yet.
        """
        if not bool(self.is_set):
            raise ConfigError(
                "normaliser statistics are not set: call policy.set_normalizer(stats) with the dataset's "
                f"per-key min/max for {', '.join(self.keys)}, or load a trained policy with from_pretrained(dir)"
            )

    def set_stats(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Set statistics from ``{key: {"min": array, "max": array}}`` (env units).

        Raises:
            MissingKeyError: a field or its min/max is absent.
            DatasetError: a statistic has the wrong size, is non-finite, or max < min.
        """
        new = {}
        for key, f in zip(self.keys, self.fields):
            if key not in stats:
                raise MissingKeyError(f"normaliser statistics lack {key!r}; need min/max for {', '.join(self.keys)}")
            values = []
            for stat in ("min", "max"):
                if stat not in stats[key]:
                    raise MissingKeyError(f"normaliser statistics for {key!r} lack {stat!r}")
                arr = np.asarray(stats[key][stat], dtype=np.float64)
                if arr.size != math.prod(f.shape):
                    raise DatasetError(
                        f"normaliser statistic {key}.{stat} must have {math.prod(f.shape)} values (shape {f.shape}), "
                        f"got shape {arr.shape}"
                    )
                if not np.isfinite(arr).all():
                    raise DatasetError(f"normaliser statistic {key}.{stat} contains NaN/Inf")
                values.append(torch.from_numpy(arr.reshape(f.shape)))
            lo, hi = values
            if (hi < lo).any():
                raise DatasetError(f"normaliser statistics for {key!r} have max < min")
            rng = hi - lo
            flat = rng < self.range_eps
            rng = torch.where(flat, torch.full_like(rng, 2.0), rng)
            scale = 2.0 / rng
            offset = torch.where(flat, -lo, -1.0 - scale * lo)
            new[key] = (lo, hi, scale, offset)
        # Write only after every key validated, so a failed call leaves the old stats intact.
        for key, f in zip(self.keys, self.fields):
            for name, value in zip(("min", "max", "scale", "offset"), new[key]):
                getattr(f, name).copy_(value.to(getattr(f, name).dtype))
        self.is_set.fill_(True)

    def get_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Current statistics as ``{key: {"min": ndarray, "max": ndarray}}``."""
        return {
            k: {"min": f.min.cpu().numpy().copy(), "max": f.max.cpu().numpy().copy()}
            for k, f in zip(self.keys, self.fields)
        }

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Env units -> [-1, 1]; x (..., *shape)."""
        f = self.fields[self._index[key]]
        return x * f.scale + f.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> env units; x (..., *shape)."""
        f = self.fields[self._index[key]]
        return (x - f.offset) / f.scale


class DiffusionUnetPolicy(nn.Module):
    """Diffusion Policy (CNN): obs (B, To, ...) -> action chunk (B, Ta, Da).

    Args:
        config: a validated ``DiffusionUnetConfig``.
    """

    policy_type = POLICY_TYPE
    config_class = DiffusionUnetConfig

    def __init__(self, config: DiffusionUnetConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.lowdim_keys = sorted(config.lowdim_shapes)
        self.image_keys = sorted(config.image_shapes)
        self.image_encoders = nn.ModuleList(
            ResNetImageEncoder(
                config.image_shapes[k], config.crop_shape, config.num_keypoints, config.image_feature_dim
            )
            for k in self.image_keys
        )
        self.model = self._build_network(config)
        shapes = {k: config.lowdim_shapes[k] for k in self.lowdim_keys}
        shapes["action"] = (config.action_dim,)
        self.normalizer = LimitsNormalizer(shapes)
        # Derived from the config, so not saved.
        self.register_buffer(
            "alphas_cumprod", make_alphas_cumprod(config.num_train_timesteps, config.beta_schedule), persistent=False
        )
        self.last_nfe = 0
        self.last_sample_nfe = 0.0
        self._sigma_cache: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    def _build_network(self, config: DiffusionUnetConfig) -> nn.Module:
        """The denoising network ``model(sample (B, T, Da), timestep, global_cond (B, To * F)) -> (B, T, Da)``."""
        return ConditionalUnet1D(
            input_dim=config.action_dim,
            global_cond_dim=config.obs_feature_dim * config.n_obs_steps,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            down_dims=config.down_dims,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
        )

    # ------------------------------------------------------------------ setup

    def set_normalizer(self, stats: Mapping[str, Mapping[str, Any]]) -> None:
        """Set min/max statistics for every low-dim key and "action".

        Args:
            stats: ``{key: {"min": array, "max": array}}`` in env units.

        Raises:
            MissingKeyError: a key or statistic is missing.
            DatasetError: a statistic has the wrong size or is not finite.
        """
        self.normalizer.set_stats(stats)

    def reset(self) -> None:
        """Start a new episode. The policy keeps no state between chunks, so there is nothing to clear."""

    @property
    def device(self) -> torch.device:
        """Device of the policy's tensors."""
        return self.alphas_cumprod.device

    def with_network(self, precision: str | None = None, *, deepcache: int | None = None,
                     deepcache_branch: int = 1,
                     cache_schedule: Mapping[str, Iterable[int]] | None = None,
                     compile: bool = False, cuda_graph: bool = False) -> "DiffusionUnetPolicy":
        """This policy with its network in an inference form: packed weights and/or DeepCache.

        Args:
            precision: None (the plain network), ``"fp32"`` (packed, same outputs
                to ~1e-6), ``"bf16"``, ``"int8"`` or ``"int8dyn"`` (``rtdp.core.fastnet``).
            deepcache: reuse the U-Net's deep features, recomputing them every
                ``deepcache`` network calls (``rtdp.core.cache``); None: off. The
                cache restarts with every chunk (``Runner`` resets it).
            deepcache_branch: U-Net level whose skip feature the shallow path still computes.
            cache_schedule: ``{module name: network calls at which it runs}`` for
                any other caching schedule (block-wise caching, ``rtdp.core.bac``);
                not together with ``deepcache``.
            compile: run the network through ``torch.compile`` (inductor; the
                first calls compile it, later ones reuse it); the plain network
                only: not with a packed precision (its kernels do not lower) nor
                a cache, whose step counting is Python state.
            cuda_graph: replay the network from CUDA graphs
                (``rtdp.core.cudagraph``; the policy must be on a CUDA device).

        Returns:
            this policy itself when both are off; otherwise an inference-only
            view sharing everything but the network with this policy. Views are
            cached per setting and rebuilt when the weights change in place
            (training) or are replaced.

        Raises:
            ConfigError: unknown precision, one this CPU cannot run, or a
                network without DeepCache support.
        """
        if precision is None and deepcache is None and cache_schedule is None and not compile and not cuda_graph:
            return self
        if cuda_graph and (compile or deepcache is not None or cache_schedule is not None or precision is not None):
            raise ConfigError("cuda_graph replays the plain network as recorded: it does not combine with compile, "
                              "a cache (which skips blocks per call) or a packed CPU precision")
        if deepcache is not None and cache_schedule is not None:
            raise ConfigError("give deepcache or cache_schedule, not both: each names the modules it caches")
        if compile and precision is not None:
            raise ConfigError(f"torch.compile and precision={precision!r} do not combine: the packed layers call "
                              "oneDNN/fbgemm kernels on prepacked weights, which inductor cannot lower (measured: "
                              "LoweringException); compile the plain network or use the packed one")
        if compile and (deepcache is not None or cache_schedule is not None):
            raise ConfigError("torch.compile and feature caching do not combine: the cache decides per call, in "
                              "Python, which blocks run, so the compiled graph would be rebuilt or bypassed at "
                              "every step; use one of them")
        sched_key = None if cache_schedule is None else tuple(
            sorted((str(n), tuple(sorted(int(s) for s in v))) for n, v in cache_schedule.items()))
        key = (precision, deepcache, deepcache_branch, sched_key, bool(compile), bool(cuda_graph))
        version = tuple((id(p), p._version) for p in self.model.parameters())
        views = self.__dict__.setdefault("_fast_views", {})
        hit = views.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        net = fast_network(self.model, precision, rows_hint=self.config.horizon)
        if deepcache is not None:
            if not hasattr(self.model, "deepcache_modules"):
                raise ConfigError(f"DeepCache needs a U-Net; {type(self.model).__name__} has no skip branch to cut at")
            deep = self.model.deepcache_modules(deepcache_branch)
            net = CachedNetwork(net if precision is not None else copy.deepcopy(self.model).eval(),
                                deepcache_schedule(deep, 2 * self.config.num_train_timesteps + 1, deepcache))
        elif cache_schedule is not None:
            net = CachedNetwork(net if precision is not None else copy.deepcopy(self.model).eval(),
                                {n: set(v) for n, v in sched_key})
        if compile:
            net = torch.compile(net, dynamic=False)  # a wrapper: the plain network stays as it is
        if cuda_graph:
            from rtdp.core.cudagraph import CudaGraphNetwork

            net = CudaGraphNetwork(net)
        view = copy.copy(self)  # new __dict__, shared tensors
        view._modules = dict(self._modules)
        view._modules["model"] = net
        for cached in ("_dens", "_den", "_fast_views"):  # denoisers wrap the plain network
            view.__dict__.pop(cached, None)
        views[key] = (version, view)
        return view

    # -------------------------------------------------------------- internals

    def _denoiser(self, sampler: str = "ddpm") -> DiscreteEpsDenoiser:
        # Samplers whose levels fall between training steps (diffusers' Euler/Heun
        # "linspace" spacing) feed fractional timesteps interpolated as diffusers does;
        # the others visit training steps exactly.
        fractional = sampler in FRACTIONAL_STEP_SAMPLERS
        cache = self.__dict__.setdefault("_dens", {})
        den = cache.get(fractional)
        ac = self.alphas_cumprod
        if den is None or den.alphas_cumprod.device != ac.device or den.alphas_cumprod.dtype != ac.dtype:
            kwargs = {"quantize": False, "sigma_interpolation": "linear"} if fractional else {}
            den = DiscreteEpsDenoiser(
                self.model, self.alphas_cumprod, clip_x0=1.0 if self.config.clip_sample else None,
                prediction_type=self.config.prediction_type, **kwargs
            )
            # Kept out of the module tree: it wraps self.model, which must not appear twice in the state dict.
            cache[fractional] = den
        return den

    def _check_steps(self, steps: Any) -> int:
        cfg = self.config
        valid = not isinstance(steps, bool) and isinstance(steps, (int, np.integer))
        if not valid or not 1 <= steps <= cfg.num_train_timesteps:
            raise ConfigError(
                f"steps must be an int in 1..{cfg.num_train_timesteps} (the policy's num_train_timesteps), got {steps!r}"
            )
        return int(steps)

    def _sigmas(self, sampler: str, steps: int) -> torch.Tensor:
        key = (sampler, steps, self.device)
        sigmas = self._sigma_cache.get(key)
        if sigmas is None:
            sigmas = get_sigmas(sampler, self.alphas_cumprod.cpu(), steps).to(self.device)
            self._sigma_cache[key] = sigmas
        return sigmas

    def _check_obs(self, obs: Mapping[str, Any], exact_steps: bool) -> dict[str, torch.Tensor]:
        """Validate and convert obs to tensors on the policy's device, cut to the first To steps."""
        cfg = self.config
        if not isinstance(obs, Mapping):
            raise ObservationError(f"obs must be a dict of arrays keyed by observation name, got {type(obs).__name__}")
        out: dict[str, torch.Tensor] = {}
        batch = None
        for key in self.image_keys + self.lowdim_keys:
            if key not in obs:
                raise ObservationError(
                    f"observation {key!r} is missing; expected keys {', '.join(self.image_keys + self.lowdim_keys)}, "
                    f"got {', '.join(map(str, obs)) or 'none'}"
                )
            value = obs[key]
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ObservationError(f"observation {key!r} is not an array: {exc}") from None
            shape = cfg.image_shapes[key] if key in cfg.image_shapes else cfg.lowdim_shapes[key]
            steps_ok = value.ndim >= 2 and (
                value.shape[1] == cfg.n_obs_steps if exact_steps else value.shape[1] >= cfg.n_obs_steps
            )
            if value.ndim != 2 + len(shape) or not steps_ok or tuple(value.shape[2:]) != shape or (
                batch is not None and value.shape[0] != batch
            ):
                b = "B" if batch is None else str(batch)
                steps = str(cfg.n_obs_steps) if exact_steps else f">={cfg.n_obs_steps}"
                raise ObservationError(
                    f"observation {key!r} must have shape ({b}, {steps}, {', '.join(map(str, shape))}) "
                    f"= (batch, n_obs_steps, *shape), got {tuple(value.shape)}"
                )
            batch = value.shape[0]
            value = value[:, : cfg.n_obs_steps]
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ObservationError(f"observation {key!r} contains NaN/Inf")
            if key in cfg.lowdim_shapes:
                value = value.to(device=self.device, dtype=self.alphas_cumprod.dtype)
            else:
                value = value.to(device=self.device)
            out[key] = value
        return out

    def _encode(self, obs: dict[str, torch.Tensor], random_crop: bool, generator: torch.Generator | None = None):
        """Global conditioning (B, To * obs_feature_dim) from validated raw obs."""
        return self._encode_steps(obs, random_crop, generator).flatten(1)

    def _feature_slices(self) -> dict[str, slice]:
        """Columns of each low-dim key in the per-step feature vector."""
        start = len(self.image_keys) * self.config.image_feature_dim
        out = {}
        for key in self.lowdim_keys:
            width = math.prod(self.config.lowdim_shapes[key])
            out[key] = slice(start, start + width)
            start += width
        return out

    def _encode_steps(self, obs: dict[str, torch.Tensor], random_crop: bool, generator: torch.Generator | None = None):
        """Per-step observation features (B, To, obs_feature_dim - extra_feature_dim)."""
        feats = []
        for key, enc in zip(self.image_keys, self.image_encoders):
            img = obs[key]
            b, to = img.shape[:2]
            feats.append(enc(img.flatten(0, 1), random_crop=random_crop, generator=generator).reshape(b, to, -1))
        for key in self.lowdim_keys:
            x = self.normalizer.normalize(key, obs[key])
            feats.append(x.flatten(2))
        return torch.cat(feats, dim=-1)

    # ----------------------------------------------------------------- public

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal on the policy's device, drawn on the generator's device (same numbers on CPU and GPU)."""
        gen_device = generator.device if generator is not None else self.device
        dtype = self.alphas_cumprod.dtype if dtype is None else dtype
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(self.device)

    def initial_noise(self, batch: int, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
        """Standard-normal (B, T, Da) starting noise: drawn from ``generator``, or ``noise`` checked and moved."""
        cfg = self.config
        shape = (batch, cfg.horizon, cfg.action_dim)
        if noise is None:
            return self._randn(shape, generator)
        noise = torch.as_tensor(noise).to(device=self.device, dtype=self.alphas_cumprod.dtype)
        if tuple(noise.shape) != shape:
            raise ConfigError(f"noise must have shape {shape} = (B, horizon, action_dim), got {tuple(noise.shape)}")
        return noise

    def chunk_length(self, n_actions: int | None = None) -> int:
        """Actions a chunk returns: ``n_action_steps`` by default, at most the rest of the horizon."""
        cfg = self.config
        if n_actions is None:
            return cfg.n_action_steps
        most = cfg.horizon - cfg.n_obs_steps + 1
        if isinstance(n_actions, bool) or int(n_actions) != n_actions or not 1 <= int(n_actions) <= most:
            raise ConfigError(f"n_actions must be an int in 1..{most} (horizon - n_obs_steps + 1), got {n_actions!r}")
        return int(n_actions)

    def inpainted(self, denoiser, inpaint: tuple[Any, Any] | None):
        """``denoiser`` pulled towards committed actions (env units) at the first returned positions.

        Raises:
            ConfigError: the committed actions do not fit the chunk (shape, length, non-finite).
        """
        if inpaint is None:
            return denoiser
        from rtdp.core.inpaint import InpaintDenoiser

        cfg = self.config
        actions, weights = inpaint
        actions = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.device)
        if actions.ndim != 3 or actions.shape[-1] != cfg.action_dim or actions.shape[1] > cfg.horizon - cfg.n_obs_steps + 1:
            raise ConfigError(f"inpainting actions must be (B, K <= {cfg.horizon - cfg.n_obs_steps + 1}, "
                              f"{cfg.action_dim}), got {tuple(actions.shape)}")
        if not bool(torch.isfinite(actions).all()):
            raise ConfigError("inpainting actions contain NaN or Inf")
        target = self.normalizer.normalize("action", actions)
        return InpaintDenoiser(denoiser, target, torch.as_tensor(weights, dtype=torch.float32),
                               start=cfg.n_obs_steps - 1)

    def _check_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Validated training observations and the normalised action (B, T, Da)."""
        cfg = self.config
        self.normalizer.require_set()
        if "obs" not in batch or "action" not in batch:
            raise DatasetError(f"a training batch needs 'obs' and 'action', got keys {sorted(batch)}")
        obs = self._check_obs(batch["obs"], exact_steps=False)
        action = torch.as_tensor(batch["action"]).to(device=self.device, dtype=self.alphas_cumprod.dtype)
        bsz = next(iter(obs.values())).shape[0]
        if tuple(action.shape) != (bsz, cfg.horizon, cfg.action_dim):
            raise DatasetError(
                f"batch['action'] must have shape ({bsz}, {cfg.horizon}, {cfg.action_dim}) = (B, horizon, action_dim), "
                f"got {tuple(action.shape)}"
            )
        return obs, self.normalizer.normalize("action", action)

    def compute_loss(self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM loss on a batch of demonstrations (the target follows ``config.prediction_type``).

        Args:
            batch: ``{"obs": {key: (B, >=To, *shape)}, "action": (B, T, Da)}`` in env
                units; images uint8 or float 0..255, (B, >=To, H, W, 3).
            generator: source of the noise, timesteps and crops (default: torch's global RNG).

        Returns:
            scalar mean-squared error between the network's output and its target: the noise,
            the clean trajectory, or ``v = sqrt(abar) * noise - sqrt(1 - abar) * x0``.

        Raises:
            ConfigError: normaliser not set.
            ObservationError: bad observation keys/shapes/values.
            DatasetError: the action has the wrong shape.
        """
        cfg = self.config
        obs, x0 = self._check_batch(batch)
        bsz = x0.shape[0]
        cond = self._encode(obs, random_crop=self.training, generator=generator)
        noise = self._randn(x0.shape, generator, x0.dtype)
        gen_device = generator.device if generator is not None else self.device
        t = torch.randint(0, cfg.num_train_timesteps, (bsz,), generator=generator, device=gen_device).to(self.device)
        ac = self.alphas_cumprod[t].reshape(-1, 1, 1)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        kind = cfg.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else ac.sqrt() * noise - (1 - ac).sqrt() * x0
        return F.mse_loss(self.model(x_t, t, cond), target)

    @torch.no_grad()
    def predict_action_chunk(
        self,
        obs: Mapping[str, Any],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        inpaint: tuple[Any, Any] | None = None,
        n_actions: int | None = None,
    ) -> torch.Tensor:
        """Sample an action chunk.

        Args:
            obs: ``{key: (B, To, *shape)}`` tensors or numpy arrays in env units;
                images (B, To, H, W, 3) uint8 or float 0..255. Extra keys are ignored.
            sampler: a key of ``rtdp.core.SAMPLERS``; default ``config.sampler``.
            steps: sampler steps; default ``config.num_inference_steps``.
            generator: source of the initial and per-step noise.
            noise: standard-normal initial noise (B, T, Da), to fix the sample.
            inpaint: ``(actions, weights)``: committed actions (B, K, Da) in env
                units for the first K returned positions and their weights (K,)
                in [0, 1] (real-time chunking; see ``rtdp.core.inpaint``).
            n_actions: actions returned (default ``n_action_steps``; up to the
                rest of the horizon, which an asynchronous controller keeps in reserve).

        Returns:
            actions (B, Ta, Da) in env units: steps To-1 .. To-1+Ta of the
            denoised horizon (the first action is for the current step).

        Raises:
            UnknownNameError: unknown sampler.
            ConfigError: normaliser not set, bad steps or noise shape.
            ObservationError: missing key, wrong shape, or NaN/Inf in obs.
        """
        cfg = self.config
        self.normalizer.require_set()
        name = cfg.sampler if sampler is None else sampler
        sample_fn = get_sampler(name)
        steps = self._check_steps(cfg.num_inference_steps if steps is None else steps)
        sigmas = self._sigmas(name, steps)
        cond = self._encode(self._check_obs(obs, exact_steps=True), random_crop=False)
        noise = self.initial_noise(cond.shape[0], generator, noise)
        den = self._denoiser(name)
        den.reset_nfe()
        x = sample_fn(self.inpainted(den, inpaint), vp_noise_to_start(noise, float(sigmas[0])), sigmas,
                      cond=cond, generator=generator)
        self.last_nfe = den.nfe
        self.last_sample_nfe = float(den.nfe)
        start = cfg.n_obs_steps - 1
        return self.normalizer.unnormalize("action", x[:, start : start + self.chunk_length(n_actions)])

    # ------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed).

        Returns:
            the directory.
        """
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "policy_type": self.policy_type})
        meta = {"schema_version": SCHEMA_VERSION, "policy_type": self.policy_type, "config": self.config.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device | None = None
    ) -> "DiffusionUnetPolicy":
        """Load a policy written by ``save_pretrained``.

        Args:
            directory: checkpoint folder.
            device: where to put the weights (default CPU).

        Returns:
            the policy, in eval mode.

        Raises:
            CheckpointError: missing folder or file, unreadable file, other
                schema version, or weights that do not match the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
        cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.is_file():
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no {CONFIG_FILE}; it is incomplete or not an rtdp checkpoint"
            )
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CheckpointError(
                f"checkpoint schema_version {version}, this rtdp reads {SCHEMA_VERSION}; "
                "re-train or convert the checkpoint with a matching rtdp version"
            )
        if meta.get("policy_type", POLICY_TYPE) != cls.policy_type:
            raise CheckpointError(
                f"{cfg_path} is a {meta.get('policy_type')!r} checkpoint, not {cls.policy_type!r}; "
                "load it with rtdp.policies.load_policy(dir), which picks the class"
            )
        try:
            config = cls.config_class.from_dict(meta.get("config", {}))
        except (ValueError, TypeError) as exc:  # ConfigError is a ValueError
            raise CheckpointError(f"{cfg_path} holds an invalid config: {exc}") from exc
        if not weights_path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {weights_path}: {exc}") from exc
        policy = cls(config)
        expected = policy.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)}, config {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
            if mismatched:
                parts.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:3])})")
            raise CheckpointError(f"{weights_path} does not match {cfg_path}: tensors " + ", ".join(parts))
        policy.load_state_dict(state)
        if device is not None:
            policy.to(device)
        return policy.eval()
