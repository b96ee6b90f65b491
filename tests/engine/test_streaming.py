"""Streamed completions through the engine (Tasks.stream, Tasks.complete) on the tiny bases: the text streamed is
the text the engine decodes, stop strings end choices and their rows, logprobs are the model's own, the n choices of
a request are seeded apart and batched together, and a stream that is closed or cancelled drops its rows."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import threading

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from service.engine.requests import Generation, GenerationResult, SampledToken, run_all
from service.engine.sampling import Decoding, choice_seed
from service.engine.scheduler import Engine
from service.errors import InputTooLong, QueueFull, RequestAbandoned, UnknownAdapter
from service.tasks.streaming import ChoiceDelta, CompletionStream, Usage
from service.tasks.tasks import Tasks
from tests.engine.engine_helpers import WAIT, WatchedSteps, alone, long_generation, paused, prompt, same_output
from tests.lora_helpers import BASES, RELATIVE_TOLERANCE, peft_logits


def tasks_of(engine: Engine) -> Tasks:
    return Tasks(engine, engine.tokenizer, engine.settings, max_positions=512)


def streamed(engine: Engine, prompt_ids: list[int] | str, adapter: str | None, decoding: Decoding, **options
             ) -> tuple[list[ChoiceDelta], Usage]:
    """Every delta of a stream, in the order handed out, and its usage."""
    async def run():
        async with await tasks_of(engine).stream(prompt_ids, engine.registry.lookup(adapter), decoding,
                                                 **options) as stream:
            return [delta async for delta in stream], stream.usage

    return asyncio.run(run())


def texts(deltas: list[ChoiceDelta], n: int = 1) -> list[str]:
    return ["".join(delta.text for delta in deltas if delta.index == index) for index in range(n)]


def reasons(deltas: list[ChoiceDelta], n: int = 1) -> list[str]:
    return [[delta.finish_reason for delta in deltas if delta.index == index][-1] for index in range(n)]


def generation(prompt_ids: list[int], adapter: str | None, decoding: Decoding) -> Generation:
    """The request a stream's choice makes (no newline stop: completions stop only at their stop strings)."""
    return Generation(prompt_ids, adapter, decoding, stop_at_newline=False)


# ---- the text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(BASES))
def test_streamed_text_is_the_text_the_engine_decodes(engines, arch):
    """Greedy streams of several adapters, lengths and prompts: the deltas add up to what the engine answers the
    request non-streamed, with its finish reason and token count; Tasks.complete collects the same."""
    engine = engines.shared(arch)
    rng = random.Random(30)
    for adapter in ("r2", None, "r8", "r4"):
        ids, decoding = prompt(rng), Decoding(max_new_tokens=rng.randint(4, 24))
        expected = alone(engine, generation(ids, adapter, decoding))
        deltas, usage = streamed(engine, ids, adapter, decoding)
        assert (texts(deltas), reasons(deltas)) == ([expected.text], [expected.finish_reason])
        assert all(delta.text for delta in deltas[:-1]) and all(delta.logprobs is None for delta in deltas)
        assert usage == Usage(len(ids), len(expected.token_ids))
        completion = asyncio.run(tasks_of(engine).complete(ids, engine.registry.lookup(adapter), decoding))
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == (expected.text,
                                                                                     expected.finish_reason)
        assert completion.usage == usage


def test_a_text_prompt_is_raw_and_streams_as_its_token_ids(engines):
    engine = engines.shared()
    text = f"Context: a dog{engine.tokenizer.eos_token} runs"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert engine.tokenizer.eos_token_id in ids  # special tokens spelled in the text are parsed
    decoding = Decoding(max_new_tokens=8)
    assert streamed(engine, text, "r2", decoding) == streamed(engine, ids, "r2", decoding)


def ended_at(engines) -> tuple[Engine, list[int], Decoding, list[int], int]:
    """An engine whose generation config makes token ``cut`` (the first from the third on not seen before it) of a
    greedy choice an end-of-text token, an ordinary one with a text of its own: the engine, the prompt, its decoding,
    the shared engine's greedy tokens for it (those of an engine with no such end) and ``cut``."""
    reference = engines.shared()
    ids, decoding = prompt(random.Random(31)), Decoding(max_new_tokens=16)
    tokens = alone(reference, generation(ids, None, decoding)).token_ids
    cut = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])
    engine = engines.fresh(before_engine=lambda model: setattr(model.generation_config, "eos_token_id", tokens[cut]))
    return engine, ids, decoding, tokens, cut


