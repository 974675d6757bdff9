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

``action_anchors`` is the other thing made once per checkpoint and cached
there: the k-means action anchors of the replay buffer a DDPM policy was
trained on, for the core's anchored start (``rtdp bench ... +anchor<T>``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np

from rtdp.core.bac import BacCalibration, FeatureRecorder
from rtdp.errors import ConfigError, DatasetError

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


# ------------------------------------------------------------------------ action anchors (+anchor<T>)

ANCHOR_K = 20  # DiffusionDrive's number of anchors
ANCHOR_SEED = 0


def _action_windows(policy, data_path: str | Path) -> np.ndarray:
    """Every action window the policy trains on, (N, horizon, Da) env units: Diffusion Policy's padded windows
    (``SequenceDataset``'s, edge steps repeated), cut from the "action" array alone so image stores stay unread."""
    from rtdp.data.dataset import load_arrays, sequence_index
    from rtdp.data.replay_buffer import ReplayBuffer

    cfg = policy.config
    buffer = ReplayBuffer.open(data_path, mode="r")
    ends = np.asarray(buffer.episode_ends)
    if ends.size == 0:
        raise DatasetError(f"the replay buffer {data_path} holds no episodes: no action windows to make anchors of")
    action = np.asarray(load_arrays(buffer, ["action"])["action"], dtype=np.float32)
    if action.ndim != 2 or action.shape[1] != cfg.action_dim:
        raise DatasetError(f"the replay buffer {data_path} has actions of shape {action.shape[1:]} per step; this "
                           f"{policy.policy_type} policy acts in {cfg.action_dim} dimensions")
    table = sequence_index(ends, cfg.horizon, cfg.n_obs_steps - 1, cfg.n_action_steps - 1)
    steps = np.clip(table[:, 2:3] + np.arange(cfg.horizon)[None], table[:, 0:1], table[:, 1:2])
    return action[steps]


def anchors_path(checkpoint: str | Path, data_path: str | Path, n_steps: int, k: int, seed: int,
                 cache: str | Path = "outputs/calibration") -> Path:
    """Where the anchors of ``checkpoint`` from ``data_path`` are cached.

    In the folder of the checkpoint's BAC calibrations (named after the
    checkpoint and the SHA-1 of its weights), in a file keyed by the weights,
    the resolved data path, its committed step count, k and seed: retrained
    weights, other data or a re-collected buffer never reuse stale anchors.
    """
    weights = Path(checkpoint) / "model.safetensors"
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:12] if weights.exists() else "unsaved"
    key = hashlib.sha1(f"{digest}|{Path(data_path).resolve()}|{int(n_steps)}|{int(k)}|{int(seed)}".encode())
    folder = Path(cache) / f"{Path(checkpoint).resolve().parent.name}-{digest}"
    return folder / f"anchors_k{int(k)}_seed{int(seed)}_{key.hexdigest()[:12]}.safetensors"


def action_anchors(policy, data_path: str | Path, k: int = ANCHOR_K, seed: int = ANCHOR_SEED, *,
                   checkpoint: str | Path | None = None, cache: str | Path = "outputs/calibration"):
    """k-means anchors of the training actions of a DDPM checkpoint, for its anchored start (``+anchor<T>``).

    Every ``horizon``-long action window of the replay buffer at ``data_path``
    (the windows training draws), normalised with the policy's normaliser,
    clustered by ``rtdp.core.kmeans(k, seed)`` and mapped back to env units.
    With a ``checkpoint`` the result is saved as safetensors under
    ``anchors_path(...)`` and read from there next time; without one (a fresh
    network) it is made every time and nothing is saved.

    Args:
        policy: a policy with ``horizon``, ``n_obs_steps``, ``n_action_steps``, ``action_dim``
            and its normaliser set.
        data_path: a zarr replay buffer with an "action" array (N, Da).
        k: number of anchors, 1..number of windows.
        seed: seed of k-means' initialisation.
        checkpoint: the folder the policy was loaded from (keys the cache); None: no cache.
        cache: cache folder (bench's ``calibration_dir``).

    Returns:
        anchors, float32 tensor (k, horizon, Da) in env units, on the CPU.

    Raises:
        DatasetError: no buffer at ``data_path``, no episodes, or actions of another width.
        ConfigError: fewer windows than k, or the normaliser not set.
    """
    import torch

    from rtdp.core import kmeans
    from rtdp.data.replay_buffer import ReplayBuffer

    cfg = policy.config
    k, seed = int(k), int(seed)
    shape = (k, cfg.horizon, cfg.action_dim)
    path = None
    if checkpoint is not None:
        n_steps = ReplayBuffer.open(data_path, mode="r").n_steps
        path = anchors_path(checkpoint, data_path, n_steps, k, seed, cache)
        if path.exists():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                anchors = load_file(str(path)).get("anchors")
            except (SafetensorError, OSError) as exc:
                anchors = None
                log.warning("could not read the cached anchors %s (%s); making them again", path, exc)
            if anchors is not None and tuple(anchors.shape) == shape:
                return anchors.float()
    policy.normalizer.require_set()
    windows = _action_windows(policy, data_path)
    if len(windows) < k:
        raise ConfigError(f"{data_path} has {len(windows)} action windows of {cfg.horizon} steps, fewer than the "
                          f"k={k} anchors asked for: collect more episodes or use a smaller k")
    print(f"rtdp: k-means anchors (k={k}) of {len(windows)} action windows of {data_path} ...", file=sys.stderr)
    points = torch.from_numpy(windows).to(device=policy.device, dtype=policy.dtype)
    points = policy.normalizer.normalize("action", points)
    anchors = policy.normalizer.unnormalize("action", kmeans(points, k, seed=seed)).float().cpu().contiguous()
    if path is not None:
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"anchors": anchors}, str(tmp), metadata={
                "checkpoint": str(checkpoint), "data": str(data_path), "k": str(k), "seed": str(seed),
                "units": "env"})
            tmp.replace(path)  # a reader never sees a half-written file
            print(f"rtdp: anchors saved to {path}", file=sys.stderr)
        except OSError as exc:  # a read-only folder still runs, it just clusters again next time
            log.warning("could not save the anchors to %s (%s); they will be made again next time", path, exc)
    return anchors


def anchor_data_path(anchor_data: str | Path | None, meta: dict, task_name: str) -> Path:
    """The replay buffer anchors come from: ``anchor_data``, else the ``data`` of the checkpoint's meta.json.

    Raises:
        ConfigError: neither names a buffer that exists here.
    """
    hint = (f"pass anchor_data=PATH, a replay buffer of the task's demonstrations (e.g. `rtdp collect "
            f"task={task_name} episodes=200 out=data/{task_name}.zarr`)")
    if anchor_data:
        if not Path(anchor_data).exists():
            raise ConfigError(f"anchor_data={anchor_data} does not exist; {hint}")
        return Path(anchor_data)
    recorded = meta.get("data")
    if not recorded:
        raise ConfigError(f"+anchor<T> needs the replay buffer the checkpoint was trained on for its anchors, and "
                          f"no meta.json records one; {hint}")
    if not Path(recorded).exists():
        raise ConfigError(f"+anchor<T> needs the replay buffer the checkpoint was trained on for its anchors; its "
                          f"meta.json names {recorded}, which does not exist here; {hint}")
    return Path(recorded)
