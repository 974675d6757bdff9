"""The CLI composes hydra configs and turns bad input into typed errors."""

from __future__ import annotations

import pytest

from rtdp.cli import compose, main, task_name
from rtdp.errors import ConfigError, UnknownNameError


def test_overrides_reach_the_config() -> None:
    cfg = compose("train", ["task=lift", "data=d.zarr", "out=o", "steps=7", "policy.size=dp_lowdim"])
    assert cfg.task.name == "lift" and cfg.steps == 7 and cfg.policy.size == "dp_lowdim"


def test_unknown_key_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(ConfigError, match="stepz"):
        compose("train", ["data=d", "out=o", "stepz=3"])


def test_unknown_task_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="available: highway, lift, pusht, pusht_goal, pusht_image"):
        compose("collect", ["task=nope", "out=x"])


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError, match="data=..."):
        compose("train", ["out=o"])


def test_unknown_verb() -> None:
    with pytest.raises(UnknownNameError):
        compose("fly", [])


def test_main_prints_error_and_exits_2(capsys) -> None:
    assert main(["eval", "checkpoint=/nonexistent/ckpt"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_json_flag_spelling() -> None:
    from rtdp.cli import _normalise_args

    assert _normalise_args(["--json", "r.json", "episodes=3"]) == ["json=r.json", "episodes=3"]


@pytest.mark.parametrize("verb,default", [("eval", None), ("bench", None), ("control", None), ("demo", "pusht")])
def test_every_verb_takes_task_on_the_command_line(verb, default) -> None:
    # `task` is also a config group (configs/task/): a plain key of that name could not be overridden.
    assert task_name(compose(verb, [])) == default
    assert task_name(compose(verb, ["task=lift"])) == "lift"
    with pytest.raises(ConfigError, match="lift, pusht"):
        compose(verb, ["task=nosuch"])


def _printed_keys(text: str) -> list[str]:
    return [line.split()[0].split("=", 1)[0] for line in text.splitlines()
            if line.startswith("  ") and "=" in line.split()[0] and not line.startswith("  rtdp ")]


@pytest.mark.parametrize("verb", ["collect", "train", "eval", "bench", "demo", "control", "image"])
def test_every_verb_help_lists_every_key_of_its_config(verb, capsys) -> None:
    from omegaconf import OmegaConf

    from rtdp.cli import VERBS

    assert verb in VERBS
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    cfg = OmegaConf.to_container(compose(verb, [], check_missing=False), resolve=False)
    expected = list(cfg) + [f"policy.{k}" for k in (cfg.get("policy") or {}) if k != "name"]
    printed = _printed_keys(out)
    assert sorted(set(printed) - {"policy"}) == sorted(set(expected) - {"policy"})
    assert f"example:\n  rtdp {verb} " in out


def test_help_follows_the_family_asked_for_and_lists_the_registries(capsys) -> None:
    from rtdp.envs import TASKS
    from rtdp.policies.registry import FAMILIES, get_family

    assert main(["train", "policy=edm", "-h"]) == 0
    out = capsys.readouterr().out
    assert f"choices: {', '.join(FAMILIES)}" in out and f"choices: {', '.join(TASKS)}" in out
    printed = {k for k in _printed_keys(out) if k.startswith("policy.")}
    assert printed == {f"policy.{k}" for k in get_family("edm").cli_defaults() if k != "name"}
    assert "sigma_data" in " ".join(printed)  # an EDM key, not the U-Net's DDPM ones


def test_version(capsys) -> None:
    import rtdp

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rtdp {rtdp.__version__}"


def test_help_of_an_unknown_verb_is_an_error(capsys) -> None:
    assert main(["fly", "--help"]) == 2
    assert "unknown verb" in capsys.readouterr().err
