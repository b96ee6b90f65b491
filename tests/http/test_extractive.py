"""/answer's guaranteed spans on the tiny bases. Greedy extractive answers are stock transformers + peft greedy
generation under a brute-force span constraint (``tests/span_reference.py``, through generate's
``prefix_allowed_tokens_fn``); under every decoding strategy and seed an answer is a span of its context with its
offsets; constrained and free rows share batches; contexts in several scripts, with multi-byte characters."""
from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.tasks.prompt_styles import ADAPTER_STYLE, answer_ids
from service.tasks.prompts import answer_prompt
from service.tasks.tasks import WINDOW_SLACK
from tests.engine.engine_helpers import WatchedSteps
from tests.http.api_helpers import Tiny
from tests.http.replies import settings_by_field
from tests.server_helpers import (
    SERVER_CAP,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    ask,
    ready_client,
    tiny_settings,
    wait_until,
)
from tests.span_reference import WHITESPACE, BruteForceSpans
from tests.tiny_models import forced_token_model

CONTEXTS = [
    (SQUAD_CONTEXT, SQUAD_QUESTION),
    ("Le café coûte 3 €, dit Zoë à l'hôtel «Übermaß» près de Cœuvres.", "Combien coûte le café?"),
    ("東京は日本の首都です。富士山は日本で一番高い山です。", "日本の首都は?"),
    ("The capital is ירושלים, written right to left, and the river is the Jordan.", "What is the capital?"),
    ("Emoji 🙂🚀 and a combining accent: e\u0301, then a\ttab and the end.", "What comes after the tab?"),
]


class Reference:
    """Stock transformers (+ peft), greedy, constrained by brute force to spans of the context."""

    def __init__(self, tiny: Tiny):
        self.tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)
        self.models = {None: AutoModelForCausalLM.from_pretrained(tiny.base_dir).eval()}
        for name, path in tiny.adapters.items():
            self.models[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.base_dir),
                                                          path).eval()

    @torch.no_grad()
    def answer(self, adapter: str | None, context: str, question: str, max_new_tokens: int
               ) -> tuple[str, int, int, float]:
        """The constrained greedy answer, its first occurrence's offsets, and the mean raw log-probability of its
        tokens and its ending (the model's logits, before the constraint)."""
        spans = BruteForceSpans(self.tokenizer, context, {self.tokenizer.eos_token_id}, max_new_tokens)
        ids = self.tokenizer(answer_prompt(context, question), return_tensors="pt", add_special_tokens=False,
                             split_special_tokens=True).input_ids

        def allowed(_, sequence: torch.Tensor) -> list[int]:
            generated = sequence[ids.shape[1]:].tolist()
            if any(token in spans.ends for token in generated):
                return list(range(len(self.tokenizer)))  # the answer is over: what follows is cut
            return spans.allowed(spans.bytes_of(generated))

        out = self.models[adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=max_new_tokens, prefix_allowed_tokens_fn=allowed,
                                            output_logits=True, return_dict_in_generate=True)
        generated = out.sequences[0, ids.shape[1]:].tolist()
        ended = next((i for i, token in enumerate(generated) if token in spans.ends), len(generated))
        text = spans.span(spans.bytes_of(generated[:ended]))
        taken = generated[:ended + 1]  # the ending token too
        logprobs = [out.logits[i][0].float().log_softmax(-1)[token].item() for i, token in enumerate(taken)]
        start = context.find(text)
        return text, start, start + len(text), sum(logprobs) / len(logprobs)


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Reference:
    return Reference(tiny)


@pytest.mark.parametrize("adapter", [None, "one", "two"])
def test_greedy_extractive_answers_are_the_constrained_reference(client, reference, adapter):
    for context, question in CONTEXTS:
        got = ask(client, adapter, context=context, question=question)
        *want, score = reference.answer(adapter, context, question, SERVER_CAP)
        assert [got["answer"], got["start"], got["end"]] == want, (context, question)
        assert got["score"] == pytest.approx(score, abs=1e-4)
        assert got["answer"] and context[got["start"]:got["end"]] == got["answer"]


