"""Choosing a plan among a planner's candidates by the PDM score they are predicted to get.

A multi-mode planner (the anchored planner's 20 denoised anchors, or N samples
of vanilla diffusion) proposes several plans; its own scores say which is most
like the expert, not which is safe. PDM-Closed and NAVSIM's scoring planners
choose instead by the metric itself: every candidate is scored with
``rtdp.envs.highway_score.score_plans`` against the other vehicles projected at
constant velocity from where they are now (the future a planner cannot see),
and the best predicted PDMS wins; the planner's own scores, as softmax
probabilities times ``SCORE_WEIGHT``, break near-ties. The progress
reference (EP) is the best safe IDM proposal or the candidate itself.

Everything it reads a planner has at run time: ego state, agents, lanes and
the route (``HighwayEnv.scene_inputs()``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rtdp.envs.highway_score import DT, N_STEPS, score_plans
from rtdp.errors import ConfigError

SCORE_WEIGHT = 0.1  # weight of the planner's own (softmax) score beside the predicted PDMS
SELECTION_KEYS = ("ego_state", "agents", "lanes", "route")
SELECTIONS = ("pdm",)
SELECT_SAMPLES = 20  # candidates vanilla diffusion samples per scene to choose from (the anchored planner's K)


def candidates_to_sample(select: str | None, n_candidates: int | None) -> int | None:
    """How many candidates a planner samples under ``select`` (``SELECT_SAMPLES`` unless given).

    Raises:
        ConfigError: an unknown selection.
    """
    if select is None:
        return n_candidates
    if select not in SELECTIONS:
        raise ConfigError(f"select={select!r}: a planner's plan is its own choice (null) or chosen by predicted PDM "
                          f"score ({', '.join(SELECTIONS)})")
    return SELECT_SAMPLES if n_candidates is None else n_candidates


def constant_velocity_futures(agents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Agents (B, A, 9) -> futures (B, A, 41, 3) (x, y, heading at 0.0 .. 4.0 s) and validity (B, A, 41)."""
    agents = np.asarray(agents, np.float64)
    t = np.arange(N_STEPS) * DT
    xy = agents[:, :, None, 0:2] + agents[:, :, None, 4:6] * t[None, None, :, None]
    heading = np.broadcast_to(np.arctan2(agents[..., 3], agents[..., 2])[..., None], xy.shape[:-1])
    valid = np.broadcast_to(agents[..., 8:9] > 0, xy.shape[:-1]).astype(np.float64)
    return np.concatenate([xy, heading[..., None]], -1), valid


def predicted_scores(candidates: np.ndarray, scenes: Mapping[str, np.ndarray], *,
                     tracked: bool = True) -> np.ndarray:
    """PDMS (B, K) of every candidate (B, K, 8, 2) against constant-velocity agents (see the module)."""
    candidates = np.asarray(candidates, np.float64)
    b, k = candidates.shape[:2]
    future, valid = constant_velocity_futures(scenes["agents"])
    rep = lambda x: np.repeat(np.asarray(x), k, axis=0)  # noqa: E731
    flat = candidates.reshape(b * k, *candidates.shape[2:])
    pseudo = {key: rep(scenes[key]) for key in SELECTION_KEYS}
    pseudo.update(agent_future=rep(future), agent_future_valid=rep(valid), action=flat[..., :2])
    return score_plans(flat, pseudo, tracked=tracked)["pdms"].reshape(b, k)


def select(candidates: np.ndarray, scenes: Mapping[str, np.ndarray], scores: np.ndarray | None = None, *,
           tracked: bool = True, weight: float = SCORE_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """The chosen candidate per scene: (index (B,), predicted PDMS (B, K)).

    ``scores`` (B, K): the planner's own scores (logits), or None (unranked samples: the first of equal
    predictions wins).
    """
    pdms = predicted_scores(candidates, scenes, tracked=tracked)
    total = pdms
    if scores is not None:
        s = np.asarray(scores, np.float64)
        p = np.exp(s - s.max(1, keepdims=True))
        total = pdms + weight * p / p.sum(1, keepdims=True)
    return np.argmax(total, axis=1), pdms
