"""Speculative decoding with draft tokens (``drafts.lookup``, ``RunningBatch.sample``): the rule that finds drafts, and
the engine's output with drafts fed, right or wrong, against the same engine decoding a token a step."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.engine import running_batch
from service.engine.drafts import lookup
from service.engine.requests import Generation, SampledToken
from service.engine.sampling import Decoding
from service.settings import CPU_DRAFT_TOKENS
from tests.engine.engine_helpers import (
    WAIT,
    WatchedSteps,
    alone,
    assert_same_outputs,
    long_generation,
    paused,
    prompt,
    results,
)

DRAFT_COUNTERS = ("loraswap_draft_tokens_total", "loraswap_accepted_draft_tokens_total")


@pytest.mark.parametrize(("tokens", "most", "drafts"), [
    ([5, 6, 7, 8, 1, 2, 3, 9, 2, 3], 4, [9, 2, 3]),  # "2 3" is the longest suffix found: what followed it, to the end
    ([1, 2, 3, 4, 0, 3, 4, 5, 2, 3, 4], 2, [0, 3]),  # "2 3 4" beats "3 4" (which occurs first, followed by 5)
    ([7, 1, 8, 1, 9, 1], 3, [8, 1, 9]),  # of several occurrences, the first
    ([7, 1, 8, 1, 9, 1], 0, []),
    ([4, 5, 6], 3, []),  # the last token occurs nowhere before
    ([4, 4], 3, [4]),  # the suffix itself is no occurrence: the one before it is
    ([4], 3, []),
    ([3, 3, 3, 3], 5, [3]),  # "3 3 3" first occurs at 0: one token follows it
])
def test_drafts_follow_the_first_earlier_occurrence_of_the_longest_suffix(tokens, most, drafts):
    assert lookup(np.array(tokens), most) == drafts


class OracleDrafts:
    """``drafts.lookup`` standing in for the engine's: a row's drafts are the tokens its reference output has next
    (``expected``, by prompt), each ``wrong_every``-th one (counted along the output) changed to another token."""

    def __init__(self, works: list[Generation], expected: list, wrong_every: int = 0):
        self.outputs = {tuple(work.prompt_ids): result.token_ids for work, result in zip(works, expected)}
        self.wrong_every, self.fed = wrong_every, 0

    def __call__(self, tokens: np.ndarray, most: int) -> list[int]:
        prompt_ids = next((ids for ids in self.outputs if tuple(tokens[:len(ids)]) == ids), None)
        if prompt_ids is None:  # a row it has no output for: no drafts
            return []
        done = len(tokens) - len(prompt_ids)
        drafts = [token if not self.wrong_every or (done + i) % self.wrong_every else (token - 1 if token else 1)
                  for i, token in enumerate(self.outputs[prompt_ids][done:done + most])]
        self.fed += len(drafts)
        return drafts


def mixed_works(rng: random.Random) -> list[Generation]:
    """Greedy and seeded sampling rows over three adapters and the bare base, some ending early (end of text, a
    small limit inside a step's drafts), some running to their limit."""
    sampled = [Decoding("top_k", temperature=0.8, top_k=20, seed=3, max_new_tokens=24),
               Decoding("nucleus", temperature=1.2, top_p=0.9, seed=4, max_new_tokens=24),
               Decoding("temperature", temperature=0.6, seed=5, max_new_tokens=3)]
    works = [Generation(prompt(rng), adapter, Decoding(max_new_tokens=tokens), stop_at_newline=False)
             for adapter, tokens in (("r2", 24), ("r4", 2), (None, 24), ("r8", 7))]
    works += [Generation(prompt(rng), adapter, decoding, stop_at_newline=False)
              for adapter, decoding in zip(("r8", None, "r4"), sampled)]
    return [*works, long_generation(rng, "r2", 30)]


@pytest.mark.parametrize("wrong_every", [0, 3, 1])
def test_drafts_right_or_wrong_leave_every_output_as_a_token_a_step_gives_it(engines, monkeypatch, wrong_every):
    """The same batch with drafts that are the reference's next tokens (all taken), every third one wrong, and all
    wrong: the same tokens, text and finish reasons as decoding a token a step, in fewer steps where drafts are
    taken."""
    reference, engine = engines.fresh(draft_tokens=0), engines.fresh(draft_tokens=4)
    works = mixed_works(random.Random(40 + wrong_every))
    expected = [alone(reference, work) for work in works]
    oracle = OracleDrafts(works, expected, wrong_every)
    monkeypatch.setattr(running_batch, "lookup", oracle)
    for served in (reference, engine):
        served.decoder = WatchedSteps(served.decoder)
    before = {name: counted(name) for name in DRAFT_COUNTERS}
    for served in (reference, engine):
        with paused(served):
            futures = [served.submit(work) for work in works]
        assert_same_outputs(results(futures), expected, works)
    fed, taken = (counted(name) - before[name] for name in DRAFT_COUNTERS)
    assert fed == oracle.fed > 0
    steps, one_a_step = len(engine.decoder.notes), len(reference.decoder.notes)
    if wrong_every == 1:
        assert steps == one_a_step and taken == 0, "a wrong first draft took a token"
    else:
        assert steps < one_a_step and taken > 0, f"drafts saved no step: {steps} against {one_a_step}"


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_drafts_are_on_by_default_on_the_cpu(engines):
    assert engines.fresh().draft_tokens == CPU_DRAFT_TOKENS > 0


def test_a_streamed_row_gets_each_drafted_token_with_its_own_logprobs(engines, monkeypatch):
    """Every token a listener is handed when drafts are taken is the one a token-a-step engine hands out, with the
    same log-probabilities (float rounding apart: one pass over several positions against one per position)."""
    reference, engine = engines.fresh(draft_tokens=0), engines.fresh(draft_tokens=4)
    rng = random.Random(41)
    works = [dataclasses.replace(work, logprobs=3) for work in mixed_works(rng)]
    streams = {}
    for served in (reference, engine):
        heard: list[list[SampledToken]] = [[] for _ in works]
        with paused(served):
            futures = [served.submit(work, on_token=heard[row].append) for row, work in enumerate(works)]
        streams[served] = heard, results(futures)
        if served is reference:
            monkeypatch.setattr(running_batch, "lookup", OracleDrafts(works, streams[reference][1]))
    (expected, expected_results), (got, got_results) = streams[reference], streams[engine]
    assert_same_outputs(got_results, expected_results, works)
    for row, (mine, theirs) in enumerate(zip(got, expected)):
        assert [token.token_id for token in mine] == [token.token_id for token in theirs], row
        for token, other in zip(mine, theirs):
            assert token.logprob == pytest.approx(other.logprob, abs=1e-4), row
            assert [t for t, _ in token.top_logprobs] == [t for t, _ in other.top_logprobs], row
            assert [p for _, p in token.top_logprobs] == pytest.approx([p for _, p in other.top_logprobs], abs=1e-4)


def test_requests_that_join_while_a_step_drafts_are_untaken_keep_every_row_right(engines, monkeypatch):
    """Requests join between a step that fed drafts and the sampling that takes them, growing the KV cache: the
    drafts' keys and values (past every row's position until then) must move with it."""
    reference = engines.fresh(draft_tokens=0, max_new_tokens=64)
    engine = engines.fresh(draft_tokens=4, max_new_tokens=64)  # up to 7 drafts a step with the first row alone
    rng = random.Random(42)
    first, joiners = long_generation(rng, "r8", 60), [long_generation(rng, name, 12) for name in ("r2", None, "r4")]
    works = [first, *joiners]
    expected = [alone(reference, work) for work in works]
    monkeypatch.setattr(running_batch, "lookup", OracleDrafts(works, expected))
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
    running = engine.submit(first)
    assert steps.holding.wait(WAIT)  # the first row's step with drafts is about to run
    joined = [engine.submit(work) for work in joiners]
    steps.release.set()
    assert_same_outputs([running.result(WAIT), *results(joined)], expected, works)
    assert max(steps.notes) == len(works), f"the requests did not join the running row: rows per step {steps.notes}"


def test_a_row_at_the_models_last_position_beside_rows_with_drafts(engines, monkeypatch):
    """GPT-2's positions are learned, 512 in the tiny base: a row whose prompt and tokens reach the last of them is
    padded beside rows fed drafts, and its padding must not take positions past it."""
    reference, engine = engines.fresh("gpt2", draft_tokens=0, max_new_tokens=64), engines.fresh(
        "gpt2", draft_tokens=4, max_new_tokens=64)
    rng = random.Random(43)
    last = Generation(prompt(rng, 500, 500), "r4", Decoding(max_new_tokens=12), stop_at_newline=False, ignore_eos=True)
    drafted = long_generation(rng, "r2", 64)
    works = [last, drafted]
    expected = [alone(reference, work) for work in works]
    monkeypatch.setattr(running_batch, "lookup", OracleDrafts([drafted], expected[1:]))
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), expected, works)


