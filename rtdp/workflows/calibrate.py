"""Calibration of block-wise caching (BAC): record a transformer policy's block features in rollouts.

``calibrate_bac`` rolls the uncached policy out on a few episodes of its task
(training seeds, not the evaluation seeds), records every block's output at
every network call of every chunk, and returns the per-block similarity
matrices (``rtdp.core.bac.BacCalibration``). ``bac_calibration`` keeps one file
per sampler setting, ``bac_<sampler>-<steps>.json``, and makes it only when it
is missing: one shipped beside the checkpoint is read there; one made here is
written to a cache folder (``outputs/calibration`` by default) under the
checkpoint's name and weight fingerprint, never beside a checkpoint that is
only read.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np

from rtdp.core.bac import BacCalibration, FeatureRecorder
from rtdp.errors import ConfigError

log = logging.getLogger("rtdp.calibrate")

CALIBRATION_SEEDS_FROM = 0  # training seeds; the evaluation seeds stay unseen
CALIBRATION_CACHE = Path("outputs/calibration")


def calibrate_bac(policy, task, sampler: str, steps: int, *, episodes: int = 3, progress: bool = True) -> BacCalibration:
    """Record block features over ``episodes`` rollouts of ``task`` and return the calibration."""
    from rtdp.policies.runner import Runner
    from rtdp.workflows.eval import _obs_keys
    from rtdp.workflows.rollout import rollout_policy

    if int(episodes) < 1:
        raise ConfigError(f"BAC calibration needs >= 1 episode, got {episodes}")
    blocks_of = getattr(policy.model, "cache_blocks", None)
    if blocks_of is None:
        raise ConfigError(f"BAC calibrates transformer blocks; {type(policy.model).__name__} has none")
    blocks = blocks_of()
    runner = Runner(policy, sampler, steps, seed=0)
    recorder = FeatureRecorder(runner.policy.model, [b.name for b in blocks])

    def predict(obs: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        out = runner.predict(obs, rows).detach().cpu().numpy()
        recorder.end_chunk()
        return out

    seeds = list(range(CALIBRATION_SEEDS_FROM, CALIBRATION_SEEDS_FROM + int(episodes)))
    was_training = policy.training
    policy.eval()
    try:
        with recorder:
            rollout_policy(predict, task, seeds, n_obs_steps=policy.config.n_obs_steps, obs_keys=_obs_keys(policy),
                           batch=len(seeds), progress=progress, reset=runner.reset)
    finally:
        policy.train(was_training)
    return BacCalibration(f"{runner.name}-{runner.steps}", blocks, recorder.similarity(), episodes=len(seeds),
                          chunks=recorder.chunks)


def calibration_path(checkpoint: str | Path, sampler: str, steps: int, cache: str | Path = CALIBRATION_CACHE) -> Path:
    """Where the calibration of ``<sampler>-<steps>`` of ``checkpoint`` is read from (and written to when missing).

    Beside the checkpoint when one ships there; otherwise in ``cache``, in a
    folder named after the checkpoint and the SHA-1 of its weights, so a
    retrained checkpoint in the same place never reuses a stale calibration.
    """
    name = f"bac_{sampler}-{steps}.json"
    beside = Path(checkpoint) / name
    if beside.exists():
        return beside
    weights = Path(checkpoint) / "model.safetensors"
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:12] if weights.exists() else "unsaved"
    return Path(cache) / f"{Path(checkpoint).resolve().parent.name}-{digest}" / name


def bac_calibration(policy, checkpoint: str | Path | None, task, sampler: str, steps: int, *,
                    episodes: int = 3, progress: bool = True, cache: str | Path = CALIBRATION_CACHE) -> BacCalibration:
    """The saved calibration of this setting (``calibration_path``), made and saved when missing.

    A fresh network (no checkpoint) is calibrated every time and nothing is saved.
    """
    path = None if checkpoint is None else calibration_path(checkpoint, sampler, steps, cache)
    if path is not None and path.exists():
        return BacCalibration.load(path)
    print(f"rtdp: calibrating block-wise caching for {sampler}-{steps} on {episodes} episodes ...", file=sys.stderr)
    cal = calibrate_bac(policy, task, sampler, steps, episodes=episodes, progress=progress)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cal.save(path)
            print(f"rtdp: BAC calibration saved to {path}", file=sys.stderr)
        except OSError as exc:  # a read-only folder still runs, it just calibrates again next time
            log.warning("could not save the BAC calibration to %s (%s); it will be made again next time", path, exc)
    return cal
