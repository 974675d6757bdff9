"""Feature caching across denoising steps: one mechanism for DeepCache and block-wise schedules.

Adjacent denoising steps compute nearly the same deep features. A
:class:`CachedNetwork` wraps chosen submodules of any network; each wrapped
module has a schedule, the set of step indices (network calls since the last
:meth:`CachedNetwork.reset`) at which it runs. On the other steps it returns
the output it produced last, whatever its structure (tensor, tuple, dict),
without running. What gets cached and when is data: DeepCache (Ma et al.
2024) is "every module deeper than the branch, updated every N steps";
block-wise adaptive caching gives each attention / feed-forward block its own
steps. The 1-D policy U-Net, the transformer and a diffusers ``UNet2DModel``
all go through this one code path.

The cache holds per-chunk state by nature; ``reset()`` must be called before
every new sample (``rtdp.policies.runner.Runner`` does it per chunk). The
wrapped network counts its own calls, so a sampler needs no knowledge of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from rtdp.errors import ConfigError

__all__ = ["CachedModule", "CachedNetwork", "deepcache_schedule", "unet2d_deepcache_modules", "uniform_schedule"]


class CachedModule(nn.Module):
    """A submodule that runs only at its scheduled steps and otherwise replays its last output."""

    def __init__(self, inner: nn.Module, name: str, owner: "CachedNetwork") -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.__dict__["_owner"] = owner  # not a child module: no cycle in the module tree
        self.calls = 0  # inner forward passes since construction (tests count them)

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their blocks (diffusers: `block.resnets`); answer for the inner one.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def replays(self) -> bool:
        """Whether the next call returns the stored output without running (its inputs are then unused)."""
        owner = self._owner
        return not owner.runs(self.name) and self.name in owner.store

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        if owner.runs(self.name) or self.name not in owner.store:
            out = self.inner(*args, **kwargs)
            self.calls += 1
            owner.store[self.name] = out
            return out
        return owner.store[self.name]


class CachedNetwork(nn.Module):
    """``net`` with the named submodules cached on a per-module step schedule.

    Args:
        net: the network; its submodules are replaced by wrappers in place, so pass a
            copy when the plain network must stay usable.
        schedule: ``{module name: steps at which it runs}``; step 0 always runs.
            Modules not named run at every step.

    Raises:
        ConfigError: a name that is not a submodule, or nested names (a cached
            module inside another cached one).
    """

    def __init__(self, net: nn.Module, schedule: Mapping[str, Iterable[int]]) -> None:
        super().__init__()
        names = sorted(schedule)
        modules = dict(net.named_modules())
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            raise ConfigError(f"cannot cache {unknown}: not submodules of {type(net).__name__}")
        nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
        if nested:
            raise ConfigError(f"cached modules may not contain each other, got {nested[0]}")
        self.net = net
        self.schedule = {n: frozenset(int(s) for s in schedule[n]) | {0} for n in names}
        self.store: dict[str, Any] = {}
        self.step = -1
        self.wrapped: dict[str, CachedModule] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else net
            wrapper = CachedModule(modules[name], name, self)
            setattr(parent, child, wrapper)  # also right for ModuleList entries ("0", "1", ...)
            self.wrapped[name] = wrapper

    def reset(self) -> None:
        """Forget cached features and restart the step count (call before each new sample)."""
        self.store.clear()
        self.step = -1

    def runs(self, name: str) -> bool:
        """Whether module ``name`` runs at the current step."""
        return self.step in self.schedule[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.step += 1
        return self.net(*args, **kwargs)


def uniform_schedule(names: Iterable[str], steps: int, interval: int) -> dict[str, set[int]]:
    """Every module in ``names`` runs at steps 0, interval, 2·interval, ... < steps."""
    if int(interval) < 1:
        raise ConfigError(f"cache interval must be >= 1, got {interval}")
    return {n: set(range(0, int(steps), int(interval))) for n in names}


def deepcache_schedule(deep_modules: Iterable[str], steps: int, interval: int) -> dict[str, set[int]]:
    """DeepCache: the modules below the skip branch run every ``interval`` steps, the shallow path always."""
    return uniform_schedule(deep_modules, steps, interval)


def unet2d_deepcache_modules(model: nn.Module, branch: int = 0) -> list[str]:
    """DeepCache's deep part of a diffusers ``UNet2DModel`` (or any model with ``down_blocks``,
    ``mid_block`` and ``up_blocks`` run in that order, up block j consuming down block n-1-j's skips).

    The shallow path keeps down blocks 0..``branch`` and up blocks n-1-``branch``..n-1; the down
    blocks below, the mid block and the deeper up blocks are cached.

    Raises:
        ConfigError: a model without that structure, or ``branch`` outside 0 .. n - 2.
    """
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    if down is None or up is None or getattr(model, "mid_block", None) is None or len(down) != len(up):
        raise ConfigError(f"{type(model).__name__} has no down_blocks / mid_block / up_blocks U-Net structure")
    n = len(down)
    if not 0 <= int(branch) <= n - 2:
        raise ConfigError(f"DeepCache branch must be in 0..{n - 2} for {n} down blocks, got {branch}")
    b = int(branch)
    return ([f"down_blocks.{i}" for i in range(b + 1, n)] + ["mid_block"]
            + [f"up_blocks.{j}" for j in range(n - 1 - b)])
