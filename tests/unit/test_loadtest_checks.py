"""The checks of ``loraswap loadtest`` without a server: the requests, the answer key's grades and verdicts, the
absences that excuse a 404, the figures, the server's metric deltas, the derived adapters. (Its locust users are
not imported here: locust patches the standard library with gevent; tests/loadtest runs them in a process.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from loadtest.checked.adapters import derive
from loadtest.checked.answer_key import (
    FAILED,
    GONE,
    OK,
    REJECTED,
    SERVER_ERROR,
    WRONG,
    WRONG_ADAPTER,
    AnswerKey,
    verdict,
)
from loadtest.checked.asks import ENDPOINTS, Ask, asks
from loadtest.checked.report import Record, model_line, percentile, summary
from loadtest.checked.scenarios import SCENARIOS
from loadtest.checked.server_view import Samples, bucket_bound, increase, model_info
from loadtest.checked.traffic import Absences
from loadtest.percentiles import percentiles
from service.cli.main import build_parser
from tests.data.make_corpus import NLI_SAMPLE, SQUAD_SAMPLE

ANSWER = Ask("/answer", {"context": "c", "question": "q"})
NLI = Ask("/nli", {"premise": "p", "hypothesis": "h"})


def nli_answer(adapter: str, entailment: float) -> dict:
    rest = (1 - entailment) / 2
    return {"adapter": adapter, "label": "entailment" if entailment > rest else "neutral",
            "probabilities": {"entailment": entailment, "neutral": rest, "contradiction": rest}}


@pytest.fixture
def key() -> AnswerKey:
    """Adapters a and b; request 0 an /answer (a and b answer alike), request 1 an /nli (they differ)."""
    expected = {("a", 0): {"adapter": "a", "answer": "Denver", "start": 0, "end": 6},
                ("b", 0): {"adapter": "b", "answer": "Denver", "start": 0, "end": 6},
                ("a", 1): nli_answer("a", 0.5), ("b", 1): nli_answer("b", 0.8)}
    return AnswerKey(["a", "b"], [ANSWER, NLI], expected, tolerance=1e-3)


def test_the_requests_take_turns_over_the_endpoints():
    made = asks(SQUAD_SAMPLE, (NLI_SAMPLE, None), 5, new_tokens=4)
    assert [ask.endpoint for ask in made] == [*ENDPOINTS, *ENDPOINTS[:2]]
    assert made[0].fields["decoding"] == {"strategy": "greedy", "max_new_tokens": 4} and made[0].fields["extractive"]
    assert made[2].fields["max_tokens"] == 4 and made[2].fields["temperature"] == 0
    assert made[0].fields["question"] != made[3].fields["question"]  # no question asked twice
    assert made[2].body("x")["model"] == "x" and made[1].body("x")["adapter"] == "x"


def test_grades(key):
    assert key.grade("a", 1, nli_answer("a", 0.5 + 5e-4)) == OK  # within the tolerance
    assert key.grade("a", 1, nli_answer("a", 0.8)) == WRONG_ADAPTER  # b's answer...
    assert key.grade("a", 1, nli_answer("b", 0.8)) == WRONG_ADAPTER  # ...whichever adapter the reply names
    assert key.grade("a", 1, nli_answer("a", 0.6)) == WRONG
    assert key.grade("a", 1, nli_answer("b", 0.5)) == WRONG  # a's answer, but the reply says b served it
    assert key.grade("a", 0, {"adapter": "a", "answer": "Denver", "start": 0, "end": 6}) == OK
    assert key.grade("a", 0, {"adapter": "a", "answer": "Denver", "start": 1, "end": 7}) == WRONG
    assert key.distinct_fraction() == 0.5  # a and b answer request 0 alike: a swap there goes unseen


@pytest.mark.parametrize(("status", "retry_after", "absent", "outcome"), [
    (429, True, False, REJECTED), (429, False, False, FAILED), (404, False, True, GONE), (404, False, False, FAILED),
    (500, False, False, SERVER_ERROR), (503, True, False, SERVER_ERROR), (0, False, False, FAILED),
    (422, False, False, FAILED), (201, False, False, FAILED)])
def test_verdicts_on_other_statuses(key, status, retry_after, absent, outcome):
    assert verdict(key, "a", 1, status, retry_after, None, absent) == outcome


def test_a_200_of_another_shape_fails(key):
    assert verdict(key, "a", 1, 200, False, None, False) == FAILED
    assert verdict(key, "a", 1, 200, False, {"label": "entailment"}, False) == FAILED
    assert verdict(key, "a", 1, 200, False, nli_answer("a", 0.5), False) == OK


def test_absences():
    absences = Absences()
    absences.start("a", 10.0)
    absences.end("a", 11.0)
    absences.start("a", 20.0)  # away still
    assert absences.overlaps("a", 9.0, 10.0) and absences.overlaps("a", 10.5, 10.6) and absences.overlaps("a", 11, 12)
    assert not absences.overlaps("a", 11.1, 19.9) and not absences.overlaps("b", 0, 100)
    assert absences.overlaps("a", 30.0, 31.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=40))
def test_bench_s_p50_is_never_above_its_p95(millis):
    """``loraswap bench`` took the median (the mean of the two middle values) and the lower nearest value for p95:
    of two times, a p95 below the p50 (a review's 33.75 against 23.6 ms)."""
    figures = percentiles("", millis)
    assert round(min(millis), 2) <= figures["p50_ms"] <= figures["p95_ms"] <= round(max(millis), 2)
    assert figures["p50_ms"] in [round(value, 2) for value in millis]


def test_percentiles_and_figures():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    records = [Record("/nli", "a", 1, 200, OK, 10.0), Record("/nli", "a", 1, 200, WRONG_ADAPTER, 20.0),
               Record("/nli", "b", 1, 429, REJECTED, 1.0), Record("/nli", "b", 1, 404, GONE, 2.0),
               Record("/nli", "b", 1, 500, SERVER_ERROR, 3.0), Record("/nli", "b", 1, 0, FAILED, 60000.0)]
    figures = summary(records, seconds=2.0)
    assert figures["requests"] == 6 and figures["ok"] == 1 and figures["rps"] == 3.0 and figures["answered_rps"] == 0.5
    assert figures["failures"] == 3 and figures["wrong"] == figures["wrong_adapter"] == 1
    assert figures["server_errors"] == figures["rejected_429"] == figures["gone_404"] == figures["no_reply"] == 1
    assert figures["p50_ms"] == 10.0 and figures["p99_ms"] == 20.0 and figures["rejected_429_max_ms"] == 1.0


def samples(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metric_increases_series_by_series():
    before = samples('t_total{adapter="a"} 5\nt_total{adapter="b"} 7\nt_total{adapter="c"} 9\n')
    # a rose by 2; b was unregistered and registered again (from 0 to 3); c went; d is new
    after = samples('t_total{adapter="a"} 7\nt_total{adapter="b"} 3\nt_total{adapter="d"} 1\n')
    assert increase(before, after, "t_total") == 2 + 3 + 1
    assert increase(before, after, "t_total", adapter="a") == 2


def test_the_model_line_says_when_answers_are_not_exact_for_the_check():
    """float32: the model alone; any other dtype (the GPU's default bf16): that the check counts its rounding as
    wrong, and how to make it exact; a server without the info metric: no line."""
    info = 'loraswap_model_info{base="smollm2",device="%s",dtype="%s",quantize="%s"} 1.0\n'
    exact = model_info(samples(info % ("cpu", "float32", "none")))
    assert exact == {"base": "smollm2", "device": "cpu", "dtype": "float32", "quantize": "none"}
    assert model_line(exact) == "Model: smollm2 on cpu, computing in float32."
    rounding = model_line(model_info(samples(info % ("cuda", "bfloat16", "nf4"))))
    assert rounding.startswith("Model: smollm2 on cuda, computing in bfloat16, weights in nf4. In bfloat16 an answer")
    assert "--dtype float32" in rounding
    assert model_info(samples('t_total{adapter="a"} 5\n')) is None and model_line(None) is None


def test_histogram_quantile_bounds():
    def histogram(counts: tuple[int, int, int]) -> Samples:
        return samples("".join(f'w_bucket{{le="{le}"}} {n}\n' for le, n in zip(("0.1", "1.0", "+Inf"), counts)))

    before, after = histogram((1, 1, 1)), histogram((6, 10, 11))  # between: 5 under 0.1 s, 4 under 1 s, 1 above
    assert bucket_bound(before, after, "w", 0.5) == 0.1 and bucket_bound(before, after, "w", 0.95) == float("inf")
    assert bucket_bound(before, before, "w", 0.5) is None


def test_derived_adapters_are_small_and_differ(llama_adapters, tmp_path):
    source = llama_adapters["one"]
    first, second = (derive(source, tmp_path / name, seed, 2, ("q_proj", "v_proj", "c_attn"), 4.0)
                     for seed, name in enumerate(("first", "second")))
    config = json.loads((first / "adapter_config.json").read_text())
    original = json.loads((source / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["lora_alpha"] / config["r"] == original["lora_alpha"] / original["r"]
    weights, others, theirs = (load_file(folder / "adapter_model.safetensors") for folder in (first, second, source))
    assert weights.keys() == others.keys() and {key.split(".")[-3] for key in weights} == {"q_proj", "v_proj"}
    for name, tensor in weights.items():
        if ".lora_A." in name:
            assert torch.equal(tensor, theirs[name][:2]) and torch.equal(tensor, others[name])
        else:
            assert tensor.shape == (theirs[name].shape[0], 2) and not torch.equal(tensor, others[name])


def test_the_command_needs_the_admin_key(monkeypatch, tmp_path):
    monkeypatch.delenv("LORASWAP_ADMIN_KEY", raising=False)
    args = build_parser().parse_args(["loadtest", "--scenario", "single", "--users", "1", "--duration", "1", "--host",
                                      "http://127.0.0.1:9", "--adapter-root", str(tmp_path), "--json",
                                      str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as stopped:
        args.run(args)
    assert stopped.value.code == 2 and "locust" not in sys.modules


def test_scenario_weights():
    zipf = SCENARIOS["zipf"].weights(4)
    assert zipf == pytest.approx([w / sum((1, 1 / 2, 1 / 3, 1 / 4)) for w in (1, 1 / 2, 1 / 3, 1 / 4)])
    assert SCENARIOS["uniform"].weights(4) == [0.25] * 4
    assert SCENARIOS["zipf"].adapters == 100 and SCENARIOS["churn"].churn and SCENARIOS["overload"].wait_s == (0, 0)


STOPPED_WHILE_COMPUTING = """
import os, signal, threading
import gevent
from loadtest.checked.options import stop_on_signals
stop_on_signals()
lock, steps = threading.Lock(), []
try:
    with lock:
        os.kill(os.getpid(), signal.{signal})
        sum(range(10**6))  # computing, holding the lock: no wait here
        steps.append("left the lock")
    gevent.sleep(30)
    steps.append("slept")
except KeyboardInterrupt:
    steps.append("interrupted")
print(",".join(steps))
"""


STOPPED_TWICE = """
import os, signal
import gevent
from loadtest.checked.options import stop_on_signals
stop_on_signals()
steps = []
try:
    os.kill(os.getpid(), signal.SIGTERM)
    gevent.sleep(30)
except KeyboardInterrupt:
    steps.append("interrupted")
    os.kill(os.getpid(), signal.{signal})
    gevent.sleep(0.5)  # the clean-up waits (unregistering the run's adapters)
    steps.append("cleaned up")
print(",".join(steps))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_second_stop_does_not_cut_the_clean_up_short(name):
    """A review: a second signal (``timeout`` signals the process group too) threw another KeyboardInterrupt into the
    clean-up of the first, a traceback; once the first is thrown, both are ignored."""
    script = STOPPED_TWICE.replace("{signal}", name)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted,cleaned up", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_lands_where_the_run_next_waits_not_where_it_computes(name):
    """A stop raised by a plain signal handler landed at whatever the run was doing, once inside code that held a lock
    its clean-up then waited for forever (gevent's LoopExit, exit 1 instead of 130). It lands at the next wait now."""
    script = STOPPED_WHILE_COMPUTING.replace("{signal}", name)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "left the lock,interrupted", done.stdout + done.stderr[-2000:]