@pytest.mark.parametrize("strategy,parameters", [("top_k", {"top_k": 50}), ("nucleus", {"top_p": 0.9}),
                                                 ("temperature", {"temperature": 2.0}),
                                                 ("temperature", {"temperature": 1e-30})])
def test_every_strategy_and_seed_answers_with_a_span(client, strategy, parameters):
    """However few tokens it may take: a character the budget cuts short is completed from the context."""
    for context, question in CONTEXTS:
        for seed, budget in zip(range(6), (1, 2, 3, 12, 12, 12)):
            got = ask(client, "one", context=context, question=question, strategy=strategy, seed=seed,
                      max_new_tokens=budget, **parameters)
            assert got["answer"] and context[got["start"]:got["end"]] == got["answer"], (context, got)
            assert got["answer"] == got["answer"].strip(WHITESPACE.decode())


def test_constrained_and_free_rows_share_a_batch_and_each_gets_its_answer_alone(client):
    jobs = [(adapter, context, question, extractive) for adapter in ("one", None) for context, question in CONTEXTS
            for extractive in (True, False)]
    alone = {job: ask(client, job[0], context=job[1], question=job[2], extractive=job[3]) for job in jobs}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(client, job[0], context=job[1], question=job[2],
                                                 extractive=job[3]), jobs))
    for job, reply in zip(jobs, together):  # the score as float rounding in another batch allows
        assert {**reply, "latency_ms": 0, "score": 0} == {**alone[job], "latency_ms": 0, "score": 0}, job
        assert (reply["score"] is None) == (not job[3])
        assert reply["score"] is None or reply["score"] == pytest.approx(alone[job]["score"], abs=1e-4)


FILLER = "Normans gave Normandy its name. "  # no "the" in it


WINDOWS = {"answer_stride": 16, "max_answer_windows": 40}  # neighbouring windows share 16 tokens; 40 at most


def forced_the_settings(tiny_tokenizer_dir, root, **overrides):
    """The settings of a server in ``root`` on a GPT-2 that always says " the", with no adapters, whose prompts hold
    64 tokens (long contexts go in windows), and ``overrides``."""
    base = forced_token_model(tiny_tokenizer_dir, root / "forced", " the")
    (root / "none").mkdir()
    return tiny_settings(base, root / "none", root / "cache", **{"max_input_tokens": 64, **overrides})


@pytest.fixture(scope="module")
def windowed(tiny_tokenizer_dir, tmp_path_factory):
    """A server on a GPT-2 that always says " the", whose prompts hold 64 tokens: long contexts go in windows."""
    root = tmp_path_factory.mktemp("windows")
    settings = forced_the_settings(tiny_tokenizer_dir, root, **WINDOWS)
    with ready_client(settings) as client:
        yield client


def answer_windows(client, context: str) -> list[tuple[int, int]]:
    return asyncio.run(client.app.state.runtime.tasks.answer_windows(context, "When?"))


def test_the_answer_in_the_last_window_is_found(windowed):
    context = FILLER * 20 + "At last the end came."
    assert len(answer_windows(windowed, context)) > 3
    reply = ask(windowed, None, context=context, question="When?")
    assert reply["answer"].startswith("the") and reply["start"] == context.index("the end")
    assert context[reply["start"]:reply["end"]] == reply["answer"]


def test_an_answer_cut_by_a_window_boundary_is_found_whole_in_the_next_window(windowed):
    ranges = answer_windows(windowed, FILLER * 20)
    boundary = ranges[1][1]  # the end of the second window, inside the third
    context = FILLER * 20
    context = context[:boundary - 2] + " the end " + context[boundary - 2:]  # "the" straddles the boundary
    ranges = answer_windows(windowed, context)
    at = context.index("the end")
    assert any(start < at < end < at + len("the end") for start, end in ranges), "no window cuts the answer"
    reply = ask(windowed, None, context=context, question="When?")
    assert reply["answer"].startswith("the") and reply["start"] == at