def fed_per_step(engines, monkeypatch, works: list[Generation], **settings) -> list[tuple[int, int]]:
    """Submit ``works`` at once to an engine drafting 4 tokens a row (the oracle's: each row's reference output) and
    assert their outputs are those a token a step gives; returns (rows, most tokens a row was fed) per step."""
    reference, engine = engines.fresh(draft_tokens=0, **settings), engines.fresh(draft_tokens=4, **settings)
    expected = [alone(reference, work) for work in works]
    monkeypatch.setattr(running_batch, "lookup", OracleDrafts(works, expected))
    engine.decoder = steps = WatchedSteps(engine.decoder, note=lambda fed: (len(fed), max(map(len, fed))))
    with paused(engine):
        futures = [engine.submit(work) for work in works]
    assert_same_outputs(results(futures), expected, works)
    return steps.notes


@pytest.mark.parametrize(("rows", "most"), [(12, 4), (20, 2), (40, 0)])
def test_a_step_feeds_at_most_most_fed_tokens_drafts_included(engines, monkeypatch, rows, most):
    """Drafts thin out as the batch grows: at most MOST_FED tokens a step (rows x (1 + drafts)), none past MOST_FED /
    2 rows; the outputs are those of a token a step either way."""
    rng = random.Random(45)
    works = [long_generation(rng, ("r2", "r4", None)[row % 3], 12) for row in range(rows)]
    notes = fed_per_step(engines, monkeypatch, works, max_batch=64)
    assert notes[0] == (rows, 1 + most), f"rows and most tokens a row was fed, per step: {notes}"
    assert all(batch * fed <= running_batch.MOST_FED for batch, fed in notes), notes


