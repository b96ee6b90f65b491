"""/answer's and /nli's ``prompt_style`` through the real server on the tiny bases, held to stock transformers (+ peft)
on the documented prompt of each style: the adapters' template, or the chat template's rendering of the style's
messages (``service.tasks.prompt_styles``); an adapter's card temperature only in the adapter style; long contexts
windowed for the style's prompt; the refusals (an unknown style, one_shot for labels without an example, a model
without a chat template)."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from service.lora.card import CALIBRATION_FIELD, CARD_FILE
from service.tasks.labels import MOST_LABEL_TOKENS
from service.tasks.prompt_styles import PROMPT_STYLES, answer_messages, nli_messages
from service.tasks.prompts import NLI_LABELS, RTE_LABELS, answer_prompt, encode_text, label_target, nli_prompt
from service.tasks.template_sandbox import Renderer
from tests.http.api_helpers import Tiny, assert_close
from tests.http.replies import error_message
from tests.http.test_api import Reference
from tests.server_helpers import ADMIN, SERVER_CAP, ready_client, tiny_settings
from tests.unit.test_template_sandbox import HUGE_TOKENS

CONTEXT = "The Normans gave their name to Normandy, a region in France."  # short: one_shot's prompt holds it
QUESTION = "Who gave their name to Normandy?"
PREMISE, HYPOTHESIS = "A dog runs in the park.", "An animal is outside."
TEMPERATURE = 2.5


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Reference:
    return Reference(tiny)


def documented(tokenizer, style: str, messages: list[dict[str, str]], plain: str) -> str:
    """The documented prompt text of ``style``: ``plain`` (the adapters' template) for adapter, else ``messages``
    rendered by the chat template with the last, the reply begun, left open."""
    if style == "adapter":
        return plain
    return tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)


def answer_text(tokenizer, style: str, context: str = CONTEXT) -> str:
    return documented(tokenizer, style, answer_messages(style, context, QUESTION), answer_prompt(context, QUESTION))


def nli_text(tokenizer, style: str, labels: tuple[str, ...] = NLI_LABELS) -> str:
    messages = nli_messages(style, PREMISE, HYPOTHESIS, labels)
    return documented(tokenizer, style, messages, nli_prompt(PREMISE, HYPOTHESIS))


def post(client, route: str, body: dict, status: int = 200) -> dict:
    reply = client.post(route, json=body)
    assert reply.status_code == status, reply.text
    return reply.json() if status == 200 else {"message": error_message(reply)}


def answer(client, adapter: str | None, style: str, context: str = CONTEXT, status: int = 200, **fields) -> dict:
    body = {"context": context, "question": QUESTION, "adapter": adapter, "prompt_style": style, **fields}
    return post(client, "/answer", body, status)


def nli(client, adapter: str | None, style: str, labels: list[str] | None = None, status: int = 200) -> dict:
    body = {"premise": PREMISE, "hypothesis": HYPOTHESIS, "adapter": adapter, "prompt_style": style}
    return post(client, "/nli", body if labels is None else {**body, "labels": labels}, status)


@torch.no_grad()
def label_probabilities(reference: Reference, adapter: str | None, prompt: str, labels: tuple[str, ...],
                        whole: bool, temperature: float = 1.0) -> dict[str, float]:
    """softmax over ``labels`` of log P(label completion | prompt) (``whole``) or of its first token's logit over
    ``temperature``, from the reference model; ``prompt``'s special tokens parsed."""
    ids = reference.tokenizer.encode(prompt, add_special_tokens=False)
    model, scores = reference.models[adapter], []
    for label in labels:
        completion = encode_text(reference.tokenizer, label_target(label))[:None if whole else 1]
        logprobs = model(torch.tensor([ids + completion])).logits[0].double().log_softmax(-1)
        scores.append(sum(logprobs[len(ids) - 1 + i, token].item() for i, token in enumerate(completion)))
    return dict(zip(labels, (torch.tensor(scores) / temperature).softmax(-1).tolist()))


@pytest.mark.parametrize("adapter", [None, "one"])
def test_each_style_answers_from_its_documented_prompt(client, reference, adapter):
    prompts = {style: answer_text(reference.tokenizer, style) for style in PROMPT_STYLES}
    assert len(set(prompts.values())) == len(PROMPT_STYLES)
    for style, prompt in prompts.items():
        got = answer(client, adapter, style, extractive=False)
        want = reference.generate(adapter, prompt, SERVER_CAP).split("\n", 1)[0].strip()
        assert (got["answer"], got["adapter"]) == (want, adapter), style
    extractive = answer(client, adapter, "one_shot")
    assert extractive["answer"] and CONTEXT[extractive["start"]:extractive["end"]] == extractive["answer"]


def test_the_default_style_is_the_adapters_template(client):
    body = {"context": CONTEXT, "question": QUESTION, "adapter": "one", "extractive": False}
    assert post(client, "/answer", body)["answer"] == answer(client, "one", "adapter", extractive=False)["answer"]
    body = {"premise": PREMISE, "hypothesis": HYPOTHESIS, "adapter": "one"}
    # to 1e-5: the second request runs past the first's cached prefix, which rounds differently (README, prefix caching)
    assert post(client, "/nli", body)["probabilities"] == pytest.approx(nli(client, "one", "adapter")["probabilities"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("adapter", [None, "two"])
def test_each_style_scores_the_labels_after_its_documented_prompt(client, reference, adapter):
    served = {}
    for style in PROMPT_STYLES:
        served[style] = nli(client, adapter, style)["probabilities"]
        want = label_probabilities(reference, adapter, nli_text(reference.tokenizer, style), NLI_LABELS, whole=False)
        assert_close(served[style], want)
    for one, other in (("adapter", "zero_shot"), ("zero_shot", "one_shot")):
        assert max(abs(served[one][label] - served[other][label]) for label in NLI_LABELS) > 1e-3, (one, other)


def test_own_labels_are_scored_whole_after_the_styled_prompt(client, reference):
    """RTE's labels (one_shot takes RTE's example for them) and labels of the request's own (zero_shot)."""
    for style, labels in (("one_shot", RTE_LABELS), ("zero_shot", ("not sure", "not likely", "yes"))):
        got = nli(client, "one", style, list(labels))["probabilities"]
        want = label_probabilities(reference, "one", nli_text(reference.tokenizer, style, labels), labels, whole=True)
        assert list(got) == list(labels)
        assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-3, abs=1e-30), (got, want)


def test_the_cards_temperature_applies_in_the_adapter_style_only(client, reference, tiny):
    folder = tiny.extra / "calibrated_styles"
    shutil.copytree(tiny.adapters["two"], folder)
    card = {"name": "calibrated", CALIBRATION_FIELD: {"temperature": TEMPERATURE, "labels": list(NLI_LABELS)}}
    (folder / CARD_FILE).write_text(json.dumps(card))
    loaded = client.post("/adapters", json={"name": "calibrated_styles", "path": str(folder)}, headers=ADMIN)
    assert loaded.status_code == 201, loaded.text
    for style, temperature in (("adapter", TEMPERATURE), ("zero_shot", 1.0), ("one_shot", 1.0)):
        want = label_probabilities(reference, "two", nli_text(reference.tokenizer, style), NLI_LABELS, whole=False,
                                   temperature=temperature)
        assert_close(nli(client, "calibrated_styles", style)["probabilities"], want)


OWN_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def with_template(client, tiny, name: str, template: str) -> str:
    """Adapter one again, as ``name``, its folder shipping ``template`` as its chat template."""
    folder = shutil.copytree(tiny.adapters["one"], tiny.extra / name)
    (folder / "chat_template.jinja").write_text(template)
    loaded = client.post("/adapters", json={"name": name, "path": str(folder)}, headers=ADMIN)
    assert loaded.status_code == 201, loaded.text
    return name


def test_the_chat_styles_render_an_adapter_s_own_chat_template_as_its_chat_completions_do(client, reference, tiny):
    """They took the base tokenizer's, where /v1/chat/completions takes the adapter folder's (review)."""
    adapter = with_template(client, tiny, "own_template", OWN_TEMPLATE)
    own = reference.tokenizer.apply_chat_template(answer_messages("zero_shot", CONTEXT, QUESTION), tokenize=False,
                                                  chat_template=OWN_TEMPLATE, continue_final_message=True)
    assert own.startswith("[system] ")
    want = reference.generate("one", own, SERVER_CAP).split("\n", 1)[0].strip()
    assert answer(client, adapter, "zero_shot", extractive=False)["answer"] == want
    prompt = reference.tokenizer.apply_chat_template(nli_messages("one_shot", PREMISE, HYPOTHESIS, NLI_LABELS),
                                                     tokenize=False, chat_template=OWN_TEMPLATE,
                                                     continue_final_message=True)
    assert_close(nli(client, adapter, "one_shot")["probabilities"],
                 label_probabilities(reference, "one", prompt, NLI_LABELS, whole=False))


@pytest.mark.parametrize("template", [
    # the reply begun comes first: continue_final_message cut the prompt to it, a 200 without the context (a review)
    "{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    "{% for m in messages %}{% if m.role != 'user' %}{{ m.content }}{% endif %}{% endfor %}"])
def test_a_style_s_prompt_that_an_adapter_template_leaves_the_question_out_of_is_a_422(client, tiny, template):
    adapter = with_template(client, tiny, f"leaves_out_{len(template)}", template)
    for reply in (answer(client, adapter, "zero_shot", status=422), nli(client, adapter, "one_shot", status=422),
                  nli(client, adapter, "zero_shot", ["yes", "no"], status=422)):
        assert "left out" in reply["message"], reply


@pytest.mark.parametrize("refusing", [
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
     "{% endif %}{{ m['content'] }}{% endfor %}"),  # as Gemma's refuses a system message
    # its code names no message content: the reply said transformers' continue_final_message "is not an accepted
    # field in the chat_template", not the template's own error (a review)
    "{{ raise_exception('no system messages') }}"], ids=["by role", "always"])
def test_an_adapter_template_that_fails_on_the_style_s_prompt_is_a_422_not_a_prompt_in_another_template(client,
                                                                                                      tiny, refusing):
    adapter = with_template(client, tiny, f"raising_template_{len(refusing)}", refusing)
    for reply in (answer(client, adapter, "zero_shot", status=422), nli(client, adapter, "one_shot", status=422),
                  nli(client, adapter, "zero_shot", status=422), nli(client, adapter, "zero_shot", ["yes", "no"],
                                                                    status=422)):
        assert "chat template refused" in reply["message"] and "no system messages" in reply["message"], reply
    assert answer(client, adapter, "adapter")["answer"]


@pytest.mark.usefixtures("patient_renders")
def test_a_style_s_prompt_whose_tokens_pass_the_memory_bound_is_a_422_naming_it(client, tiny):
    """A review: an adapter's template of 5 MB of text, whose tokens pass the render's memory bound in the tokenizer's
    Rust code (an abort, not a MemoryError), was said to have taken more than 2 s (/answer) or its process to have died
    (SIGABRT); now the memory bound is named, on /answer and /nli."""
    adapter = with_template(client, tiny, "huge_tokens", HUGE_TOKENS)
    for reply in (answer(client, adapter, "zero_shot", status=422), nli(client, adapter, "zero_shot", status=422)):
        assert "512 MiB memory bound of a render" in reply["message"], reply


def test_a_context_too_long_for_the_one_shot_prompt_is_answered_in_windows_sized_for_it(tiny, reference):
    """With answer_stride 8, a context whose adapter prompt fits in one piece but whose one_shot prompt does not: the
    free answer is a 413 (its prompt is over the limit), the extractive one a span from windows that fit."""
    def tokens(style: str, context: str) -> int:
        return len(reference.tokenizer.encode(answer_text(reference.tokenizer, style, context)))

    context = " ".join([CONTEXT] * 8)
    limit = tokens("one_shot", "") + 40
    assert tokens("adapter", context) < limit < tokens("one_shot", context)
    settings = tiny.settings(max_input_tokens=limit, answer_stride=8, max_answer_windows=16)
    with ready_client(settings) as client:
        assert "at most" in answer(client, None, "one_shot", context, status=413, extractive=False)["message"]
        got = answer(client, None, "one_shot", context)
        assert got["answer"] and context[got["start"]:got["end"]] == got["answer"]
        answer(client, None, "adapter", context, extractive=False)


@pytest.mark.parametrize("route, body", [
    ("/answer", {"context": CONTEXT, "question": QUESTION}),
    ("/nli", {"premise": PREMISE, "hypothesis": HYPOTHESIS}),
])
@pytest.mark.parametrize("style", ["few_shot", "ZERO_SHOT", "", 1])  # null is the default (test_api.py)
def test_an_unknown_style_is_refused_naming_the_field(client, route, body, style):
    message = post(client, route, {**body, "prompt_style": style}, status=422)["message"]
    assert "prompt_style" in message, message


def test_one_shot_is_refused_for_labels_it_has_no_example_for(client):
    message = nli(client, None, "one_shot", ["yes", "no"], status=422)["message"]
    assert "prompt_style" in message and "worked example" in message, message
    assert math.isclose(sum(nli(client, None, "zero_shot", ["yes", "no"])["probabilities"].values()), 1.0,
                        rel_tol=1e-6)


def test_a_model_without_a_chat_template_refuses_the_chat_styles(tiny_llama_dir, tmp_path):
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    with ready_client(tiny_settings(base, tmp_path / "no_adapters", tmp_path / "cache")) as client:
        for style in ("zero_shot", "one_shot"):
            for message in (answer(client, None, style, status=422)["message"],
                            nli(client, None, style, status=422)["message"],
                            nli(client, None, style, list(NLI_LABELS), status=422)["message"]):
                assert "prompt_style" in message and "chat template" in message, message
        assert answer(client, None, "adapter")["answer"]


def faults_named(reply) -> list[str]:
    """The fields a 422 names, in its order (its message's, and its detail's, which agree)."""
    assert reply.status_code == 422, reply.text
    named = re.findall(r"body\.([\w.]+): ", error_message(reply))
    assert [".".join(map(str, problem["loc"][1:])) for problem in reply.json()["detail"]] == named, reply.text
    return named


TOO_MANY_TOKENS = "\u3041" * (MOST_LABEL_TOKENS // 3 + 1)  # within the characters a label may have


@pytest.fixture(scope="module")
def templateless(tiny_llama_dir, tmp_path_factory):
    """A server of the tiny Llama without its chat template: the chat styles are refused."""
    root = tmp_path_factory.mktemp("templateless")
    base = shutil.copytree(tiny_llama_dir, root / "base")
    (base / "chat_template.jinja").unlink()
    with ready_client(tiny_settings(base, root / "no_adapters", root / "cache")) as client:
        yield client


@pytest.mark.parametrize("adapter", [{"adapter": None}, {}], ids=["null", "default"])
def test_a_chat_style_without_a_template_is_named_beside_the_field_faults(templateless, adapter):
    """A review: prompt_style's check (the adapter the route picks has no chat template, nor the base) ran once every
    field was valid, so a 422 named the other faults alone, and the client fixing them met this one. Now one 422
    names every fault, each at its field, in the order of the fields (an unknown field last); the check is left out
    where a field it reads is at fault (an unknown adapter is a 404 once the body is valid)."""
    answer = {"context": CONTEXT, "question": QUESTION, **adapter, "prompt_style": "zero_shot"}
    faulty = {**answer, "colour": "red", "decoding": {"max_new_tokens": 0}, "question": ""}
    assert faults_named(templateless.post("/answer", json=faulty)) == [
        "question", "decoding.max_new_tokens", "prompt_style", "colour"]
    assert faults_named(templateless.post("/answer", json=answer)) == ["prompt_style"]
    assert faults_named(templateless.post("/answer", json={**faulty, "adapter": "nope"})) == [
        "question", "decoding.max_new_tokens", "colour"]
    assert faults_named(templateless.post("/answer", json={**faulty, "adapter": "not a name"})) == [
        "question", "adapter", "decoding.max_new_tokens", "colour"]
    pair = {"premise": "", "hypothesis": HYPOTHESIS, **adapter, "prompt_style": "zero_shot"}
    assert faults_named(templateless.post("/nli", json={**pair, "labels": ["yes", TOO_MANY_TOKENS]})) == [
        "premise", "labels", "prompt_style"]
    assert faults_named(templateless.post("/nli", json={**pair, "premise": PREMISE,
                                                         "labels": ["yes", TOO_MANY_TOKENS]})) == [
        "labels", "prompt_style"]  # both checks past the schema: they name both too
    assert faults_named(templateless.post("/nli", json={**pair, "labels": ["yes"]})) == [
        "premise", "labels", "prompt_style"]  # the schema's fault of labels: the style's check reads no labels


def test_labels_the_tokenizer_refuses_are_named_beside_the_field_faults(client):
    """A review: /nli's labels check (its tokens, by the tokenizer) ran once every field was valid."""
    body = {"premise": PREMISE, "hypothesis": "  ", "labels": ["yes", TOO_MANY_TOKENS], "prompt_style": "adapter"}
    reply = client.post("/nli", json=body)
    assert faults_named(reply) == ["hypothesis", "labels"]
    assert f"at most {MOST_LABEL_TOKENS} are scored" in error_message(reply)


def test_a_style_s_prompt_the_template_refuses_is_named_beside_the_field_faults(client, tiny):
    """A review: the render of a chat style's prompt was the task's, once every field was valid. Now its refusal is
    named at prompt_style beside the field faults, in one 422; the render is left out where a field its prompt is
    made of is at fault."""
    adapter = with_template(client, tiny, "refusing_all", "{{ raise_exception('no system messages') }}")
    answer_body = {"context": CONTEXT, "question": QUESTION, "adapter": adapter, "prompt_style": "zero_shot"}
    reply = client.post("/answer", json={**answer_body, "decoding": {"top_k": 0}})
    assert faults_named(reply) == ["decoding.top_k", "prompt_style"]
    assert "no system messages" in error_message(reply) and reply.json()["detail"][1]["type"] == "template_refused"
    assert faults_named(client.post("/answer", json={**answer_body, "question": " "})) == ["question"]
    pair = {"premise": PREMISE, "hypothesis": HYPOTHESIS, "adapter": adapter, "prompt_style": "zero_shot"}
    assert faults_named(client.post("/nli", json={**pair, "premise": PREMISE * 5000})) == ["premise"]
    assert faults_named(client.post("/nli", json={**pair, "labels": ["yes"], "x": 1})) == [
        "labels", "x"]  # its prompt names the labels: not rendered with labels at fault
    assert faults_named(client.post("/nli", json={**pair, "labels": ["yes", TOO_MANY_TOKENS]})) == [
        "labels", "prompt_style"]  # the tokenizer's refusal of a label is no fault of its text: rendered
    assert faults_named(client.post("/nli", json={**pair, "labels": ["yes", "no"], "x": 1})) == ["prompt_style", "x"]


@pytest.mark.parametrize("route, body", [
    ("/answer", {"context": CONTEXT, "question": QUESTION}),
    ("/nli", {"premise": PREMISE, "hypothesis": HYPOTHESIS}),
    ("/nli", {"premise": PREMISE, "hypothesis": HYPOTHESIS, "labels": ["yes", "no"]})])
def test_a_chat_style_s_prompt_is_rendered_once(client, route, body, monkeypatch):
    """The check past the schema renders the prompt, and the task serves that one: not rendered again."""
    renders = []
    rendered = Renderer.rendered

    async def counted(self, job):
        renders.append(job)
        return await rendered(self, job)

    monkeypatch.setattr(Renderer, "rendered", counted)
    post(client, route, {**body, "prompt_style": "zero_shot"})
    assert len(renders) == 1


# a template that refuses a context cut short: the prompt of each window but the last (a review: the windows were
# rendered by the task, once the request was valid, so their refusal was a 422 alone, after the field faults)
CUT_SHORT = ("{% for m in messages %}{% if m.role == 'user' and 'Normans' in m.content and 'THE END' not in "
             "m.content %}{{ raise_exception('a cut context') }}{% endif %}[{{ m.role }}] {{ m.content }}\n"
             "{% endfor %}")


def test_a_windows_prompt_the_template_refuses_is_named_beside_the_field_faults(tiny, reference):
    """Each window's prompt is rendered before the request is served, by the check past the schema: a template that
    refuses only the windows' prompts (not the whole context's) is named at prompt_style with the field faults, each
    window it refuses said, in one 422; the last window's prompt, which it takes, and a context of one window
    are served."""
    def tokens(context: str) -> int:
        return len(reference.tokenizer.encode(answer_text(reference.tokenizer, "zero_shot", context)))

    context = " ".join([CONTEXT] * 8) + " THE END."
    limit = tokens("") + 40
    assert limit < tokens(context)
    with ready_client(tiny.settings(max_input_tokens=limit, answer_stride=8, max_answer_windows=16)) as client:
        adapter = with_template(client, tiny, "refuses_cut_contexts", CUT_SHORT)
        body = {"context": context, "question": QUESTION, "adapter": adapter, "prompt_style": "zero_shot"}
        reply = client.post("/answer", json={**body, "decoding": {"top_k": 0}})
        assert faults_named(reply) == ["decoding.top_k", "prompt_style"]
        message = reply.json()["detail"][1]["msg"]
        assert reply.json()["detail"][1]["type"] == "template_refused" and "a cut context" in message
        windows = int(re.search(r"answered in (\d+) windows", message)[1])
        assert windows > 2 and message.count("a cut context") == windows - 1, message
        assert faults_named(client.post("/answer", json=body)) == ["prompt_style"]
        short = answer(client, adapter, "zero_shot", "The Normans gave their name to Normandy. THE END.")
        assert short["answer"]
        assert answer(client, adapter, "zero_shot", context, extractive=False, status=413)


# templates that refuse a render the server makes for its own sizing, not a prompt the model is asked: the whole
# context's, a long one (answered in windows, its prompt sizes them), and the question's without its context
REFUSES_LONG = ("{% for m in messages %}{% if m.content|length > 300 %}{{ raise_exception('too long for me') }}"
                "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
REFUSES_NO_CONTEXT = ("{% for m in messages %}{% if m.content.startswith('Context: \n') %}"
                      "{{ raise_exception('no context') }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")


def test_a_sizing_render_the_template_refuses_is_said_to_be_one(tiny, reference):
    """A review: a 422 said the chat template refused the messages where it refused a render the server makes to
    size a long context's windows (the whole context's prompt, or the question's without its context), which the
    model is never asked. Each says what it rendered, and the template's own error."""
    context = " ".join([CONTEXT] * 8) + " THE END."
    limit = len(reference.tokenizer.encode(answer_text(reference.tokenizer, "zero_shot", ""))) + 40
    with ready_client(tiny.settings(max_input_tokens=limit, answer_stride=8, max_answer_windows=16)) as client:
        for name, template, said in [
                ("refuses_long", REFUSES_LONG, "the zero_shot prompt of the context and the question (asked where it "
                 "fits in one prompt, else it sizes windows): the chat template refused the messages: "),
                ("refuses_no_context", REFUSES_NO_CONTEXT, "the zero_shot prompt of the question without its "
                 "context, rendered only to size the windows of a context too long for one prompt (the model is not "
                 "asked it): the chat template refused the messages: ")]:
            adapter = with_template(client, tiny, name, template)
            body = {"context": context, "question": QUESTION, "adapter": adapter, "prompt_style": "zero_shot"}
            reply = client.post("/answer", json=body)
            assert faults_named(reply) == ["prompt_style"], reply.text
            message = reply.json()["detail"][0]["msg"]
            assert message.startswith(said) and message.endswith(("too long for me", "no context")), message
            assert answer(client, adapter, "zero_shot")["answer"]  # a short context: no such render