def test_a_context_without_the_answer_still_gets_a_span_scored_lower(windowed):
    context = FILLER * 20
    without = ask(windowed, None, context=context, question="When?")
    with_it = ask(windowed, None, context=context + "the end.", question="When?")
    assert without["answer"] and context[without["start"]:without["end"]] == without["answer"]
    assert without["score"] < with_it["score"]


def test_a_context_past_the_windows_cap_is_413_and_a_free_answer_past_one_prompt_too(windowed):
    assert ask(windowed, None, context=FILLER * 200, status=413)
    error = ask(windowed, None, context=FILLER * 20, extractive=False, status=413)["error"]
    assert re.fullmatch(r"the prompt has \d+ tokens; at most 64 are accepted \(LORASWAP_MAX_INPUT_TOKENS\)",
                        error), error


def test_a_prompt_past_what_the_model_s_positions_leave_names_them(tiny_tokenizer_dir, tmp_path):
    """A review: the 413 of a prompt too long named no setting; where the base model's positions less the tokens to
    generate bound a prompt before max_input_tokens does, it names them."""
    settings = forced_the_settings(tiny_tokenizer_dir, tmp_path, max_input_tokens=4096, max_new_tokens=8)
    with ready_client(settings) as client:
        positions = client.app.state.runtime.tasks.max_prompt + 8
        error = ask(client, None, context=FILLER * 200, extractive=False, status=413)["error"]
    assert error.endswith(f"; at most {positions - 8} are accepted (the base model's {positions} positions less "
                          "LORASWAP_MAX_NEW_TOKENS 8)"), error


@pytest.mark.parametrize("left,message", [
    (range(-8, 1), r"the question leaves no room for a context: its prompt takes \d+ tokens, and a window keeps 8 "
                   r"free; at most 64 are accepted \(LORASWAP_MAX_INPUT_TOKENS\)"),
    (range(1, 17), r"the question leaves \d+ tokens of context per prompt, no more than the 16 two windows share; "
                   r"at most 64 are accepted \(LORASWAP_MAX_INPUT_TOKENS\)"),
])
def test_a_question_that_leaves_a_long_context_too_little_room_is_a_413_that_says_so(windowed, left, message):
    """A review: a question of about 90 tokens under 96-token prompts was told it 'leaves -4 tokens of context per
    prompt, no more than the -2 two windows share'. ``left``: the context's room per window the question leaves."""
    tasks = windowed.app.state.runtime.tasks

    def room(question: str) -> int:
        return tasks.max_prompt - len(answer_ids(tasks.tokenizer, ADAPTER_STYLE, "", question)) - WINDOW_SLACK

    question = next(q for q in ("Why" + " why" * words for words in range(64)) if room(q) in left)
    error = ask(windowed, None, context=FILLER * 20, question=question, status=413)["error"]
    assert re.fullmatch(message, error) and "-" not in error, error


def test_a_context_of_more_windows_than_the_queue_holds_is_413_not_a_429_that_never_passes(windowed, tmp_path,
                                                                                           tiny_tokenizer_dir):
    """The windows queue together, all or none: more than ``max_queue`` of them never fit, so such a context is too
    long for this server (413, naming the queue), not a 429 to retry for ever; as many as the queue holds are
    answered."""
    settings = forced_the_settings(tiny_tokenizer_dir, tmp_path, **WINDOWS, max_queue=4)
    fits = max(count for count in range(1, 20) if len(answer_windows(windowed, FILLER * count)) <= 4)
    with ready_client(settings) as client:
        assert ask(client, None, context=FILLER * fits, question="When?")["answer"]
        error = ask(client, None, context=FILLER * (fits + 1), question="When?", status=413)["error"]
    assert "the least of this server's LORASWAP_MAX_ANSWER_WINDOWS and LORASWAP_MAX_QUEUE" in error, error
    assert settings_by_field(error) == [], error  # it named max_answer_windows and max_queue, the settings' fields


