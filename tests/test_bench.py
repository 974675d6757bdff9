"""``rtdp bench`` end to end on freshly initialised small policies (timing keys, NFE, fidelity, plot)."""

from __future__ import annotations

import json

import pytest

from rtdp.cli import main

DESIGN_KEYS = {"name", "sampler", "steps", "nfe_per_chunk", "latency_ms_p50", "latency_ms_p99", "ms_per_action",
               "ms_per_nfe", "floor_ms_per_nfe", "action_mse"}


def test_bench_fresh_small_policies(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "size=small", "configs=[ddpm-4,ddim-2,edm-2,stream-1,cm-1]", "calls=3", "warmup=1",
                 "mse_observations=1", "threads=1", f"json={out}"])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"device", "threads", "policy", "size", "configs"} <= set(report)
    assert report["size"] == "small" and report["threads"] == 1
    rows = {r["name"]: r for r in report["configs"]}
    assert list(rows) == ["ddpm-4", "ddim-2", "edm-2", "stream-1", "cm-1"]
    for r in rows.values():
        assert DESIGN_KEYS <= set(r)
        assert r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
        assert r["floor_ms_per_nfe"] > 0
    assert [rows[n]["nfe_per_chunk"] for n in rows] == [4, 2, 2, 1, 1]
    assert rows["stream-1"]["n_action_steps"] == 5 and rows["ddim-2"]["n_action_steps"] == 8
    # Freshly initialised networks are for timing only: no fidelity figure.
    assert all(r["action_mse"] is None for r in rows.values())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "ddim-2" in capsys.readouterr().out


