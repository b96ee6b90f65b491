"""The side-by-side comparison's pure parts (loadtest.side_by_side, side_by_side_report, workload, endpoints): the
order of the measurements, the requests it builds, the scoring of replies, the report, the options, and the bodies
its clients send (to an httpx MockTransport standing for the server). Nothing here is timed."""
from __future__ import annotations

import argparse
import gzip
import http.server
import itertools
import json
import sys
import threading
from collections import Counter

import httpx
import pytest

from loadtest.endpoints import ADAPTERS, NEW_TOKENS, LlamaCpp, Loraswap, OpenAI, endpoint, label_of, lora_id
from loadtest.profile_answer import WARMUP, breakdown_table, by_stage, per_request_ms, planned_loads
from loadtest.side_by_side import (
    check_names,
    load_spec,
    pid_spec,
    planned_requests,
    run_side_by_side,
    schedule,
    session,
    system_spec,
)
from loadtest.side_by_side_report import load_name, markdown, score, summarize
from loadtest.stack_shares import ENGINE, EVENT_LOOP, OTHER, parse_raw, shares
from loadtest.workload import Item, take_turns, workload
from service.tasks.prompts import answer_prompt, nli_prompt
from training.metrics import squad_scores

SYSTEMS = ["llama", "loraswap", "other"]
LOADS = [("squad", 1), ("squad", 8), ("mixed", 8)]


def question(answers: tuple[str, ...]) -> Item:
    return Item("squad", "Context: c\nQuestion: q\nAnswer:", {"context": "c", "question": "q"}, answers)


def pair(label: str) -> Item:
    return Item("nli", "Premise: p\nHypothesis: h\nRelation:", {"premise": "p", "hypothesis": "h"}, (label,))


# the order of the measurements

@pytest.mark.parametrize("rounds", [1, 2, 3, 4])
def test_schedule_runs_every_load_on_every_system_once_a_round(rounds):
    order = schedule(SYSTEMS, LOADS, rounds)
    assert Counter(order) == Counter((r, load, s) for r in range(1, rounds + 1) for load in LOADS for s in SYSTEMS)
    assert [r for r, _, _ in order] == sorted(r for r, _, _ in order)  # rounds one after the other


def test_schedule_reverses_the_systems_every_other_round():
    order = schedule(SYSTEMS, LOADS, 4)
    for round_ in range(1, 5):
        for load in LOADS:
            turn = [s for r, this, s in order if r == round_ and this == load]
            assert turn == (SYSTEMS if round_ % 2 else SYSTEMS[::-1])
    # over two rounds, each system follows each other system as often as it precedes it (A B, B A)
    pairs = Counter()
    for r in (1, 2):
        turn = [s for rr, this, s in order if rr == r and this == LOADS[0]]
        pairs.update(itertools.pairwise(turn))
    assert all(pairs[a, b] == pairs[b, a] for a, b in pairs)


def test_rounds_are_compared_only_where_they_asked_the_same_questions():
    fresh = [{**record("a", "squad", 1, 1.0, [1.0], [answer]), "question_set": number}
             for number, answer in ((0, "x"), (1, "y"))]
    assert summarize(fresh)["a"][load_name("squad", 1)]["same_answers"]
    repeated = [{**run, "question_set": 0} for run in fresh]
    assert not summarize(repeated)["a"][load_name("squad", 1)]["same_answers"]


# the requests

