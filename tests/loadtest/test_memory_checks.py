"""The memory checks of ``loraswap loadtest``: flat after the warm-up or not, from the samples (``memory.flatness``),
and which checks a report fails (``report.failed_checks``)."""
from __future__ import annotations

import pytest

from loadtest.checked.memory import flatness, gauge, resident_bytes
from loadtest.checked.report import failed_checks

MIB = 2 ** 20


@pytest.mark.parametrize(("after", "flat"), [(104, True), (105, True), (106, False), (90, True)])
def test_growth_is_the_peak_after_the_warmup_over_the_peak_during_it(after, flat):
    samples = [(0.0, 80 * MIB, 0), (1.0, 100 * MIB, 0), (2.0, 95 * MIB, 0), (3.0, after * MIB, 0), (4.0, 97 * MIB, 0)]
    memory = flatness(samples, warmup_s=2.0, max_growth=0.05)
    assert memory["warmup_peak_bytes"] == 100 * MIB and memory["peak_after_bytes"] == max(after, 97) * MIB
    assert memory["growth"] == pytest.approx(max(after, 97) / 100 - 1, abs=1e-4) and memory["flat"] is flat
    assert memory["rss_last_bytes"] == 97 * MIB and memory["samples"] == 5


@pytest.mark.parametrize(("cached_after", "flat"), [(20, True), (14, False)])
def test_what_the_prefix_cache_holds_is_not_growth(cached_after, flat):
    """The resident memory grows by 20 MiB after the warm-up: the prefix cache filling (by 20 MiB: flat), or it
    filling by 14 MiB and 6 MiB more held elsewhere (growth 6 %)."""
    samples = [(0.0, 90 * MIB, 0), (1.0, 100 * MIB, 0), (3.0, 120 * MIB, cached_after * MIB)]
    memory = flatness(samples, warmup_s=2.0, max_growth=0.05)
    assert memory["flat"] is flat and memory["growth"] == pytest.approx((120 - cached_after) / 100 - 1, abs=1e-4)
    assert memory["rss_peak_after_bytes"] == 120 * MIB and memory["prefix_cache_peak_bytes"] == cached_after * MIB


def test_without_samples_on_both_sides_nothing_is_claimed():
    memory = flatness([(0.5, 1.0, 0.0)], warmup_s=2.0, max_growth=0.05)
    assert memory["growth"] is None and memory["flat"] is None


def test_resident_bytes_and_a_gauge_from_a_metrics_text():
    text = ("# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 1.5e+08\n"
            "# TYPE loraswap_prefix_cache_bytes gauge\nloraswap_prefix_cache_bytes 4096.0\n")
    assert resident_bytes(text) == 1.5e8 and gauge(text, "loraswap_prefix_cache_bytes") == 4096
    assert resident_bytes("# TYPE up gauge\nup 1.0\n") is None


def report(storm: dict | None = None, flat: bool | None = True, cycles: dict | None = None) -> dict:
    return {"failures": 0, "admin": {"failures": 0}, "recovery": {"failures": 0}, "storm": storm,
            "memory": {"flat": flat}, "register_cycles": cycles}


def test_failed_checks_name_each_failure():
    storm = {"server_errors": 0}
    assert failed_checks(report(storm)) == []
    assert failed_checks(report({"server_errors": 2})) == ["storm 5xx"]
    assert failed_checks(report(storm, flat=False)) == ["memory after warm-up"]
    assert failed_checks(report(None, flat=False)) == []  # memory is bounded only where a storm ran (the soak)
    grown = {"flat": False, "checks": {"failures": 0}}
    assert failed_checks(report(cycles=grown)) == ["register cycles memory"]
    wrong = {"flat": True, "checks": {"failures": 1}}
    assert failed_checks(report(cycles=wrong)) == ["register cycles requests"]