def test_the_models_end_of_text_ends_a_stream_with_stop(engines):
    engine, ids, decoding, _, cut = ended_at(engines)
    expected = alone(engine, generation(ids, None, decoding))
    deltas, usage = streamed(engine, ids, None, decoding)
    # the end-of-text token counts, as vLLM counts it, though it has no text
    assert (texts(deltas), reasons(deltas), usage.completion_tokens) == ([expected.text], ["stop"], cut + 1)
    assert expected.generated_tokens == len(expected.token_ids) + 1 == cut + 1


def test_the_end_of_text_token_is_handed_out_last_marked_with_its_logprobs(engines):
    """The engine hands a listener the end-of-text token that stops a generation too, last and marked ``ends_text``
    (no part of its text or token ids, one of its generated tokens), with its logprobs: those the same token has
    where ``ignore_eos`` takes it as any other, unmarked, and goes on."""
    engine, ids, decoding, tokens, cut = ended_at(engines)
    heard: dict[bool, list[SampledToken]] = {False: [], True: []}
    done = {ignore: engine.submit(dataclasses.replace(generation(ids, None, decoding), ignore_eos=ignore, logprobs=2),
                                  on_token=heard[ignore].append).result(WAIT) for ignore in (False, True)}
    ended, ignored = heard[False], heard[True]
    assert [token.token_id for token in ended] == tokens[:cut + 1]
    assert [token.ends_text for token in ended] == [False] * cut + [True]
    assert (done[False].token_ids, done[False].generated_tokens, done[False].finish_reason) == (
        tokens[:cut], cut + 1, "stop")
    assert [token.token_id for token in ignored] == done[True].token_ids == tokens and done[True].generated_tokens == 16
    assert not any(token.ends_text for token in ignored)
    for mine, theirs in zip(ended, ignored):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5) and len(mine.top_logprobs) == 2
        assert [t for t, _ in mine.top_logprobs] == [t for t, _ in theirs.top_logprobs]


def test_a_character_split_over_sampled_tokens_is_never_split_in_a_delta(engines):
    """Near-uniform sampling over the byte-level vocabulary now and then picks the bytes of one multi-byte character
    in a row; the first seed that does is streamed: its deltas add up to the engine's text, character and all."""
    engine = engines.shared()
    tokenizer, ids = engine.tokenizer, prompt(random.Random(32))
    decodings = [Decoding("temperature", temperature=100.0, seed=seed, max_new_tokens=32) for seed in range(240)]
    results = run_all(engine, [generation(ids, None, decoding) for decoding in decodings])

    def split_characters(result: GenerationResult) -> set[str]:  # whole in the text, in no token's own text
        pieces = "".join(tokenizer.decode([token]) for token in result.token_ids)
        return {c for c in result.text if ord(c) > 127 and c != "\ufffd" and c not in pieces}

    found = next(((decoding, result) for decoding, result in zip(decodings, results) if split_characters(result)), None)
    assert found is not None, "no sample holds a multi-byte character split over tokens"
    decoding, expected = found
    deltas, _ = streamed(engine, ids, None, decoding)
    assert texts(deltas) == [expected.text]
    for character in split_characters(expected):
        assert any(character in delta.text for delta in deltas), character


# ---- stop strings --------------------------------------------------------------------------------

def greedy_text(engine: Engine, rng: random.Random, adapter: str | None = None, tokens: int = 24
                ) -> tuple[list[int], Decoding, GenerationResult, list[int]]:
    """A prompt, its greedy decoding, the engine's result, and where each token's text starts in the result's text."""
    ids, decoding = prompt(rng), Decoding(max_new_tokens=tokens)
    result = alone(engine, generation(ids, adapter, decoding))
    starts = [len(engine.tokenizer.decode(result.token_ids[:k])) for k in range(len(result.token_ids))]
    return ids, decoding, result, starts


def test_stop_strings_across_token_boundaries_end_the_text_before_the_earliest(engines):
    engine = engines.shared()
    ids, decoding, result, starts = greedy_text(engine, random.Random(33))
    text = result.text
    assert "\ufffd" not in text and len(set(starts)) == len(starts) >= 12, "pick another prompt: the text is odd"
    # a token boundary past the fifth token whose two characters either side first occur there
    boundary = next(at for at in starts[5:-1] if text.find(text[at - 1:at + 1]) == at - 1)
    spanning = text[boundary - 1:boundary + 1]  # starts in one token and ends in the next
    later = text[-3:]
    assert text.find(later) > boundary
    never = "\x00\x00"
    cases = [((spanning,), text[:boundary - 1], "stop"),
             ((later, never, spanning), text[:boundary - 1], "stop"),  # several: the earliest wins
             ((text[:2],), "", "stop"),  # at the very start
             ((never, text + "!"), text, "length")]  # never met: one held back to the end
    assert streamed(engine, ids, None, decoding, stop=spanning) == streamed(engine, ids, None, decoding,
                                                                            stop=[spanning])  # one string alone
    for stop, expected_text, expected_reason in cases:
        deltas, usage = streamed(engine, ids, None, decoding, stop=stop)
        assert (texts(deltas), reasons(deltas)) == ([expected_text], [expected_reason]), stop
        if expected_reason == "stop":  # its tokens counted up to the one that completed the stop string
            met = next(k for k in range(len(starts)) if any(s in engine.tokenizer.decode(result.token_ids[:k + 1])
                                                            for s in stop))
            assert usage.completion_tokens == met + 1, stop