def write_data(root, contexts: int = 2, per_context: int = 3) -> None:
    paragraphs = [{"context": f"Context number {c}.", "qas": [
        {"id": f"q{c}{q}", "question": f"Question {q} on {c}?", "answers": [{"text": f"a{c}{q}", "answer_start": 0}]}
        for q in range(per_context)]} for c in range(contexts)]
    (root / "squad").mkdir()
    with gzip.open(root / "squad" / "dev-v1.1.json.gz", "wt") as f:
        json.dump({"data": [{"title": "T", "paragraphs": paragraphs}]}, f)
    rows = [{"premise": f"P{i}", "hypothesis": f"H{i}", "label": label, "mnli_split": split}
            for i, (label, split) in enumerate([("neutral", "dev_matched"), ("entailment", "dev_mismatched"),
                                                ("-", "dev_matched"), ("contradiction", "dev_matched"),
                                                ("entailment", "dev_matched")])]
    (root / "nli").mkdir()
    with gzip.open(root / "nli" / "mnli.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def test_squad_workload_is_the_first_questions_with_the_services_prompt(tmp_path):
    write_data(tmp_path)
    items = workload("squad", 4, tmp_path)
    assert [i.fields["question"] for i in items] == ["Question 0 on 0?", "Question 1 on 0?", "Question 2 on 0?",
                                                     "Question 0 on 1?"]
    assert all(i.prompt == answer_prompt(i.fields["context"], i.fields["question"]) for i in items)
    assert items[3].references == ("a10",) and {i.task for i in items} == {"squad"}


@pytest.mark.parametrize("count", [1, 2, 5, 6])
def test_mixed_workload_takes_turns_with_dev_matched_pairs(tmp_path, count):
    write_data(tmp_path)
    items = workload("mixed", count, tmp_path)
    assert len(items) == count
    assert [i.task for i in items] == ["squad", "nli"] * (count // 2) + ["squad"] * (count % 2)
    pairs = [i for i in items if i.task == "nli"]
    # dev_matched only, a row without a label of the three ("-") skipped
    assert [i.references[0] for i in pairs] == ["neutral", "contradiction", "entailment"][:len(pairs)]
    assert all(i.prompt == nli_prompt(i.fields["premise"], i.fields["hypothesis"]) for i in pairs)


def write_many(root) -> None:
    """300 SQuAD questions (30 contexts of 10) and 100 dev_matched NLI pairs."""
    write_data(root, contexts=30, per_context=10)
    rows = [{"premise": f"P{i}", "hypothesis": f"H{i}", "label": "neutral", "mnli_split": "dev_matched"}
            for i in range(100)]
    with gzip.open(root / "nli" / "mnli.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def side_by_side_args(root, loads, questions, rounds, warmup, fresh=True) -> argparse.Namespace:
    return argparse.Namespace(loads=loads, questions=questions, rounds=rounds, warmup=warmup, fresh_questions=fresh,
                              data=root)


@pytest.mark.parametrize("loads", [LOADS, [("mixed", 8), ("squad", 1)], [("squad", 1)]])
def test_fresh_questions_give_every_round_and_load_questions_and_pairs_of_its_own(tmp_path, loads):
    write_many(tmp_path)
    planned = planned_requests(side_by_side_args(tmp_path, loads, questions=11, rounds=3, warmup=4))
    assert list(planned) == list(dict.fromkeys((r, load) for r, load, _ in schedule(SYSTEMS, loads, 3)))
    asked = [json.dumps(item.fields) for items in planned.values() for item in items]
    assert all(len(items) == 11 for items in planned.values())
    assert len(asked) == len(set(asked)), "a question or pair asked twice"
    warm = {json.dumps(item.fields) for mode in ("squad", "mixed") for item in workload(mode, 4, tmp_path)}
    assert not warm & set(asked), "a warm-up request asked again"
    for (_, (mode, _)), items in planned.items():  # each mode's own shape: questions, or questions taking turns
        assert [i.task for i in items] == (["squad"] * 11 if mode == "squad" else ["squad", "nli"] * 5 + ["squad"])
    stale = planned_requests(side_by_side_args(tmp_path, loads, questions=11, rounds=3, warmup=4, fresh=False))
    assert all(items == workload(mode, 11, tmp_path) for (_, (mode, _)), items in stale.items())


@pytest.mark.parametrize("mode", ["squad", "mixed"])
def test_a_profile_with_fresh_questions_asks_each_load_its_own_after_the_warm_up(tmp_path, mode):
    write_many(tmp_path)
    args = argparse.Namespace(mode=mode, clients=[1, 8, 2], questions=10, fresh_questions=True, data=tmp_path)
    loads = planned_loads(args)
    asked = [json.dumps(item.fields) for items in loads for item in items]
    assert [len(items) for items in loads] == [10, 10, 10] and len(asked) == len(set(asked)), "a request asked twice"
    assert not {json.dumps(item.fields) for item in workload(mode, WARMUP, tmp_path)} & set(asked)
    args.fresh_questions = False
    assert planned_loads(args) == [workload(mode, 10, tmp_path)] * 3
    args.fresh_questions, args.questions = True, 1000
    with pytest.raises(ValueError, match="the data holds"):
        planned_loads(args)


@pytest.mark.parametrize(("fresh", "mode", "questions", "rounds"), [
    (True, "squad", 4, 2), (True, "mixed", 4, 2), (False, "squad", 7, 1), (False, "mixed", 8, 1)])
def test_more_requests_than_the_data_holds_are_a_usage_error_before_any_is_sent(tmp_path, fresh, mode, questions,
                                                                                  rounds, capsys):
    """6 SQuAD questions and 3 usable NLI pairs: 2 rounds of 4 new questions, or of 2 new pairs, are too many, as
    are 7 questions asked every round."""
    write_data(tmp_path)
    args = argparse.Namespace(system=[("a", "loraswap", "http://127.0.0.1:9"), ("b", "openai", "http://127.0.0.1:9")],
                              pid=[], baseline=None,
                              **vars(side_by_side_args(tmp_path, [(mode, 1)], questions, rounds, 0, fresh)))
    with pytest.raises(SystemExit) as exit_:
        run_side_by_side(args)  # nothing listens on port 9: a request sent would fail otherwise
    assert exit_.value.code == 2 and "loraswap side-by-side: error:" in capsys.readouterr().err


def test_a_system_that_does_not_answer_is_a_usage_error_before_any_is_timed(tmp_path, capsys):
    """A review: with the second system down, the first was timed for minutes before an httpx traceback. Any HTTP
    reply counts as answering (this server answers 501 to every GET)."""
    write_data(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up = f"http://127.0.0.1:{server.server_port}"
    args = argparse.Namespace(system=[("up", "loraswap", up), ("down", "openai", "http://127.0.0.1:9")], pid=[],
                              baseline=None, **vars(side_by_side_args(tmp_path, [("squad", 1)], 2, 1, 0)))
    try:
        with pytest.raises(SystemExit) as exit_:
            run_side_by_side(args)
    finally:
        server.shutdown()
    error = capsys.readouterr().err.splitlines()[-1]  # after the stand-in server's log of the GET it answered
    assert exit_.value.code == 2 and error.startswith("loraswap side-by-side: error: system down does not answer at "
                                                      "http://127.0.0.1:9"), error


@pytest.mark.parametrize("path,status,message", [
    ("http://256.0.0.1:9", 2, "system down does not answer at http://256.0.0.1:9: InvalidURL"),
    ("UP/nope", 1, "a request failed, so no report: Server error '501 Unsupported method"),
])
def test_a_bad_url_or_a_failed_request_is_one_line_not_a_traceback(tmp_path, capsys, path, status, message):
    """A review: an invalid host was an httpx.InvalidURL traceback; a URL whose server answers every request with an
    error status (here 501) passed the check and ended the run in an HTTPStatusError traceback."""
    write_data(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up = f"http://127.0.0.1:{server.server_port}"
    args = argparse.Namespace(system=[("up", "loraswap", up), ("down", "openai", path.replace("UP", up))], pid=[],
                              baseline=None, cache_prompt=False,
                              **vars(side_by_side_args(tmp_path, [("squad", 1)], 2, 1, 0)))
    try:
        with pytest.raises(SystemExit) as exit_:
            run_side_by_side(args)
    finally:
        server.shutdown()
    error = capsys.readouterr().err.splitlines()[-1]
    assert exit_.value.code == status and error.startswith(f"loraswap side-by-side: error: {message}"), error


def test_workload_refuses_an_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        workload("nli", 2, tmp_path)


@pytest.mark.parametrize("first, second", [([], []), ([1, 2, 3], ["a"]), ([1], ["a", "b", "c"]), ([1, 2], ["a", "b"])])
def test_take_turns(first, second):
    merged = take_turns(first, second)
    assert sorted(map(str, merged)) == sorted(map(str, first + second))
    assert [x for x in merged if x in first] == first and [x for x in merged if x in second] == second
    shorter = min(len(first), len(second))
    assert merged[:2 * shorter:2] == first[:shorter] and merged[1:2 * shorter:2] == second[:shorter]


# scoring

def test_score_matches_the_official_scoring_and_counts_the_pairs():
    items = [question(("Denver Broncos", "Broncos")), pair("neutral"), question(("Paris",)), pair("entailment"),
             question(("the red car",))]
    texts = ["broncos", "neutral", "London", "contradiction", "red"]
    scores = score(items, texts)
    official = squad_scores({"0": "broncos", "2": "London", "4": "red"},
                            {"0": ["Denver Broncos", "Broncos"], "2": ["Paris"], "4": ["the red car"]})
    assert scores["squad_count"] == 3 and scores["nli_count"] == 2
    assert scores["exact_match"] == pytest.approx(official["exact_match"], abs=0.01)
    assert scores["f1"] == pytest.approx(official["f1"], abs=0.01)
    assert scores["nli_accuracy"] == 50.0


def test_score_without_pairs_has_no_accuracy_and_checks_lengths():
    assert score([question(("x",))], ["x"])["nli_accuracy"] is None
    with pytest.raises(ValueError, match="replies"):
        score([question(("x",)), pair("neutral")], ["x"])


@pytest.mark.parametrize("token, label", [
    (" ent", "entailment"), ("neutral", "neutral"), (" contradiction", "contradiction"), (" n", "neutral"),
    ("Ent", "Ent"), (" maybe", "maybe"), ("", ""), (" ", "")])  # a token that begins no label stays itself: wrong
def test_label_of_a_generated_token(token, label):
    assert label_of(token) == label


# the report

def record(system, mode, clients, rate, latencies, answers, peak=None, timings=None, round_=1):
    return {"round": round_, "system": system, "mode": mode, "clients": clients, "requests_per_s": rate,
            "latencies_ms": latencies, "answers": answers, "scores": {"exact_match": 50.0, "f1": 60.0,
                                                                     "nli_accuracy": None},
            "peak_rss_bytes": peak, "rss_before_bytes": None if peak is None else peak // 2, "timings": timings}


def test_summary_pools_latencies_keeps_round_rates_and_flags_differing_answers():
    timing = {"prompt_n": 150, "prompt_ms": 100.0, "predicted_n": 4, "predicted_ms": 40.0}
    records = [record("a", "squad", 8, 2.0, [100.0, 300.0], ["x", "y"], 10**9, [timing, timing]),
               record("b", "squad", 8, 1.0, [200.0, 400.0], ["x", "y"], round_=1),
               record("b", "squad", 8, 3.0, [600.0, 800.0], ["x", "z"], round_=2),
               record("a", "squad", 8, 4.0, [500.0, 700.0], ["x", "y"], 2 * 10**9, [timing, {**timing, "prompt_n": 50}],
                      round_=2)]
    summary = summarize(records)
    a, b = summary["a"][load_name("squad", 8)], summary["b"]["squad, 8 clients"]
    assert a["requests_per_s"] == [2.0, 4.0] and b["requests_per_s"] == [1.0, 3.0]
    assert a["p50_ms"] == 300.0 and a["p95_ms"] == 700.0  # by the nearest rank, over both rounds' 4 latencies
    assert a["same_answers"] and not b["same_answers"]
    assert a["peak_rss_bytes"] == 2 * 10**9 and b["peak_rss_bytes"] is None
    assert a["timings"]["prompt_n"] == 125.0 and "timings" not in b
    tables = markdown(summary, ["a", "b"], "a")
    assert "| squad, 8 clients | 2.00, 4.00 | 1.00, 3.00 | 0.67x |" in tables
    assert "| peak RSS | 2.00 GB | n/a | n/a |" in tables
    assert "answers differ by round" in tables and "| a | squad, 8 clients | 125.0 |" in tables


def test_markdown_has_no_timings_table_when_no_server_gave_timings():
    summary = summarize([record("a", "squad", 1, 1.0, [1.0], ["x"]), record("b", "squad", 1, 2.0, [2.0], ["x"])])
    tables = markdown(summary, ["a", "b"], "b")
    assert "prompt_n" not in tables and "| squad, 1 client | 1.00 | 2.00 | 0.50x |" in tables


# options

def test_system_pid_and_load_specs():
    assert system_spec("f32=llamacpp@http://127.0.0.1:8080/") == ("f32", "llamacpp", "http://127.0.0.1:8080")
    assert pid_spec("f32=123") == ("f32", 123)
    assert load_spec("mixed:8") == ("mixed", 8)


@pytest.mark.parametrize("parse, text", [(system_spec, "f32=vllm@http://x"), (system_spec, "f32=llamacpp@x:80"),
                                         (system_spec, "llamacpp@http://x"), (system_spec, "=openai@http://x"),
                                         (pid_spec, "a=0"), (pid_spec, "a=-3"), (pid_spec, "a=x"), (pid_spec, "a"),
                                         (load_spec, "squad"), (load_spec, "nli:8"), (load_spec, "squad:0")])
def test_bad_specs_are_usage_errors(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


@pytest.mark.parametrize("systems, pids, baseline, wrong", [
    (["a"], [], None, "two systems"), (["a", "a"], [], None, "distinct"), (["a", "b"], [("c", 1)], None, "'c'"),
    (["a", "b"], [], "c", "'c'")])
def test_check_names(systems, pids, baseline, wrong):
    args = argparse.Namespace(system=[(s, "loraswap", "http://x") for s in systems], pid=pids, baseline=baseline,
                              loads=LOADS)
    with pytest.raises(ValueError, match=wrong):
        check_names(args)


def test_a_load_given_twice_is_refused():
    args = argparse.Namespace(system=[("a", "loraswap", "http://x"), ("b", "loraswap", "http://y")], pid=[],
                              baseline=None, loads=[*LOADS, ("squad", 8)])
    with pytest.raises(ValueError, match="squad:8"):
        check_names(args)


def test_check_names_gives_the_baseline():
    args = argparse.Namespace(system=[("a", "llamacpp", "http://x"), ("b", "loraswap", "http://y")], pid=[("b", 7)],
                              baseline=None, loads=LOADS)
    assert check_names(args) == "a"
    assert check_names(argparse.Namespace(**{**vars(args), "baseline": "b"})) == "b"


# the bodies the clients send

def serving(reply: dict, sent: list) -> httpx.Client:
    """A client whose server records each request's path and body and answers ``reply``."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append((request.url.path, body))
        return httpx.Response(200, json=reply)
    return httpx.Client(base_url="http://server", transport=httpx.MockTransport(handle))


LORAS = [{"id": 0, "path": "/g/nli-f32.gguf", "scale": 0.0}, {"id": 1, "path": "/g/squad-f32.gguf", "scale": 0.0}]


@pytest.mark.parametrize("item, adapter", [(question(("x",)), "squad"), (pair("neutral"), "nli")])
def test_llamacpp_sends_the_prompt_greedy_uncached_with_only_the_tasks_adapter(item, adapter):
    client, sent = LlamaCpp("http://server"), []
    with serving(LORAS, sent) as http:
        client.prepare(http)
    assert client.lora_ids == {"squad": 1, "nli": 0}
    timings = {"prompt_n": 9}
    with serving({"content": " neutral\n", "timings": timings}, sent) as http:
        reply = client.ask(http, item)
    path, body = sent[-1]
    assert path == "/completion" and body["prompt"] == item.prompt and body["cache_prompt"] is False
    assert body["temperature"] == 0 and body["top_k"] == 1
    scales = {entry["id"]: entry["scale"] for entry in body["lora"]}
    assert scales == {client.lora_ids[name]: float(name == adapter) for name in ("squad", "nli")}
    assert body["n_predict"] == (1 if adapter == "nli" else NEW_TOKENS)
    assert body["stop"] == ([] if adapter == "nli" else ["\n"])
    assert reply.text == "neutral" and reply.timings == timings  # the label it begins, or the answer stripped


def test_llamacpp_asks_for_cached_prompts_only_when_told():
    client, sent = endpoint("llamacpp", "http://server", cache_prompt=True), []
    client.lora_ids = {"squad": 0, "nli": 1}
    with serving({"content": "x"}, sent) as http:
        client.ask(http, question(("x",)))
    assert sent[-1][1]["cache_prompt"] is True


@pytest.mark.parametrize("paths", [[], ["/g/squad.gguf", "/h/squad-q4.gguf"], ["/g/nli.gguf"]])
def test_lora_id_needs_exactly_one_file_per_adapter(paths):
    with pytest.raises(ValueError, match="squad"):
        lora_id([{"id": i, "path": p} for i, p in enumerate(paths)], "squad")


@pytest.mark.parametrize("item", [question(("x",)), pair("neutral")])
def test_openai_names_the_adapter_as_model(item):
    sent = []
    with serving({"choices": [{"text": " ent"}]}, sent) as http:
        reply = OpenAI("http://server").ask(http, item)
    path, body = sent[-1]
    assert path == "/v1/completions" and body["model"] == ADAPTERS[item.task] and body["prompt"] == item.prompt
    assert body["temperature"] == 0
    if item.task == "nli":
        assert body["max_tokens"] == 1 and "stop" not in body and reply.text == "entailment"
    else:
        assert body["max_tokens"] == NEW_TOKENS and body["stop"] == ["\n"] and reply.text == "ent"


@pytest.mark.parametrize("kind,extractive", [("loraswap", True), ("loraswap-free", False)])
def test_loraswap_uses_its_task_routes(kind, extractive):
    sent = []
    with serving({"answer": "Paris", "label": "neutral"}, sent) as http:
        answer = endpoint(kind, "http://server").ask(http, question(("Paris",)))
        label = endpoint(kind, "http://server").ask(http, pair("neutral"))
    assert (answer.text, label.text) == ("Paris", "neutral")
    assert sent[0] == ("/answer", {"context": "c", "question": "q", "adapter": "squad", "extractive": extractive,
                                   "decoding": {"strategy": "greedy", "max_new_tokens": NEW_TOKENS}})
    assert sent[1] == ("/nli", {"premise": "p", "hypothesis": "h", "adapter": "nli"})


def test_a_failed_request_raises():
    def refuse(request):
        return httpx.Response(422, json={"detail": "no"})
    with httpx.Client(base_url="http://s", transport=httpx.MockTransport(refuse)) as http, \
            pytest.raises(httpx.HTTPStatusError):
        Loraswap("http://s").ask(http, question(("x",)))


def test_endpoint_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        endpoint("vllm", "http://x")


# where the server's time goes (loadtest.stack_shares, loadtest.profile_answer): stacks as py-spy writes them

ENGINE_ROOT = ("Thread._bootstrap (threading.py:1002)", "Engine._supervised (service/engine/scheduler.py:168)",
               "Engine._loop (service/engine/scheduler.py:190)")
SERVE = (*ENGINE_ROOT, "Engine._serve (service/engine/scheduler.py:276)")
PREFILL = (*SERVE, "Engine._between_steps (service/engine/scheduler.py:328)",
           "Prefill.advance (service/engine/prefill.py:45)",
           "Module._wrapped_call_impl (torch/nn/modules/module.py:1778)",
           "LlamaForCausalLM.forward (transformers/models/llama/modeling_llama.py:460)")
DECODE = (*SERVE, "RunningBatch.forward (service/engine/running_batch.py:105)",
          "DecodeStep.__call__ (service/engine/decode_step.py:41)",
          "DecodeStep._forward (service/engine/decode_step.py:62)",
          "LlamaForCausalLM.forward (transformers/models/llama/modeling_llama.py:460)")
CALL = ("Module._wrapped_call_impl (torch/nn/modules/module.py:1778)",
        "Module._call_impl (torch/nn/modules/module.py:1789)")
LAYER = ("LlamaModel.forward (transformers/models/llama/modeling_llama.py:400)", *CALL,
         "LlamaDecoderLayer.forward (transformers/models/llama/modeling_llama.py:297)", *CALL)
LINEAR = "Linear.forward (torch/nn/modules/linear.py:134)"
ONEDNN = "OneDnnLinear.forward (service/model/onednn_linear.py:42)"  # the base's linears on the CPU
LORA = "BatchedLoraLayer.forward (service/lora/layers.py:184)"
LOOP = ("<module> (loraswap:8)", "main (service/cli/main.py:98)", "Server.run (uvicorn/server.py:86)",
        "BaseEventLoop.run_forever (asyncio/base_events.py:607)",
        "BaseEventLoop._run_once (asyncio/base_events.py:1922)")


@pytest.mark.parametrize("frames, category", [
    ((*PREFILL, *LAYER, "LlamaMLP.forward (transformers/models/llama/modeling_llama.py:165)", *CALL, LORA, *CALL,
      LINEAR),
     "prefill: base matmuls"),
    ((*DECODE, *LAYER, "LlamaAttention.forward (transformers/models/llama/modeling_llama.py:245)", *CALL, LORA,
      "BatchedLoraLayer._grouped (service/lora/layers.py:205)"), "decoding step: LoRA"),
    ((*DECODE, *CALL, LINEAR), "decoding step: LM head matmul"),
    ((*PREFILL, *LAYER, "LlamaMLP.forward (transformers/models/llama/modeling_llama.py:165)", *CALL, LORA, *CALL,
      ONEDNN), "prefill: base matmuls"),
    ((*DECODE, *LAYER, "LlamaAttention.forward (transformers/models/llama/modeling_llama.py:245)", *CALL, LORA, *CALL,
      ONEDNN), "decoding step: base matmuls"),
    ((*DECODE, *CALL, ONEDNN), "decoding step: LM head matmul"),
    ((*PREFILL, *LAYER, "LlamaAttention.forward (transformers/models/llama/modeling_llama.py:258)",
      "packed_gqa_attention (service/engine/attention.py:28)"), "prefill: attention"),
    ((*PREFILL, *LAYER, "LlamaAttention.forward (transformers/models/llama/modeling_llama.py:252)",
      "DynamicLayer.update (transformers/cache_utils.py:120)"), "prefill: KV cache"),
    ((*DECODE, *LAYER, "LlamaRMSNorm.forward (transformers/models/llama/modeling_llama.py:65)"),
     "decoding step: other ops: norms, activations, residuals, rotary"),
    ((*SERVE, "RunningBatch.sample (service/engine/running_batch.py:60)",
      "Sampler.choose (service/engine/sampling.py:150)"),
     "sampling"),
    ((*SERVE, "Engine._finish (service/engine/scheduler.py:395)", "Endings.result (service/engine/endings.py:40)"),
     "finishing (detokenize, publish)"),
    ((*ENGINE_ROOT, "Engine._next_batch (service/engine/scheduler.py:216)", "Condition.wait (threading.py:331)"),
     "waiting for work (incl. the batch window)"),
    ((*SERVE, "Engine._withdrawn_rows (service/engine/scheduler.py:285)"), "scheduling"),
])
def test_engine_stacks_fall_in_their_category(frames, category):
    assert shares(Counter({frames: 3})) == {ENGINE: {category: 3}}


@pytest.mark.parametrize("frames, category", [
    ((*LOOP, "EpollSelector.select (selectors.py:468)"), "idle"),
    ((*LOOP, "Tasks.answer (service/tasks/tasks.py:147)", "encode_text (service/tasks/prompts.py:33)",
      "TokenizersBackend.__call__ (transformers/tokenization_utils_base.py:2500)"), "tokenization"),
    ((*LOOP, "Tasks.answer (service/tasks/tasks.py:168)",
      "SpanConstraint.__init__ (service/tasks/span_constraint.py:99)"), "answer span"),
    ((*LOOP, "RequestResponseCycle.run_asgi (uvicorn/protocols/http/h11_impl.py:410)"), "HTTP, validation, asyncio"),
])
def test_event_loop_stacks_fall_in_their_category(frames, category):
    assert shares(Counter({frames: 2})) == {EVENT_LOOP: {category: 2}}


def test_raw_stacks_are_parsed_counted_and_split_by_thread():
    idle = (*LOOP, "EpollSelector.select (selectors.py:468)")
    tqdm = ("Thread._bootstrap (threading.py:1002)", "TMonitor.run (tqdm/_monitor.py:69)")
    lines = [";".join(idle) + " 5", "", ";".join(idle) + " 2", ";".join(tqdm) + " 4",
             ";".join((*DECODE, *CALL, LINEAR)) + " 1"]
    stacks = parse_raw(lines)
    assert stacks[idle] == 7 and sum(stacks.values()) == 12
    assert shares(stacks) == {EVENT_LOOP: {"idle": 7}, OTHER: {"other": 4},
                              ENGINE: {"decoding step: LM head matmul": 1}}
    with pytest.raises(ValueError, match="raw"):
        parse_raw(["frame (a.py:1) x"])


def test_breakdown_in_ms_per_request_adds_up_to_the_wall_time():
    loads = [{"clients": 1, "seconds": 10.0, "requests": 20, "generated_tokens": 80.0,
              "samples": {ENGINE: {"prefill: base matmuls": 6, "waiting for work (incl. the batch window)": 4}}},
             {"clients": 8, "seconds": 4.0, "requests": 20, "generated_tokens": 80.0,
              "samples": {ENGINE: {"prefill: base matmuls": 9, "sampling": 1}}}]
    ms = per_request_ms(loads[0], ENGINE)
    assert ms == {"prefill: base matmuls": pytest.approx(300.0), "waiting for work (incl. the batch window)":
                  pytest.approx(200.0)}  # 10 s over 20 requests: 500 ms each, split 6:4
    table = "\n".join(breakdown_table(loads, ENGINE))
    assert "| prefill: base matmuls | 60.0%, 300 | 90.0%, 180 |" in table
    assert "| sampling | 0.0%, 0 | 10.0%, 20 |" in table
    assert "| requests/s; tokens/request | 2.00; 4.0 | 5.00; 4.0 |" in table


def test_stages_sum_their_categories():
    ms = {"prefill: base matmuls": 100.0, "prefill: LoRA": 10.0, "decoding step: attention": 5.0,
          "KV cache: copy of joined prompts": 2.0, "sampling": 1.0}
    assert by_stage(ms) == {"prefill": 110.0, "decoding step": 5.0, "KV cache": 2.0, "sampling": 1.0}
    load = {"clients": 1, "seconds": 1.18, "requests": 10, "generated_tokens": 40.0,
            "samples": {ENGINE: {category: int(value) for category, value in ms.items()}}}
    table = "\n".join(breakdown_table([load], ENGINE, stages=True))
    assert "| prefill | 93.2%, 110 |" in table and "| decoding step | 4.2%, 5 |" in table


def test_names_refused_are_a_usage_error_before_any_request(capsys):
    args = argparse.Namespace(system=[("a", "loraswap", "http://127.0.0.1:9")], pid=[], baseline=None, loads=LOADS)
    with pytest.raises(SystemExit) as exit_:
        run_side_by_side(args)  # one system: refused before compare() sends anything (nothing listens on port 9)
    assert exit_.value.code == 2 and "two systems" in capsys.readouterr().err


@pytest.mark.parametrize("more, message", [
    (["--data", "a" * 300], "argument --data: " + "a" * 300 + ": File name too long"),
    (["--out", "a" * 300], "argument --out: " + "a" * 300 + ": File name too long"),
    (["--data", "/nonexistent"], "--data /nonexistent: No such file or directory: /nonexistent/squad/dev-v1.1.json.gz"),
    (["--url", "http://127.0.0.1:99999"], "argument --url: 'http://127.0.0.1:99999' is not a server's URL"),
])
def test_the_profiles_errors_are_one_line_naming_the_option(more, message, tmp_path, monkeypatch, capsys):
    """A review: ``python -m loadtest.profile_answer`` took plain Path options, so a name the file system refuses, or
    no data there, was OSError's traceback naming no option."""
    from loadtest import profile_answer

    argv = ["profile_answer", "--pid", "1", "--py-spy", sys.executable, "--out", str(tmp_path / "out"), *more]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        profile_answer.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"python -m loadtest.profile_answer: error: {message}"), err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("kind,sent", [("loraswap", "Bearer sk-test"), ("loraswap-free", "Bearer sk-test"),
                                       ("llamacpp", None), ("openai", None)])
def test_a_loraswap_system_is_sent_the_api_key_of_its_variable(kind, sent, monkeypatch):
    """A review: side-by-side could not measure a loraswap server with an API key (every request a 401): a loraswap
    system's requests carry $LORASWAP_API_KEY, as loadtest's do; the other systems' never get it."""
    seen = []

    class Recording(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(204)
            self.end_headers()

    monkeypatch.setenv("LORASWAP_API_KEY", "sk-test")
    server = http.server.HTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with session(endpoint(kind, f"http://127.0.0.1:{server.server_port}")) as client:
            assert client.get("/health").status_code == 204
    finally:
        server.shutdown()
    assert seen == [sent]
