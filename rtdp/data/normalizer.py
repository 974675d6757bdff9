"""Normalisation of observation and action fields, kept in a model's state dict.

``LimitsNormalizer`` is Diffusion Policy's "limits" mode: each dimension's
min-max range maps to [-1, 1]. Its statistics are buffers, so a checkpoint
carries them, and a model refuses to run before they are set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from rtdp.errors import ConfigError, DatasetError, MissingKeyError


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