def test_a_choice_that_meets_a_stop_string_leaves_the_batch_and_the_other_rows_are_untouched(engines):
    """A stream whose stop string completes at token m runs beside two long rows; the engine is held before the
    decoding step after that token until the stream has asked to end the row. The row is gone from the next step
    on (so it cost at most that one step more), and the other rows get exactly what they get alone."""
    engine = engines.fresh(max_new_tokens=64, draft_tokens=0)  # a token a step: the steps are counted
    rng = random.Random(34)
    ids, decoding, result, starts = greedy_text(engine, rng, "r2", tokens=40)
    stop = result.text[starts[8]:starts[9] + 1]  # completes at token 9
    m = next(k for k in range(len(starts)) if stop in engine.tokenizer.decode(result.token_ids[:k + 1]))
    others = [long_generation(rng, "r8", 40), long_generation(rng, None, 40)]
    expected = [alone(engine, work) for work in others]
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=m + 1)
    futures, opened, outcome = [], threading.Event(), {}

    async def consume() -> None:
        stream = await tasks_of(engine).stream(ids, engine.registry.lookup("r2"), decoding, stop=[stop])
        opened.set()
        async with stream:
            outcome["deltas"] = [delta async for delta in stream]
        outcome["ended"] = stream.futures[0].ended

    with paused(engine):
        consumer = threading.Thread(target=asyncio.run, args=(consume(),))
        consumer.start()
        assert opened.wait(WAIT)
        futures = [engine.submit(work) for work in others]
    assert steps.holding.wait(WAIT)
    consumer.join(WAIT)  # the stream ends with the stop string, the engine held
    steps.release.set()
    assert outcome["ended"]
    assert texts(outcome["deltas"]) == [result.text[:result.text.find(stop)]]
    for future, work, reference in zip(futures, others, expected):
        assert same_output(future.result(WAIT), reference), work.adapter
    assert steps.notes[:m] == [3] * m and set(steps.notes[m + 1:]) == {2}, f"rows per step: {steps.notes}"


# ---- logprobs ------------------------------------------------------------------------------------

@torch.no_grad()
def reference_logprobs(base_dir, adapter_dir, prompt_ids: list[int], tokens: list[int]) -> tuple[torch.Tensor, float]:
    """log_softmax of the logits stock transformers (peft with an adapter) gives the prompt and the tokens, at each
    position that predicted a token ([len(tokens), V]), and the logits' scale (max |logit|)."""
    sequence = torch.tensor([prompt_ids + tokens])
    if adapter_dir is None:
        logits = AutoModelForCausalLM.from_pretrained(base_dir).eval()(sequence).logits
    else:
        logits = peft_logits(base_dir, adapter_dir, sequence)
    return logits[0, len(prompt_ids) - 1:-1].log_softmax(-1), logits.abs().max().item()


