"""``rtdp <verb> [key=value ...]``: every verb is a hydra config plus a ``run(cfg)``.

The verb picks ``rtdp/configs/<verb>.yaml``; the remaining arguments are hydra
overrides. An override of a key the config does not have is an error, never a
silent no-op. ``--json PATH`` is accepted as a spelling of ``json=PATH``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from rtdp.errors import ConfigError, RtdpError, UnknownNameError

CONFIG_DIR = Path(__file__).parent / "configs"
VERBS = ("collect", "train", "eval", "bench", "demo", "control", "image")

USAGE = """usage: rtdp <verb> [key=value ...]    (rtdp <verb> --help: its keys; rtdp --version)

verbs:
  demo      the shipped DDPM and fast policies on the same seeds, one table, then real-time control
  collect   roll out a task's scripted expert into a zarr replay buffer
  train     train a diffusion policy from a zarr replay buffer
  eval      evaluate a checkpoint (or the expert) on the task's evaluation seeds
  bench     latency, NFE, fidelity and success of inference configurations side by side
  control   drive a robot (simulated or Dynamixel) with a checkpoint in real time
  image     train a small image diffusion model (diffusers UNet2DModel) on rendered scenes

examples:
  rtdp demo out=outputs/demo
  rtdp collect task=pusht episodes=200 out=data/pusht.zarr
  rtdp train task=pusht data=data/pusht.zarr out=runs/pusht
  rtdp eval checkpoint=runs/pusht/checkpoint episodes=50 sampler=ddim steps=10 json=eval.json
  rtdp bench checkpoint=runs/pusht/checkpoint checkpoints=[runs/pusht_edm/checkpoint] episodes=50 json=bench.json
  rtdp control checkpoint=rtdp/assets/checkpoints/pusht/checkpoint driver=sim episodes=50 json=control.json
  rtdp control size=dp_lowdim driver=dynamixel port=emulator rate_hz=50 duration_s=600
  rtdp bench size=dp_lowdim configs=[ddpm-100,ddim-10,edm-3,stream-1,cm-1] json=bench_dp.json
  rtdp image out=runs/scenes && rtdp bench image=runs/scenes configs=[ddim-50,ddim-50+deepcache3]
  rtdp collect task=highway scenes=8000 workers=2 out=data/highway.zarr
  rtdp train task=highway policy=anchor data=data/highway.zarr out=runs/highway_anchor steps=4000 batch_size=64
  rtdp eval task=highway checkpoint=rtdp/assets/checkpoints/highway/checkpoint json=eval_highway.json
  rtdp bench task=highway checkpoint=runs/highway_anchor/checkpoint checkpoints=[runs/highway_regression/checkpoint]
"""


def _normalise_args(args: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(args):
            out.append(f"{a[2:]}={args[i + 1]}")
            i += 2
            continue
        out.append(a[2:] if a.startswith("--") else a)
        i += 1
    return out


def register_config_groups() -> None:
    """Offer every registered task and policy family as a hydra config group option (``task=``, ``policy=``).

    The ``policy`` node of a family is derived from its config dataclass
    (``PolicyFamily.cli_defaults``) and a task's from its ``TaskSpec``, so a
    family or task registered in code, by rtdp or another package, is on the
    command line without a yaml file.
    """
    from hydra.core.config_store import ConfigStore

    from rtdp.envs import TASKS
    from rtdp.policies.registry import FAMILIES

    store = ConfigStore.instance()
    for name in TASKS:
        store.store(group="task", name=name, node={"name": name})
    for name, family in FAMILIES.items():
        store.store(group="policy", name=name, node=family.cli_defaults())


def compose(verb: str, overrides: list[str], *, check_missing: bool = True):
    """Compose the config of a verb with overrides; typed errors for bad ones (and for required keys left
    unset, unless ``check_missing`` is false)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if verb not in VERBS:
        raise UnknownNameError("verb", verb, list(VERBS))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"argument {o!r} is not key=value; see `rtdp --help`")
    register_config_groups()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=verb, overrides=overrides)
    except MissingConfigException as exc:
        first = str(exc).splitlines()[0]
        options = getattr(exc, "options", None) or []
        hint = f"; available: {', '.join(sorted(options))}" if options else ""
        raise ConfigError(f"{first}{hint}") from None
    except (ConfigCompositionException, OmegaConfBaseException) as exc:
        msg = str(exc).splitlines()[0]
        cause = exc.__cause__
        if cause is not None:
            msg += f": {str(cause).splitlines()[0]}"
        raise ConfigError(f"bad override for `rtdp {verb}`: {msg}") from None
    missing = [k for k in OmegaConf.missing_keys(cfg)] if check_missing else []
    if missing:
        raise ConfigError(f"`rtdp {verb}` needs {', '.join(f'{k}=...' for k in missing)}")
    return cfg


def task_name(cfg) -> str | None:
    """The task a verb's config names, or None.

    ``task=NAME`` selects the option NAME of the config group ``task`` (``register_config_groups``), so
    ``cfg.task`` is a node with a ``name``; a config built in code may hold
    the plain name instead.
    """
    task = cfg.get("task")
    if task is None or isinstance(task, str):
        return task
    return str(task.name)


def _task_handler(verb: str, cfg):
    """The task's own function for ``verb`` (``TaskSpec.verbs``), for the task named on the command line or,
    failing that, the one the checkpoint was trained on; None for the shared workflow."""
    import json

    from rtdp.envs import get_task

    name = task_name(cfg)
    checkpoint = cfg.get("checkpoint")
    if name is None and checkpoint:
        meta = Path(str(checkpoint)) / "meta.json"
        try:
            name = json.loads(meta.read_text()).get("task") if meta.is_file() else None
        except (OSError, ValueError):
            name = None  # the shared workflow reports the unreadable checkpoint
    return get_task(name).handler(verb) if name else None


def _print_verb_help(verb: str, overrides: list[str]) -> int:
    from rtdp.cli_help import verb_help

    groups = [o for o in overrides if o.split("=", 1)[0] in ("task", "policy")]  # the keys help follows
    compose(verb, groups, check_missing=False)  # an unknown verb, task or family: the typed error
    print(verb_help(verb, groups, USAGE, CONFIG_DIR))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rtdp`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from rtdp import __version__

        print(f"rtdp {__version__}")
        return 0
    verb = args[0]
    wants_help = any(a in ("-h", "--help") for a in args[1:])
    overrides = _normalise_args([a for a in args[1:] if a not in ("-h", "--help")])
    try:
        if wants_help:
            return _print_verb_help(verb, overrides)
        cfg = compose(verb, overrides)
        handler = _task_handler(verb, cfg)
        if handler is not None:
            handler(cfg)
        else:
            importlib.import_module(f"rtdp.workflows.{verb}").run(cfg)
    except RtdpError as exc:
        print(f"rtdp {verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtdp {verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
