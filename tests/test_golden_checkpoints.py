"""Every shipped checkpoint gives the recorded actions from the same observations and noise.

The goldens (``tests/golden/checkpoint_actions.safetensors``) were written by
``tests/golden/record_checkpoints.py`` before the model base, the family
registry and the core's acceleration wiring were refactored, and are kept:
a change that moves any action of any shipped checkpoint, with any sampler or
acceleration the goldens cover, fails here. On the machine and torch version
that recorded them the comparison is bit for bit; elsewhere floating-point
kernels differ in the last bits, so it allows 1e-4 in normalised action units.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("record_checkpoints", REPO / "tests" / "golden" / "record_checkpoints.py")
record = importlib.util.module_from_spec(spec)
sys.modules["record_checkpoints"] = record
spec.loader.exec_module(record)


def _goldens() -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    with safe_open(str(record.GOLDEN_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["machine"]


GOLDEN, GOLDEN_MACHINE = _goldens()
SAME_MACHINE = GOLDEN_MACHINE == record.machine()


def _check(name: str, key: str, got: torch.Tensor) -> None:
    from rtdp.policies import load_policy

    want = GOLDEN[key]
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)}, golden {tuple(want.shape)}"
    if SAME_MACHINE:
        assert torch.equal(got, want), f"{key}: max |diff| {float((got - want).abs().max()):.3e} (must be bit-exact here)"
        return
    norm = load_policy(record.checkpoint_dir(name)).normalizer
    if key.endswith("/loss"):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        return
    diff = (norm.normalize("action", got) - norm.normalize("action", want)).abs().max()
    assert float(diff) < 1e-4, f"{key}: max |diff| {float(diff):.3e} in normalised units (other machine: {GOLDEN_MACHINE})"


def test_every_shipped_checkpoint_has_goldens():
    shipped = sorted(p.parent.name for p in (REPO / "rtdp" / "assets" / "checkpoints").glob("*/checkpoint"))
    covered = {name for name, *_ in record.CASES} | {name for name, *_ in record.PLANNER_CASES}
    assert shipped and set(shipped) <= covered, f"checkpoints without goldens: {sorted(set(shipped) - covered)}"


@pytest.mark.parametrize("name,case,kwargs,calls", record.CASES, ids=[f"{c[0]}/{c[1]}" for c in record.CASES])
def test_actions_match_the_goldens(name, case, kwargs, calls):
    policy = record.load(name)
    got = record.inpaint_case(policy) if case.endswith("+inpaint") else record.run_case(policy, kwargs, calls)
    _check(name, f"{name}/{case}", got)


def test_training_losses_match_the_goldens():
    for key, got in record.loss_cases().items():
        _check(key.split("/")[0], key, got)


@pytest.mark.parametrize("name,case,steps", record.PLANNER_CASES, ids=[f"{c[0]}/{c[1]}" for c in record.PLANNER_CASES])
def test_planner_plans_match_the_goldens(name, case, steps):
    from safetensors import safe_open

    from rtdp.models import load_model

    with safe_open(str(record.PLANNER_FILE), framework="pt") as f:
        want, machine = f.get_tensor(f"{name}/{case}"), f.metadata()["machine"]
    torch.set_num_threads(1)
    got = record.planner_case(name, steps)
    assert got.shape == want.shape
    if machine == record.machine():
        assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max()):.3e} m (must be bit-exact here)"
        return
    norm = load_model(record.checkpoint_dir(name)).normalizer
    diff = (norm.normalize("action", got) - norm.normalize("action", want)).abs().max()
    assert float(diff) < 1e-4, f"max |diff| {float(diff):.3e} in normalised units (other machine: {machine})"
