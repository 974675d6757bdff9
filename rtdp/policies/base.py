"""What every diffusion action policy shares, whatever its network and its noise process.

``PolicyConfig`` holds the observation and action shapes and Diffusion
Policy's windowing (``n_obs_steps`` To, ``horizon`` T, ``n_action_steps``
Ta). ``DiffusionPolicy`` validates observations, encodes them (a ResNet per
camera, the min-max normaliser for low-dim keys) into one conditioning
vector per chunk, and writes ``predict_action_chunk`` once: conditioning,
then the family's ``sample_trajectory``, then the executed slice in env
units. A family (DDPM, EDM, consistency, ...) supplies its network
(``_build_network``), its sampling (``sample_trajectory``) and its loss.
Acceleration of the network is ``rtdp.core.accelerate``'s, by configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rtdp.core import SAMPLERS
from rtdp.core.accelerate import accelerate
from rtdp.data.normalizer import LimitsNormalizer
from rtdp.errors import ConfigError, DatasetError, ObservationError
from rtdp.models.base import Model, ModelConfig, int_tuple, positive_int
from rtdp.vision.resnet import ResNetImageEncoder


@dataclasses.dataclass(kw_only=True)
class PolicyConfig(ModelConfig):
    """Observation/action shapes and windowing of an action policy (names follow Diffusion Policy).

    Attributes:
        lowdim_shapes: per-step shape of each low-dimensional observation key.
        image_shapes: (H, W, 3) of each camera observation key.
        action_dim: Da.
        n_obs_steps: To, observation steps conditioning a chunk.
        horizon: T, length of the denoised action trajectory.
        n_action_steps: Ta, actions returned per chunk.
        crop_shape: (h, w) image crop (random in training, center at inference); None: no crop.
        sampler: default sampler, a key of ``rtdp.core.SAMPLERS``.
        num_inference_steps: default number of sampler steps.
        image_feature_dim: per-camera feature width.
        num_keypoints: spatial-softmax keypoints of the image encoder.
    """

    lowdim_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    image_shapes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    action_dim: int
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    crop_shape: tuple[int, int] | None = (84, 84)
    sampler: str = "ddpm"
    num_inference_steps: int = 100
    image_feature_dim: int = 64
    num_keypoints: int = 32

    # Fields the data decides (``rtdp train`` fills them from the replay buffer), not the command line.
    data_fields: ClassVar[tuple[str, ...]] = ("lowdim_shapes", "image_shapes", "action_dim")

    def __post_init__(self) -> None:
        super().__post_init__()
        # Accept lists / hydra containers, store plain tuples so the config round-trips through JSON unchanged.
        self.lowdim_shapes = {str(k): int_tuple(v, f"lowdim_shapes[{k!r}]") for k, v in dict(self.lowdim_shapes).items()}
        self.image_shapes = {str(k): int_tuple(v, f"image_shapes[{k!r}]") for k, v in dict(self.image_shapes).items()}
        if self.crop_shape is not None:
            self.crop_shape = int_tuple(self.crop_shape, "crop_shape")
            if len(self.crop_shape) != 2:
                raise ConfigError(f"crop_shape must be (height, width) or None, got {self.crop_shape}")
        for name in ("action_dim", "n_obs_steps", "horizon", "n_action_steps", "num_inference_steps",
                     "image_feature_dim", "num_keypoints"):
            setattr(self, name, positive_int(getattr(self, name), name))
        if not self.lowdim_shapes and not self.image_shapes:
            raise ConfigError("the policy needs at least one observation: lowdim_shapes and image_shapes are both empty")
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
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(sorted(SAMPLERS))}, got {self.sampler!r}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ConfigError(
                f"horizon must be >= n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps}, "
                f"got {self.horizon}"
            )

    @property
    def obs_feature_dim(self) -> int:
        """Width of the per-step observation feature (images then low-dim, sorted by key)."""
        lowdim = sum(math.prod(s) for s in self.lowdim_shapes.values())
        return len(self.image_shapes) * self.image_feature_dim + lowdim + self.extra_feature_dim

    @property
    def extra_feature_dim(self) -> int:
        """Per-step features a family appends to the observation features (none here)."""
        return 0


class DiffusionPolicy(Model):
    """An action policy: obs ``{key: (B, To, ...)}`` -> action chunk (B, Ta, Da) in env units.

    Args:
        config: a validated config of the family's ``config_class``.
    """

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    policy_type: ClassVar[str] = ""
    config: PolicyConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.policy_type = cls.model_type  # the name checkpoints and reports have always used

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.lowdim_keys = sorted(config.lowdim_shapes)
        self.image_keys = sorted(config.image_shapes)
        self.image_encoders = nn.ModuleList(
            ResNetImageEncoder(config.image_shapes[k], config.crop_shape, config.num_keypoints, config.image_feature_dim)
            for k in self.image_keys
        )
        self.model = self._build_network(config)
        shapes = {k: config.lowdim_shapes[k] for k in self.lowdim_keys}
        shapes["action"] = (config.action_dim,)
        self.normalizer = LimitsNormalizer(shapes)
        # Device and dtype of the policy's working tensors; derived, so not saved.
        self.register_buffer("dtype_anchor", torch.zeros((), dtype=torch.float32), persistent=False)
        self.last_nfe = 0
        self.last_sample_nfe = 0.0
        self._sigma_cache: dict[tuple[str, int, torch.device], torch.Tensor] = {}

    def _build_network(self, config: PolicyConfig) -> nn.Module:
        """The denoising network ``model(sample (B, T, Da), timestep, global_cond (B, To * F)) -> (B, T, Da)``."""
        raise NotImplementedError

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
        return self.dtype_anchor.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the policy's working tensors."""
        return self.dtype_anchor.dtype

    def with_network(self, precision: str | None = None, *, deepcache: int | None = None,
                     deepcache_branch: int = 1, cache_schedule: Mapping[str, Iterable[int]] | None = None,
                     compile: bool = False, cuda_graph: bool = False) -> "DiffusionPolicy":
        """This policy with its network in an inference form (``rtdp.core.accelerate`` names the options).

        Returns:
            this policy itself when every option is off; otherwise an
            inference-only view sharing everything but the network with this
            policy. Views are cached per setting and rebuilt when the weights
            change in place (training) or are replaced.

        Raises:
            ConfigError: options that do not combine, or one this network or CPU cannot run.
        """
        if precision is None and deepcache is None and cache_schedule is None and not compile and not cuda_graph:
            return self
        sched_key = None if cache_schedule is None else tuple(
            sorted((str(n), tuple(sorted(int(s) for s in v))) for n, v in cache_schedule.items()))
        key = (precision, deepcache, deepcache_branch, sched_key, bool(compile), bool(cuda_graph))
        version = tuple((id(p), p._version) for p in self.model.parameters())
        views = self.__dict__.setdefault("_fast_views", {})
        hit = views.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        net = accelerate(self.model, precision=precision, deepcache=deepcache, deepcache_branch=deepcache_branch,
                         deepcache_calls=self.max_network_calls(),
                         cache_schedule=None if sched_key is None else {n: set(v) for n, v in sched_key},
                         compile=compile, cuda_graph=cuda_graph, rows_hint=self.config.horizon)
        view = copy.copy(self)  # new __dict__, shared tensors
        view._modules = dict(self._modules)
        view._modules["model"] = net
        for cached in ("_dens", "_den", "_fast_views"):  # denoisers wrap the plain network
            view.__dict__.pop(cached, None)
        views[key] = (version, view)
        return view

    def size_label(self) -> str:
        """What the network's size is called in reports (U-Net widths, transformer layers x width, ...)."""
        widths = getattr(self.config, "down_dims", None)
        return "/".join(map(str, widths)) if widths else f"{sum(p.numel() for p in self.model.parameters())} params"

    def max_network_calls(self) -> int:
        """An upper bound on network calls per chunk (a DeepCache schedule covers this many)."""
        return 2 * getattr(self.config, "num_train_timesteps", 100) + 1

    # ---------------------------------------------------------- observations

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
                value = value.to(device=self.device, dtype=self.dtype)
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

    def conditioning(self, obs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode observations once per chunk: (cond (B, To * F), the goal-free cond or None)."""
        return self._encode(self._check_obs(obs, exact_steps=True), random_crop=False), None

    def _check_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Validated training observations and the normalised action (B, T, Da)."""
        cfg = self.config
        self.normalizer.require_set()
        if "obs" not in batch or "action" not in batch:
            raise DatasetError(f"a training batch needs 'obs' and 'action', got keys {sorted(batch)}")
        obs = self._check_obs(batch["obs"], exact_steps=False)
        action = torch.as_tensor(batch["action"]).to(device=self.device, dtype=self.dtype)
        bsz = next(iter(obs.values())).shape[0]
        if tuple(action.shape) != (bsz, cfg.horizon, cfg.action_dim):
            raise DatasetError(
                f"batch['action'] must have shape ({bsz}, {cfg.horizon}, {cfg.action_dim}) = (B, horizon, action_dim), "
                f"got {tuple(action.shape)}"
            )
        return obs, self.normalizer.normalize("action", action)

    # ------------------------------------------------------------------ noise

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal on the policy's device, drawn on the generator's device (same numbers on CPU and GPU)."""
        gen_device = generator.device if generator is not None else self.device
        dtype = self.dtype if dtype is None else dtype
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(self.device)

    def initial_noise(self, batch: int, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
        """Standard-normal (B, T, Da) starting noise: drawn from ``generator``, or ``noise`` checked and moved."""
        cfg = self.config
        shape = (batch, cfg.horizon, cfg.action_dim)
        if noise is None:
            return self._randn(shape, generator)
        noise = torch.as_tensor(noise).to(device=self.device, dtype=self.dtype)
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

    # ----------------------------------------------------------------- public

    def _check_steps(self, steps: Any) -> int:
        """Sampler steps as an int in 1..``num_train_timesteps`` (a family with other limits overrides this)."""
        most = getattr(self.config, "num_train_timesteps", None)
        valid = not isinstance(steps, bool) and isinstance(steps, (int, np.integer))
        if not valid or most is None or not 1 <= steps <= most:
            raise ConfigError(f"steps must be an int in 1..{most} (the policy's num_train_timesteps), got {steps!r}")
        return int(steps)

    def sample_trajectory(self, cond: torch.Tensor, uncond: torch.Tensor | None, *, sampler: str | None,
                          steps: int, generator: torch.Generator | None, noise: torch.Tensor | None,
                          inpaint: tuple[Any, Any] | None, **options: Any) -> torch.Tensor:
        """The family's denoised trajectory (B, T, Da), normalised units; sets ``last_nfe`` / ``last_sample_nfe``."""
        raise NotImplementedError

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
        **options: Any,
    ) -> torch.Tensor:
        """Sample an action chunk.

        Args:
            obs: ``{key: (B, To, *shape)}`` tensors or numpy arrays in env units;
                images (B, To, H, W, 3) uint8 or float 0..255. Extra keys are ignored.
            sampler: a key of ``rtdp.core.SAMPLERS``; default ``config.sampler``
                (a consistency policy has its own and ignores it).
            steps: sampler steps; default ``config.num_inference_steps``.
            generator: source of the initial and per-step noise.
            noise: standard-normal initial noise (B, T, Da), to fix the sample.
            inpaint: ``(actions, weights)``: committed actions (B, K, Da) in env
                units for the first K returned positions and their weights (K,)
                in [0, 1] (real-time chunking; see ``rtdp.core.inpaint``).
            n_actions: actions returned (default ``n_action_steps``; up to the
                rest of the horizon, which an asynchronous controller keeps in reserve).
            options: family options, e.g. ``guidance_scale`` / ``guidance_skip_cos``
                of a goal-conditioned EDM policy.

        Returns:
            actions (B, Ta, Da) in env units: steps To-1 .. To-1+Ta of the
            denoised horizon (the first action is for the current step).

        Raises:
            UnknownNameError: unknown sampler.
            ConfigError: normaliser not set, bad steps or noise shape, an option the family lacks.
            ObservationError: missing key, wrong shape, or NaN/Inf in obs.
        """
        cfg = self.config
        self.normalizer.require_set()
        steps = self._check_steps(cfg.num_inference_steps if steps is None else steps)
        cond, uncond = self.conditioning(obs)
        x = self.sample_trajectory(cond, uncond, sampler=sampler, steps=steps, generator=generator, noise=noise,
                                   inpaint=inpaint, **options)
        start = cfg.n_obs_steps - 1
        return self.normalizer.unnormalize("action", x[:, start : start + self.chunk_length(n_actions)])