def test_bench_bad_input_is_a_typed_error(capsys):
    assert main(["bench", "size=small", "configs=[ddim-0]"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["bench", "size=small", "configs=[nosuch-3]"]) == 2
    assert "unknown sampler 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "size=small", "configs=[ddim-101]"]) == 2
    assert "steps must be an int in 1..100" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "needs checkpoint=" in capsys.readouterr().err


def test_parse_config_packed_network_options():
    from rtdp.errors import ConfigError
    from rtdp.workflows.bench import parse_config

    assert parse_config("edm-3+int8").options == {"precision": "int8"}
    assert parse_config("ddpm-100+fast").options == {"precision": "fp32"}
    assert parse_config("cm-1+int8dyn").options == {"precision": "int8dyn"}
    assert parse_config("edm-3+g1.5+bf16").options == {"guidance_scale": 1.5, "precision": "bf16"}
    assert parse_config("ddpm-100+deepcache").options == {"deepcache": 3}
    assert parse_config("ddim-10+deepcache2+int8").options == {"deepcache": 2, "precision": "int8"}
    with pytest.raises(ConfigError, match="at most one"):
        parse_config("edm-3+int8+fast")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config("edm-3+int4")


def test_bench_packed_network_on_the_shipped_checkpoint(tmp_path):
    from rtdp.core import bf16_supported

    packed = "int8" if bf16_supported() else "int8dyn"
    out = tmp_path / "bench.json"
    code = main(["bench", "checkpoint=rtdp/assets/checkpoints/pusht/checkpoint",
                 f"configs=[ddim-2,ddim-2+fast,ddim-2+{packed}]", "calls=2", "warmup=1", "mse_observations=2",
                 "threads=1", f"json={out}"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["configs"]}
    plain, fast, low = rows["ddim-2"], rows["ddim-2+fast"], rows[f"ddim-2+{packed}"]
    assert plain["precision"] is None and fast["precision"] == "fp32"
    assert "action_mse_vs_plain" not in plain
    # fp32 packed: same actions up to float rounding; int8: small but nonzero difference
    assert fast["action_mse_vs_plain"] < 1e-10
    assert 0 < low["action_mse_vs_plain"] < 1e-3
    # the memory floor follows the bytes the packed weights occupy
    assert fast["floor_ms_per_nfe"] == pytest.approx(plain["floor_ms_per_nfe"], rel=0.01)
    # int8 weights are a quarter of fp32's, except the FiLM layers, which stay fp32 (a third of this small U-Net)
    from rtdp.core import fast_network, weight_bytes
    from rtdp.policies import load_policy
    model = load_policy("rtdp/assets/checkpoints/pusht/checkpoint").model
    expected = weight_bytes(fast_network(model, packed)) / weight_bytes(model)
    assert expected < 0.5
    assert low["floor_ms_per_nfe"] / plain["floor_ms_per_nfe"] == pytest.approx(expected, rel=0.01)
    assert low["weight_mb"] / plain["weight_mb"] == pytest.approx(expected, rel=1e-6)



def test_bench_episodes_are_compared_seed_by_seed(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "checkpoint=rtdp/assets/checkpoints/pusht/checkpoint", "configs=[ddim-3,ddim-1]",
                 "episodes=3", "calls=2", "warmup=1", "mse_observations=1", "threads=1", f"json={out}"])
    assert code == 0
    ref, one = json.loads(out.read_text())["configs"]
    for r in (ref, one):
        assert len(r["episode_success"]) == r["episodes"] == 3
        assert sum(r["episode_success"]) == round(r["success_rate"] * 3)
    assert "paired_vs" not in ref and one["paired_vs"] == "ddim-3"  # no ddpm-100 here: the first one is the reference
    pairs = list(zip(ref["episode_success"], one["episode_success"]))
    assert one["paired_only_reference"] == sum(a and not b for a, b in pairs)
    assert one["paired_only_this"] == sum(b and not a for a, b in pairs)
    assert 0 < one["paired_p"] <= 1
    assert "p=" in capsys.readouterr().out


def test_timed_calls_interleave_across_configurations():
    """time_runners warms every runner up, then times each in turn per round, after one untimed call."""
    from rtdp.workflows.eval import time_runners

    log: list[str] = []

    class Recorder:  # a runner that records who was called, in order
        n_action_steps = 4
        last_nfe = 2

        def __init__(self, name):
            self.name = name

        def predict(self, obs):
            log.append(self.name)

    a, b = Recorder("a"), Recorder("b")
    timings = time_runners([a, b], {}, calls=5, warmup=2, rounds=2)
    # warm-up: 2 calls each; round 1: 3 timed calls each; round 2: 1 untimed + 2 timed calls each
    assert log == ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert [len(t["latency_samples_ms"]) for t in timings] == [5, 5]
    assert all(t["nfe_per_chunk"] == 2 and t["n_action_steps"] == 4 for t in timings)
    assert timings[0]["latency_ms_p99"] >= timings[0]["latency_ms_p50"] > 0
    log.clear()
    time_runners([a, b], {}, calls=3, warmup=0, rounds=1)  # one round: each timed in one block, as time_runner does
    assert log == ["a"] * 3 + ["b"] * 3


def test_perturbation_is_off_by_default_and_moves_actions_below_1e_4():
    """perturb=None hands the env's observations through untouched; a seed moves them by rounding-level noise."""
    import numpy as np
    import torch

    from rtdp.envs import get_task, make
    from rtdp.policies import load_policy
    from rtdp.workflows.rollout import PERTURB_SCALE, perturber

    env = make(get_task("pusht"))
    obs, _ = env.reset(seed=100000)
    env.close()
    assert perturber(None, 100000)(obs) is obs
    a, b, c = perturber(0, 100000)(obs), perturber(0, 100000)(obs), perturber(1, 100000)(obs)
    for key, value in obs.items():
        rel = np.abs(a[key] / value - 1)[value != 0]
        assert a[key].dtype == value.dtype and np.array_equal(a[key], b[key]) and not np.array_equal(a[key], c[key])
        assert 0 < rel.max() < 6 * PERTURB_SCALE
    image = {"img": np.full((4, 4, 3), 7, np.uint8)}
    assert np.array_equal(perturber(0, 1)(image)["img"], image["img"])
    from rtdp.errors import ConfigError

    with pytest.raises(ConfigError, match="non-negative ints"):
        perturber(-1, 0)

    policy = load_policy("rtdp/assets/checkpoints/pusht_edm/checkpoint")
    noise = torch.randn(1, policy.config.horizon, policy.config.action_dim, generator=torch.Generator().manual_seed(0))

    def act(o):
        window = {k: np.stack([o[k]] * policy.config.n_obs_steps)[None] for k in policy.config.lowdim_shapes}
        return policy.normalizer.normalize("action", policy.predict_action_chunk(window, noise=noise)).numpy()

    moved = np.abs(act(a) - act(obs)).max()
    assert 0 < moved < 1e-4  # normalised action units ([-1, 1])


def test_bench_repeats_episodes_under_perturbation_seeds_and_pools_them(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "checkpoint=rtdp/assets/checkpoints/pusht/checkpoint", "configs=[ddim-3,ddim-1]",
                 "episodes=2", "perturb=[0,5]", "calls=2", "warmup=1", "mse_observations=1", "threads=1",
                 f"json={out}"])
    assert code == 0
    report = json.loads(out.read_text())
    ref, one = report["configs"]
    assert report["perturb"] == [0, 5]
    for r in (ref, one):
        assert [q["perturb"] for q in r["perturbations"]] == [0, 5]
        assert r["episodes"] == 4 and r["episode_success"] == sum((q["episode_success"] for q in r["perturbations"]), [])
    for mine, theirs in [(one, ref), *zip(one["perturbations"], ref["perturbations"])]:
        pairs = list(zip(theirs["episode_success"], mine["episode_success"]))
        assert mine["paired_only_reference"] == sum(x and not y for x, y in pairs)
        assert mine["paired_only_this"] == sum(y and not x for x, y in pairs)
    assert "perturb 5" in capsys.readouterr().out
    assert main(["bench", "checkpoint=rtdp/assets/checkpoints/pusht/checkpoint", "perturb=[0]"]) == 2
    assert "give episodes= too" in capsys.readouterr().err
