"""Shared fixtures: where Diffusion Policy's PushT dataset is, if anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def dp_pusht_store() -> Path | None:
    """Diffusion Policy's pusht_cchi_v7_replay.zarr: $RTDP_DP_DATA or ../shared/data beside the checkout."""
    candidates = []
    if os.environ.get("RTDP_DP_DATA"):
        candidates.append(Path(os.environ["RTDP_DP_DATA"]))
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        store = c if c.name.endswith(".zarr") else c / "pusht_cchi_v7_replay.zarr"
        if (store / "meta").is_dir():
            return store
    return None


@pytest.fixture
def dp_pusht() -> Path:
    """Path of Diffusion Policy's PushT store; skips the test when absent."""
    store = dp_pusht_store()
    if store is None:
        pytest.skip("Diffusion Policy's PushT dataset not found (set RTDP_DP_DATA or place it in ../shared/data)")
    return store


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run on one torch thread: the suite's numbers must not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
