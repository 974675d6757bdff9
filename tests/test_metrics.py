"""Wilson interval against published values and its defining equation; the paired test against scipy."""

from __future__ import annotations

import math

import pytest

from rtdp.workflows.metrics import paired_comparison, wilson_interval


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        # Newcombe (1998), Statistics in Medicine 17, table I, method 3 (Wilson without correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_intervals(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


@pytest.mark.parametrize("k,n", [(0, 50), (17, 50), (50, 50), (3, 7)])
def test_wilson_bounds_solve_the_score_equation(k: int, n: int) -> None:
    # the bounds are the p for which |k/n - p| = z * sqrt(p (1 - p) / n)
    z = 1.959964
    for p in wilson_interval(k, n):
        assert abs(abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)) < 1e-7


def test_no_episodes_gives_the_uninformative_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("only_ref,only_other,both,neither", [(0, 0, 40, 10), (3, 1, 44, 2), (9, 2, 30, 9), (0, 7, 1, 2)])
def test_paired_comparison_is_mcnemars_exact_test(only_ref, only_other, both, neither) -> None:
    stats = pytest.importorskip("scipy.stats")
    ref = [True] * only_ref + [False] * only_other + [True] * both + [False] * neither
    other = [False] * only_ref + [True] * only_other + [True] * both + [False] * neither
    got = paired_comparison(ref, other)
    assert (got["only_reference"], got["only_other"]) == (only_ref, only_other)
    n = only_ref + only_other
    expected = 1.0 if n == 0 else stats.binomtest(only_other, n, 0.5).pvalue
    assert got["p_value"] == pytest.approx(expected, rel=1e-12)
    # symmetric in the two configurations
    assert paired_comparison(other, ref)["p_value"] == pytest.approx(got["p_value"], rel=1e-12)


def test_paired_comparison_needs_the_same_episodes() -> None:
    with pytest.raises(ValueError, match="same episodes"):
        paired_comparison([True, False], [True])
