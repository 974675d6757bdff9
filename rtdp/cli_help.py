"""``rtdp <verb> --help``: every key of the verb's config with its default and the comment beside it in the yaml.

The keys and defaults come from the composed config (so a new key cannot be
missed), the comments from ``rtdp/configs/<verb>.yaml``, and the choices of
``task=`` and ``policy=`` from the registries.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*)(?:#\s?(?P<comment>.*))?$")
_GROUP_LINE = re.compile(r"^\s+-\s+(?P<key>[A-Za-z_]\w*):[^#]*(?:#\s?(?P<comment>.*))?$")
_CONTINUATION = re.compile(r"^\s+#\s?(?P<comment>.*)$")


def yaml_comments(path: Path) -> dict[str, str]:
    """``{key: comment}`` of a verb's yaml: the text after ``#`` on a top-level key's line with the indented
    comment lines below it, else the comment block right above the key; a config group (``- task: null  #
    ...`` in ``defaults``) keeps its comment unless the key itself has one."""
    comments: dict[str, str] = {}
    last, above = None, []
    for line in path.read_text().splitlines():
        group = _GROUP_LINE.match(line)
        m = _KEY_LINE.match(line)
        c = _CONTINUATION.match(line)
        if group is not None:
            comments[group["key"]] = (group["comment"] or "").strip()
            last, above = None, []
        elif m is not None:
            text = (m["comment"] or "").strip() or " ".join(above)
            if text or m["key"] not in comments:
                comments[m["key"]] = text
            last, above = m["key"], []
        elif line.startswith("#"):
            above.append(line.lstrip("#").strip())
            last = None
        elif c is not None and last is not None and comments.get(last):
            comments[last] += " " + c["comment"].strip()
        else:
            last, above = None, []
    return comments


def _value(v) -> str:
    if v == "???":
        return "??? (required)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def verb_help(verb: str, overrides: list[str], usage: str, config_dir: Path) -> str:
    """The help text of ``rtdp <verb>`` (``overrides`` may pick ``task=`` or ``policy=``, whose keys are then shown)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rtdp.envs import TASKS
    from rtdp.policies.registry import FAMILIES, get_family

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=verb, overrides=overrides)
    comments = yaml_comments(config_dir / f"{verb}.yaml")
    tree = OmegaConf.to_container(cfg, resolve=False)
    lines = [f"usage: rtdp {verb} [key=value ...]", "", "keys (default, then what it does):"]
    rows: list[tuple[str, str]] = []
    for key, value in tree.items():
        if key == "task":
            shown = value["name"] if isinstance(value, dict) else _value(value)
            rows.append((f"task={shown}", f"{comments.get('task', '')}; choices: {', '.join(TASKS)}".lstrip("; ")))
        elif key == "policy":
            rows.append((f"policy={value['name']}", f"the policy family; choices: {', '.join(FAMILIES)}"))
        else:
            rows.append((f"{key}={_value(value)}", comments.get(key, "")))
    if "policy" not in tree and "policy" in comments:  # a group with no default (control): still offered
        rows.append(("policy=null", f"{comments['policy']}; choices: {', '.join(FAMILIES)}"))
    width = min(34, max(len(k) for k, _ in rows))
    lines += [f"  {k:<{width}}  {c}".rstrip() for k, c in rows]
    if isinstance(tree.get("policy"), dict):
        family = get_family(tree["policy"]["name"])
        helps = family.cli_help()
        lines += ["", f"policy.* keys of policy={family.name} (`rtdp {verb} policy=<family> --help` for another):"]
        lines += [f"  {f'policy.{k}={_value(v)}':<{width}}  {helps.get(k, '')}".rstrip()
                  for k, v in tree["policy"].items() if k != "name"]
    examples = [ln.strip().split(" && ")[0] for ln in usage.splitlines() if ln.strip().startswith(f"rtdp {verb} ")]
    if examples:
        lines += ["", "example:", f"  {examples[0]}"]
    return "\n".join(lines)