@pytest.mark.parametrize("adapter", [None, "r8"])
def test_logprobs_are_the_models_own_distribution_before_temperature(engines, adapter):
    """Top-5 logprobs of a greedy and of a temperature-2 choice, against log_softmax of stock transformers' (peft's)
    logits for the same sequence. A logprob is logit - logsumexp: batching moves each logit by up to
    RELATIVE_TOLERANCE (1.5e-5) times their scale, so the two differ by at most twice that, plus float32 rounding
    of the logsumexp: the bound is 4 x 1.5e-5 x max |logit|."""
    engine = engines.shared()
    base_dir, adapters = engines.base("llama")
    ids = prompt(random.Random(35))
    decoding = Decoding("temperature", temperature=2.0, seed=5, max_new_tokens=10)
    deltas, _ = streamed(engine, ids, adapter, decoding, logprobs=5, n=2)
    greedy_deltas, _ = streamed(engine, ids, adapter, dataclasses.replace(decoding, strategy="greedy"), logprobs=5)
    for index, choice in enumerate([*[[d for d in deltas if d.index == i] for i in range(2)], greedy_deltas]):
        entries = [entry for delta in choice for entry in delta.logprobs]
        tokens = [entry.token_id for entry in entries]
        reference, scale = reference_logprobs(base_dir, adapters.get(adapter), ids, tokens)
        tolerance = 4 * RELATIVE_TOLERANCE["none"] * scale
        for step, entry in enumerate(entries):
            expected = reference[step]
            assert abs(entry.logprob - expected[entry.token_id].item()) <= tolerance, (index, step)
            fifth = expected.topk(5).values
            assert [alternative.logprob for alternative in entry.top_logprobs] == pytest.approx(
                fifth.tolist(), abs=tolerance), (index, step)
            for alternative in entry.top_logprobs:  # among the five most likely, up to near ties
                assert abs(alternative.logprob - expected[alternative.token_id].item()) <= tolerance
                assert expected[alternative.token_id] >= fifth[-1] - tolerance
            assert entry.token == engine.tokenizer.decode([entry.token_id])
        if index < 2:  # sampled at temperature 2: the tokens are not all the most likely ones
            assert any(entry.token_id != entry.top_logprobs[0].token_id for entry in entries)


def test_the_end_of_text_token_is_the_last_logprobs_entry_of_its_choice(engines):
    """vLLM keeps the end-of-text token that ended a choice in its ``token_ids`` and ``logprobs`` (its detokenizer
    leaves it out of the text only): a choice has an entry for each token ``usage`` counts, the last one named by its
    own text (an ordinary token here), at the end of the text, with the choice's last delta; streamed or collected,
    each of n choices."""
    engine, ids, decoding, tokens, cut = ended_at(engines)
    deltas, usage = streamed(engine, ids, None, decoding, logprobs=2, n=2)
    completion = asyncio.run(tasks_of(engine).complete(ids, None, decoding, logprobs=2, n=2))
    assert usage == completion.usage == Usage(len(ids), 2 * (cut + 1))
    ending = engine.tokenizer.decode([tokens[cut]])
    for index, text in enumerate(texts(deltas, 2)):
        choice = [delta for delta in deltas if delta.index == index]
        entries = tuple(entry for delta in choice for entry in delta.logprobs)
        assert text == engine.tokenizer.decode(tokens[:cut])
        assert [entry.token_id for entry in entries] == tokens[:cut + 1]
        assert choice[-1].logprobs[-1] == entries[-1] and choice[-1].finish_reason == "stop"
        assert (entries[-1].token, entries[-1].token_bytes, entries[-1].text_offset) == (
            ending, tuple(ending.encode()), len(text))
        assert completion.choices[index].logprobs == entries and completion.choices[index].text == text
    base_dir, _ = engines.base("llama")
    reference, scale = reference_logprobs(base_dir, None, ids, tokens[:cut + 1])
    assert abs(entries[-1].logprob - reference[cut, tokens[cut]].item()) <= 4 * RELATIVE_TOLERANCE["none"] * scale


# ---- n choices -----------------------------------------------------------------------------------

def test_n_choices_are_seeded_apart_reproducible_and_batched_together(engines):
    engine = engines.fresh()
    ids, n = prompt(random.Random(36)), 4
    decoding = Decoding("temperature", temperature=1.5, seed=11, max_new_tokens=12)
    engine.decoder = steps = WatchedSteps(engine.decoder)
    deltas, usage = streamed(engine, ids, "r4", decoding, n=n)
    assert steps.notes[0] == n, f"the choices did not share the first decoding step: rows per step {steps.notes}"
    choices = texts(deltas, n)
    assert len(set(choices)) == n, choices
    assert streamed(engine, ids, "r4", decoding, n=n) == (deltas, usage)
    alone_results = [alone(engine, generation(ids, "r4", dataclasses.replace(decoding, seed=choice_seed(11, index))))
                     for index in range(n)]
    assert choices == [result.text for result in alone_results]
    assert choice_seed(11, 0) == 11 and usage.completion_tokens == sum(r.generated_tokens for r in alone_results)
    reseeded, _ = streamed(engine, ids, "r4", dataclasses.replace(decoding, seed=12), n=n)
    assert all(a != b for a, b in zip(texts(reseeded, n), choices))


# ---- a client gone -------------------------------------------------------------------------------

async def drain(stream: CompletionStream) -> None:
    async for _ in stream:
        pass