@pytest.mark.parametrize(("onednn", "rows", "fed"), [(True, 1, 8), (True, 2, 8), (True, 3, 5), (False, 1, 5)])
def test_drafts_fill_the_rows_the_linear_layers_pad_a_step_to(engines, monkeypatch, onednn, rows, fed):
    """oneDNN computes a step's rows x tokens padded up (``padded_rows``), so with 4 drafts a row alone, or each of
    two, is fed 7 (8 tokens: 8 and 16 rows computed, as for 5 and 10 tokens); three rows 4 (15 and 18 tokens pad to
    16 and 24); with MKL (no padding) 4. The outputs are those of a token a step."""
    rng = random.Random(46)
    works = [long_generation(rng, ("r2", "r4", None)[row], 24) for row in range(rows)]
    notes = fed_per_step(engines, monkeypatch, works, onednn=onednn)
    assert notes[0] == (rows, fed), f"rows and most tokens a row was fed, per step: {notes}"


@pytest.mark.parametrize(("rows", "tokens", "widest"), [
    (1, 1, 1), (1, 2, 2), (1, 3, 4), (1, 5, 8), (2, 5, 8), (3, 5, 5), (5, 5, 6), (8, 5, 5), (13, 4, 4), (17, 2, 2),
    (21, 3, 3), (64, 1, 1), (65, 1, 1), (80, 1, 1),
])
def test_the_widest_step_is_the_padding_of_its_rows_x_tokens(engines, rows, tokens, widest):
    """``padded_rows``: a power of two up to 16, a multiple of 8 up to 64, as they are above."""
    assert engines.shared().decoder.widest(rows, tokens) == widest
    assert rows * widest <= max(64, rows * tokens)