def test_a_windowed_answer_is_given_at_its_first_occurrence_in_the_whole_context(windowed):
    context = "the end. " + FILLER * 20 + "At last the end came."
    reply = ask(windowed, None, context=context, question="When?")
    assert reply["answer"].startswith("the") and reply["start"] == context.find(reply["answer"])
    assert context[reply["start"]:reply["end"]] == reply["answer"]


def test_the_windows_of_one_answer_waiting_for_each_other_past_max_queue_wait_are_answered(tiny_tokenizer_dir,
                                                                                           tmp_path):
    """One window in the batch at a time (max_batch 1) and its decoding held past ``max_queue_wait``: the other
    windows wait for it, and are answered (a 429 once: the request was shed by its own windows)."""
    settings = forced_the_settings(tiny_tokenizer_dir, tmp_path, **WINDOWS, max_batch=1, max_queue_wait=0.2)
    context = FILLER * 20 + "At last the end came."
    with ready_client(settings) as client:
        expected = ask(client, None, context=context, question="When?")
        engine = client.app.state.runtime.engine
        engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
        threading.Timer(0.5, steps.release.set).start()
        reply = ask(client, None, context=context, question="When?")
        assert len(answer_windows(client, context)) > 3 and steps.holding.is_set()
    assert {**reply, "latency_ms": 0} == {**expected, "latency_ms": 0}
    assert reply["latency_ms"] >= 500


def test_a_short_answer_sent_behind_a_long_context_s_windows_is_answered_before_them(tiny_tokenizer_dir, tmp_path):
    """One window in the batch at a time (max_batch 1), the first window of a long context held while a one-window
    /answer arrives: the short one goes next, before the long one's other windows (they come due as the engine takes
    their tokens, ``Engine.submit_together``), where first come, first served over windows answered it last."""
    settings = forced_the_settings(tiny_tokenizer_dir, tmp_path, **WINDOWS, max_batch=1)
    long_context, short_context = FILLER * 20 + "At last the end came.", "At last the end came."
    with ready_client(settings) as client, ThreadPoolExecutor(2) as pool:
        expected = {context: ask(client, None, context=context, question="When?")
                    for context in (long_context, short_context)}
        engine = client.app.state.runtime.engine
        engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
        finished = []

        def answer(context: str) -> dict:
            reply = ask(client, None, context=context, question="When?")
            finished.append(context)
            return reply

        long_reply = pool.submit(answer, long_context)
        assert steps.holding.wait(30), "the long context's first window never ran"
        short_reply = pool.submit(answer, short_context)
        windows = len(answer_windows(client, long_context))
        wait_until(lambda: engine.queue_depth >= windows, "the short context queued behind the long one's windows")
        steps.release.set()
        replies = {long_context: long_reply.result(60), short_context: short_reply.result(60)}
    assert finished == [short_context, long_context]
    assert len(answer_windows(client, long_context)) > 3
    for context, reply in replies.items():
        assert {**reply, "latency_ms": 0} == {**expected[context], "latency_ms": 0}


def test_a_short_longest_prompt_alone_answers_in_windows_with_the_default_stride(tiny_tokenizer_dir, tmp_path):
    """max_input_tokens 64 with answer_stride unset: windows share half their context tokens and move on by the other
    half, so a long context takes few windows. A stride of 128 fit no window of 64 (every long context was a 413);
    half the prompt (32 of windows of 36 context tokens) moved them on by 4, and this context took more than the 16
    windows allowed (a 413)."""
    settings = forced_the_settings(tiny_tokenizer_dir, tmp_path)
    context = FILLER * 28 + "At last the end came."
    with ready_client(settings) as client:
        ranges = answer_windows(client, context)
        reply = ask(client, None, context=context, question="When?")
    assert 3 < len(ranges) <= settings.max_answer_windows
    assert reply["answer"].startswith("the") and reply["start"] == context.index("the end")