@pytest.mark.parametrize("how", ["cancelled", "closed"])
def test_a_stream_cancelled_or_closed_drops_its_rows(engines, how):
    """Its consumer cancelled while it iterates (the HTTP layer's task, its client gone), or the stream closed: both
    choices' rows leave before the next decoding step, their futures abandoned."""
    engine = engines.fresh(max_new_tokens=300)
    engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=3)
    ids = prompt(random.Random(37))
    seen: dict[str, CompletionStream] = {}

    async def consume() -> None:
        stream = seen["stream"] = await tasks_of(engine).stream(ids, engine.registry.lookup("r8"),
                                                                 Decoding(max_new_tokens=300), n=2)
        if how == "closed":
            async with stream:
                assert await asyncio.to_thread(steps.holding.wait, WAIT)
            return
        draining = asyncio.ensure_future(drain(stream))
        assert await asyncio.to_thread(steps.holding.wait, WAIT)
        draining.cancel()  # lands where the task next waits: inside the stream, for the engine's next token
        with pytest.raises(asyncio.CancelledError):
            await draining

    asyncio.run(consume())
    steps.release.set()
    for future in seen["stream"].futures:
        with pytest.raises(RequestAbandoned):
            future.result(WAIT)
    later = generation(prompt(random.Random(38)), "r2", Decoding(max_new_tokens=5))
    assert same_output(alone(engine, later), alone(engines.shared(), later))
    assert steps.notes == [2, 2, 2, 1, 1, 1, 1], f"rows of each decoding step: {steps.notes}"


def test_a_listener_that_fails_abandons_only_its_request(engines):
    engine = engines.fresh()
    rng = random.Random(39)
    works = [long_generation(rng, name, 12) for name in ("r2", None, "r8")]
    expected = [alone(engine, work) for work in works]

    def failing(_token) -> None:
        raise RuntimeError("the listener failed")

    with paused(engine):
        futures = [engine.submit(works[0]), engine.submit(works[1], on_token=failing), engine.submit(works[2])]
    with pytest.raises(RequestAbandoned):
        futures[1].result(WAIT)
    for future, reference in zip([futures[0], futures[2]], [expected[0], expected[2]]):
        assert same_output(future.result(WAIT), reference)


def test_ending_a_queued_request_withdraws_it(engines):
    engine = engines.fresh()
    rng = random.Random(40)
    with paused(engine):
        future = engine.submit(long_generation(rng, "r2", 8))
        engine.end(future)
        assert future.cancelled() and engine.queue_depth == 0


# ---- what a stream refuses -----------------------------------------------------------------------

def test_a_request_that_cannot_be_streamed_is_refused_before_anything_is_queued(engines):
    engine = engines.fresh(max_queue=4)
    tasks, ids = tasks_of(engine), prompt(random.Random(41))
    vocabulary = len(engine.tokenizer)
    refused = [{"prompt_ids": []}, {"prompt_ids": [1, vocabulary]}, {"prompt_ids": [1, -1]},
               {"prompt_ids": [1, True]}, {"prompt_ids": [1, 2.0]}, {"stop": [""]}, {"logprobs": 21},
               {"logprobs": -1}, {"n": 0}]

    async def open_stream(prompt_ids=ids, **options) -> CompletionStream:
        return await tasks.stream(prompt_ids, None, Decoding(), **options)

    for options in refused:
        with pytest.raises(ValueError):
            asyncio.run(open_stream(**options))
    with pytest.raises(UnknownAdapter):
        engine.submit(generation(ids, "nope", Decoding()))
    with pytest.raises(InputTooLong):
        asyncio.run(open_stream([1] * (tasks.max_prompt + 1)))
    with paused(engine):
        for _ in range(3):
            engine.submit(long_generation(random.Random(42), None, 2))
        with pytest.raises(QueueFull):
            asyncio.run(open_stream(n=2))
        assert engine.queue_depth == 3  # neither choice was queued


# ---- metrics -------------------------------------------------------------------------------------

def sample(name: str, adapter: str) -> float:
    return REGISTRY.get_sample_value(name, {"adapter": adapter}) or 0.0


def test_a_stream_records_its_inter_token_latency_and_one_time_to_first_token(engines):
    engine = engines.shared()
    ids, decoding = prompt(random.Random(43)), Decoding(max_new_tokens=7)
    names = [f"loraswap_{metric}_seconds_{part}" for metric in ("inter_token_latency", "time_to_first_token")
             for part in ("count", "sum")]
    before = [sample(name, "r4") for name in names]
    _, usage = streamed(engine, ids, "r4", decoding, n=3)
    gaps, gap_seconds, firsts, first_seconds = [sample(name, "r4") - old for name, old in zip(names, before)]
    assert gaps == usage.completion_tokens - 3 > 0  # each choice: one gap fewer than its tokens
    assert firsts == 1  # once per stream, not per choice, and not again by the engine
    assert gap_seconds > 0 and first_seconds > 0
