"""The prompt styles (``service.tasks.prompt_styles``): the layout of the chat styles written out on the tiny chat
template, the prompts as docs/quality.md shows them on SmolLM2's template, the worked examples against the first rows
of the training files (and absent from dev), and the refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.errors import TemplateRefused
from service.model.base_model import resolve_base_dir
from service.settings import Settings
from service.tasks.prompt_styles import (
    ANSWER_INSTRUCTION,
    MNLI_EXAMPLE,
    NLI_INSTRUCTION,
    PROMPT_STYLES,
    RTE_EXAMPLE,
    SQUAD_EXAMPLE,
    answer_ids,
    answer_messages,
    nli_ids,
    nli_messages,
    pair_example,
    render_ids,
    require_template,
)
from service.tasks.prompts import NLI_LABELS, RTE_LABELS, answer_prompt, encode_text, nli_prompt
from tests.tiny_models import EOS
from training.data import data_dir, read_nli, read_squad

DOCS = Path(__file__).resolve().parents[2] / "docs" / "quality.md"
README = DOCS.parents[1] / "README.md"
SECTION = "## Prompt baselines"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer; its chat template writes "role: content<|endoftext|>\\n" per message."""
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def documented_section() -> str:
    """docs/quality.md's prompt baselines section."""
    text = DOCS.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def turn(role: str, content: str) -> str:
    return f"{role}: {content}{EOS}\n"


def ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids, the special tokens spelled in it parsed (as the template writes them)."""
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_chat_styles_are_the_instruction_the_example_exchange_and_the_reply_begun(tokenizer):
    """Written out by hand on the tiny template: system instruction, (one_shot: the worked example's exchange), the
    fields, and the assistant's reply begun with ``Answer:`` / ``Label:``, left open; the control tokens the template
    writes are parsed as such."""
    context, question, premise, hypothesis = "Zoë paid 3 €.", "What did Zoë pay?", "A dog runs.", "An animal moves."
    qa_shot = (turn("user", f"Context: {SQUAD_EXAMPLE.context}\nQuestion: {SQUAD_EXAMPLE.question}")
               + turn("assistant", f"Answer: {SQUAD_EXAMPLE.answer}"))
    nli_shot = (turn("user", f"Premise: {MNLI_EXAMPLE.premise}\nHypothesis: {MNLI_EXAMPLE.hypothesis}")
                + turn("assistant", f"Label: {MNLI_EXAMPLE.label}"))
    instruction = NLI_INSTRUCTION.format(labels="entailment, neutral, contradiction")
    for style, shot_qa, shot_nli in (("zero_shot", "", ""), ("one_shot", qa_shot, nli_shot)):
        qa = (turn("system", ANSWER_INSTRUCTION) + shot_qa + turn("user", f"Context: {context}\nQuestion: {question}")
              + "assistant: Answer:")
        nli = (turn("system", instruction) + shot_nli + turn("user", f"Premise: {premise}\nHypothesis: {hypothesis}")
               + "assistant: Label:")
        assert answer_ids(tokenizer, style, f"  {context}\n", question) == ids(tokenizer, qa)
        assert nli_ids(tokenizer, style, premise, hypothesis, NLI_LABELS) == ids(tokenizer, nli)
        assert qa.count(EOS) == (4 if shot_qa else 2)


def test_the_adapter_style_is_the_template_the_adapters_are_trained_on(tokenizer):
    assert answer_ids(tokenizer, "adapter", "c", "q") == encode_text(tokenizer, answer_prompt("c", "q"))
    assert nli_ids(tokenizer, "adapter", "p", "h", NLI_LABELS) == encode_text(tokenizer, nli_prompt("p", "h"))


def test_the_instruction_names_the_labels_scored_and_one_shot_takes_the_example_of_their_set(tokenizer):
    rte = nli_messages("one_shot", "p", "h", ("not_entailment", "entailment"))
    assert rte[0]["content"] == NLI_INSTRUCTION.format(labels="not_entailment, entailment")
    assert rte[2]["content"] == f"Label: {RTE_EXAMPLE.label}" and RTE_EXAMPLE.premise in rte[1]["content"]
    assert pair_example(list(reversed(NLI_LABELS))) == MNLI_EXAMPLE and pair_example(RTE_LABELS) == RTE_EXAMPLE
    with pytest.raises(ValueError, match="one_shot has a worked example only for the labels"):
        pair_example(("yes", "no"))
    zero = nli_messages("zero_shot", "p", "h", ("yes", "no"))
    assert zero[0]["content"].endswith("exactly one of these labels: yes, no.") and len(zero) == 3


def test_a_field_that_spells_a_control_token_stays_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids(EOS)
    for style in ("zero_shot", "one_shot"):
        plain = answer_ids(tokenizer, style, "no end here", "q")
        spelled = answer_ids(tokenizer, style, f"no {EOS} here", "q")
        assert spelled.count(eos) == plain.count(eos)  # only the template's turns end


def test_a_tokenizer_without_a_chat_template_refuses_the_chat_styles(tiny_tokenizer_dir, tmp_path):
    folder = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    bare = AutoTokenizer.from_pretrained(folder)
    assert bare.chat_template is None
    require_template(bare, "adapter")
    for style in ("zero_shot", "one_shot"):
        with pytest.raises(ValueError, match="chat template"):
            answer_ids(bare, style, "c", "q")
        with pytest.raises(ValueError, match="chat template"):
            nli_ids(bare, style, "p", "h", NLI_LABELS)


CHAT = [{"role": "system", "content": "Be brief. Who named Normandy?"},
        {"role": "user", "content": "  Who named Normandy?\n"},
        {"role": "assistant", "content": "The Normans."}, {"role": "user", "content": "When?"}]


LEFT_OUT = r"left out the text of message \d \(a user's\)"
UNCHECKABLE = r"did not render each user message's text as it is .* cannot be checked"


@pytest.mark.parametrize("template,refusal", [
    ("{% for m in messages %}{{ m.content | trim }}\n{% endfor %}", None),  # stripped at its ends: kept
    ("{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}", None),  # only users' are checked
    ("{% for m in messages %}{{ m.content | lower }}{% endfor %}", UNCHECKABLE),  # not verbatim
    ("{% for m in messages %}{{ m.content | replace(' ', '  ') }}{% endfor %}", UNCHECKABLE),  # not whole
    ("{{ messages[-1].content }}", LEFT_OUT),  # the first user message left out
    ("{% for m in messages|reverse %}{{ m.content }}{% endfor %}", LEFT_OUT),  # out of order: When? first
    ("{{ messages[-1].content }}{{ messages[0].content }}", LEFT_OUT)])  # the first's text only in the system prompt
def test_a_render_holds_each_user_messages_text_whole_as_the_readme_says(tokenizer, template, refusal):
    """The README's rule (under the chat template's 422s), held to ``render_ids``."""
    assert ("must stand verbatim (or stripped at its ends) where the template put it in the prompt text it rendered "
            "(before it is tokenized), after the text of the user messages before it") in README.read_text()
    if refusal is None:
        assert render_ids(tokenizer, CHAT, template, add_generation_prompt=True)
    else:
        with pytest.raises(TemplateRefused, match=refusal):
            render_ids(tokenizer, CHAT, template, add_generation_prompt=True)


def test_a_user_message_said_twice_and_rendered_once_is_left_out(tokenizer):
    twice = [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."},
             {"role": "user", "content": "Again?"}]
    assert render_ids(tokenizer, twice, "{% for m in messages %}{{ m.content }}{% endfor %}",
                      add_generation_prompt=True)
    with pytest.raises(TemplateRefused, match=r"left out the text of message 2 \(a user's\)"):
        render_ids(tokenizer, twice, "{{ messages[0].content }}", add_generation_prompt=True)


# templates that leave out every user message, each rendering the other messages and text of its own
NO_USERS = "{% for m in messages if m.role != 'user' %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
NO_USERS_OWN_TEXT = "You are a helpful assistant. Ask me anything.\n" + NO_USERS


@pytest.mark.parametrize("template,messages", [
    (NO_USERS, [{"role": "system", "content": "Say hi. Who named Normandy?"},
                {"role": "user", "content": "Who named Normandy?"}]),  # the user's text in the system message
    (NO_USERS, [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Who? The Normans."},
                {"role": "user", "content": "The Normans."}]),  # each user's text in an earlier assistant turn
    (NO_USERS_OWN_TEXT, [{"role": "user", "content": "Ask me anything."}]),  # in the template's own text
    (NO_USERS_OWN_TEXT, [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "Yes."},
                         {"role": "user", "content": ""}]),  # a role's name, and an empty user message
])
def test_a_template_that_leaves_out_a_user_message_is_refused_wherever_its_text_occurs_else(tokenizer, template,
                                                                                          messages):
    """A text search of the prompt passed each of these (a review): the user's text occurs in it, written by another
    message or by the template; the markers find the user's message itself left out."""
    with pytest.raises(TemplateRefused, match=LEFT_OUT):
        render_ids(tokenizer, messages, template, add_generation_prompt=True)


def test_a_user_message_kept_is_passed_wherever_its_text_occurs_else(tokenizer):
    """The neighbours kept: the same messages on the tiny template, which renders each, and an empty user message,
    which it renders as no text."""
    for messages in ([{"role": "system", "content": "Say hi. Who named Normandy?"},
                      {"role": "user", "content": "Who named Normandy?"}],
                     [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"},
                      {"role": "user", "content": ""}]):
        assert render_ids(tokenizer, messages, None, add_generation_prompt=True)


