"""When to merge an adapter into the base weights, and when to unmerge it: decided at every admission.

An admission is a new batch, or requests joining a running one; the policy sees the adapters of every row then in
play. It unmerges as soon as a row needs other weights than the merged ones (correctness), and merges an adapter
after ``merge_after`` admissions in a row that had only it in play, unless an unmerge was less than a cooldown
ago. Hysteresis: the cooldown doubles (up to ``MAX_COOLDOWN_GROWTH`` times ``merge_cooldown``) after each merge
that did not outlast it, and is back to ``merge_cooldown`` after one that did; so traffic where another adapter
keeps coming back does not pay for a merge and an unmerge each time it does.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_COOLDOWN_GROWTH = 64  # the cooldown grows to at most this many times ``merge_cooldown``


@dataclass
class Switch:
    """What to do before the admitted rows run: unmerge the merged adapter, then merge ``merge`` (if any)."""

    unmerge: bool = False
    merge: str | None = None


class MergePolicy:
    """Counts admissions; ``admit`` says when to switch."""

    def __init__(self, merge_after: int, merge_cooldown: int, enabled: bool = True):
        self.merge_after, self.merge_cooldown, self.enabled = merge_after, merge_cooldown, enabled
        self.cooldown = 0  # admissions still to go by without a merge
        self.cooldown_length = merge_cooldown  # the cooldown the next unmerge starts
        self._run = 0  # admissions in a row that had only ``_last`` in play
        self._last: str | None = None
        self._merged_for = 0  # admissions the merged adapter has served alone since its merge

    def admit(self, names: set[str | None], merged: str | None) -> Switch:
        """One admission with the adapters ``names`` in play (None: bare base rows), ``merged`` now merged."""
        switch = Switch(unmerge=merged is not None and names != {merged})
        cooling = self.cooldown > 0
        if switch.unmerge:
            lasted = self._merged_for >= self.cooldown_length
            self.cooldown_length = self.merge_cooldown if lasted else min(
                2 * self.cooldown_length, MAX_COOLDOWN_GROWTH * self.merge_cooldown)
            self.cooldown, self._merged_for, merged = self.cooldown_length, 0, None
            cooling = self.cooldown > 0
        else:
            self._merged_for += int(merged is not None)
            self.cooldown -= int(cooling)
        single = next(iter(names)) if len(names) == 1 else None
        self._run = self._run + 1 if single is not None and single == self._last else int(single is not None)
        self._last = single
        if self.enabled and single is not None and merged is None and self._run >= self.merge_after and not cooling:
            switch.merge = single
        return switch
