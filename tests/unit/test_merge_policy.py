"""The merge policy alone: when it merges and unmerges over a sequence of admissions, and its hysteresis.
(That every request is served with its own weights across the switches is tested through the engine.)"""
from __future__ import annotations

from service.engine.merge_policy import MAX_COOLDOWN_GROWTH, MergePolicy


def drive(policy: MergePolicy, admissions: list[set], merged: str | None = None) -> tuple[str | None, list[str]]:
    """Feed admissions to the policy and apply its switches, as the engine does; returns what is merged at the
    end and the switches made ("merge NAME", "unmerge")."""
    switches = []
    for names in admissions:
        switch = policy.admit(names, merged)
        if switch.unmerge:
            merged = None
            switches.append("unmerge")
        if switch.merge is not None:
            merged = switch.merge
            switches.append(f"merge {switch.merge}")
    return merged, switches


def test_merges_after_a_run_of_one_adapter_and_unmerges_for_other_weights():
    policy = MergePolicy(merge_after=3, merge_cooldown=2)
    assert drive(policy, [{"a"}, {"a"}]) == (None, [])
    merged, switches = drive(policy, [{"a"}])
    assert (merged, switches) == ("a", ["merge a"])
    assert drive(policy, [{"a"}] * 5, merged) == ("a", [])
    assert drive(policy, [{"a", None}], merged) == (None, ["unmerge"])  # bare-base rows need the base as it was


def test_never_merges_the_bare_base_mixed_admissions_or_when_disabled():
    policy = MergePolicy(merge_after=1, merge_cooldown=0)
    assert drive(policy, [{None}] * 5 + [{"a", "b"}] * 5) == (None, [])
    assert drive(MergePolicy(merge_after=1, merge_cooldown=0, enabled=False), [{"a"}] * 5) == (None, [])


def test_waits_a_cooldown_after_an_unmerge():
    policy = MergePolicy(merge_after=1, merge_cooldown=3)
    merged, _ = drive(policy, [{"a"}])
    merged, switches = drive(policy, [{"a"}] * 4 + [{"b"}], merged)
    assert switches == ["unmerge"]
    merged, switches = drive(policy, [{"b"}] * 3, merged)
    assert switches == [], "merged again within the cooldown"
    assert drive(policy, [{"b"}], merged) == ("b", ["merge b"])


def test_a_rare_other_adapter_that_keeps_coming_back_does_not_make_it_flap():
    """Every 7th admission needs other weights: merges that last 3 admissions. The cooldown doubles after each
    such merge up to its cap, so merges become rare; a constant cooldown would merge and unmerge every time."""
    cycle = [{"a", "b"}] + [{"a"}] * 6
    cycles = 100
    _, switches = drive(MergePolicy(merge_after=2, merge_cooldown=4), cycle * cycles)
    # 4 -> 8 -> ... -> 256 (the cap): six merges, then one per 256 admissions at most
    assert 2 <= switches.count("merge a") <= 6 + len(cycle) * cycles // 256 + 1, switches


def test_the_cooldown_stops_growing_at_its_cap_and_is_back_after_a_merge_that_lasts():
    policy = MergePolicy(merge_after=2, merge_cooldown=4)
    merged, _ = drive(policy, ([{"a", "b"}] + [{"a"}] * 6) * 200)  # 1,400 admissions
    assert policy.cooldown_length == MAX_COOLDOWN_GROWTH * 4
    merged, switches = drive(policy, [{"a"}] * (3 * MAX_COOLDOWN_GROWTH * 4), merged)
    assert merged == "a", "traffic for one adapter alone was not merged once the other adapter stopped coming"
    merged, switches = drive(policy, [{"a", "b"}], merged)
    assert switches == ["unmerge"] and policy.cooldown_length == 4


def test_a_zero_cooldown_stays_zero():
    policy = MergePolicy(merge_after=1, merge_cooldown=0)
    _, switches = drive(policy, [{"a"}, {"b"}] * 5)
    assert switches.count("unmerge") == 9 and policy.cooldown_length == 0