def test_a_template_whose_render_depends_on_a_users_text_cannot_be_checked(tokenizer):
    """A template that renders a user's text only where it says something it looks for (here: not empty) renders
    the marker where it would leave out the text: refused, as it cannot be checked."""
    skips_empty = "{% for m in messages if m.content %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(TemplateRefused, match=UNCHECKABLE):
        render_ids(tokenizer, [{"role": "system", "content": "Hi."}, {"role": "user", "content": ""}], skips_empty,
                   add_generation_prompt=True)
    assert render_ids(tokenizer, [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Hi"}],
                      skips_empty, add_generation_prompt=True)


def test_the_docs_show_the_instructions_and_the_examples():
    section = documented_section()
    for text in (ANSWER_INSTRUCTION, NLI_INSTRUCTION.format(labels=", ".join(NLI_LABELS)), SQUAD_EXAMPLE.question,
                 SQUAD_EXAMPLE.context, MNLI_EXAMPLE.premise, MNLI_EXAMPLE.hypothesis, *PROMPT_STYLES):
        assert text in section, text


@pytest.mark.smollm2
def test_the_docs_show_the_prompts_as_smollm2_sees_them():
    smollm2 = AutoTokenizer.from_pretrained(resolve_base_dir("smollm2", Settings().cache_dir))
    section = documented_section()
    for style in ("zero_shot", "one_shot"):
        for messages in (answer_messages(style, "{context}", "{question}"),
                         nli_messages(style, "{premise}", "{hypothesis}", NLI_LABELS)):
            rendered = smollm2.apply_chat_template(messages, continue_final_message=True, tokenize=False)
            assert f"```\n{rendered}\n```" in section, rendered
            assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n"
                                                                                      + messages[-1]["content"])


@pytest.mark.real_data("squad/train-v1.1.json.gz", "squad/dev-v1.1.json.gz")
def test_the_squad_example_is_the_first_training_question_and_not_in_dev():
    first = read_squad(data_dir() / "squad/train-v1.1.json.gz")[0]
    assert (first["context"], first["question"], first["answers"][0]) == (
        SQUAD_EXAMPLE.context, SQUAD_EXAMPLE.question, SQUAD_EXAMPLE.answer)
    dev = read_squad(data_dir() / "squad/dev-v1.1.json.gz")
    assert SQUAD_EXAMPLE.context not in {row["context"] for row in dev}
    assert SQUAD_EXAMPLE.question not in {row["question"] for row in dev}


@pytest.mark.real_data("nli/mnli.jsonl.gz", "nli/rte_train.jsonl.gz", "nli/rte_dev.jsonl.gz")
def test_the_pair_examples_are_the_first_training_pairs_and_not_in_dev():
    mnli, rte = data_dir() / "nli/mnli.jsonl.gz", data_dir() / "nli/rte_train.jsonl.gz"
    for example, first, dev in ((MNLI_EXAMPLE, read_nli(mnli, ["train"])[0], read_nli(mnli, ["dev_matched"])),
                                (RTE_EXAMPLE, read_nli(rte)[0], read_nli(data_dir() / "nli/rte_dev.jsonl.gz"))):
        assert (first["premise"], first["hypothesis"], first["label"]) == (
            example.premise, example.hypothesis, example.label)
        assert (example.premise, example.hypothesis) not in {(row["premise"], row["hypothesis"]) for row in dev}


def test_a_template_that_fails_on_the_marked_copy_alone_is_refused_naming_that_render(tokenizer):
    """A review: a template that fails on the marked copy of the messages (``marked``: each user's text a marker, the
    check that it keeps them) was said to have refused the messages, which it renders; the refusal names the copy,
    what it is rendered for, and the template's own error."""
    picky = ("{% for m in messages %}{% if '[[' in m.content %}{{ raise_exception('no brackets, please') }}{% endif %}"
             "{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert tokenizer.apply_chat_template(CHAT, chat_template=picky, tokenize=False)  # the messages themselves render
    with pytest.raises(TemplateRefused) as refused:
        render_ids(tokenizer, CHAT, picky, add_generation_prompt=True)
    assert str(refused.value).startswith("the chat template refused a copy of the messages with each user message's "
                                         "text replaced by a marker, rendered only to check that the template keeps "
                                         "each user's text as it is (the messages themselves rendered): ")
    assert str(refused.value).endswith("no brackets, please")
    with pytest.raises(TemplateRefused, match=r"^the chat template refused the messages: .*no brackets, please$"):
        render_ids(tokenizer, [{"role": "user", "content": "[[x]]"}], picky, add_generation_prompt=True)
