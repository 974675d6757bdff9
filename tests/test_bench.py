"""``rtdp bench`` end to end on freshly initialised small policies (timing keys, NFE, fidelity, plot)."""

from __future__ import annotations

import json

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
