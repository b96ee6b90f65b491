"""``loraswap eval --prompt-style`` end to end on the tiny Llama: each style is recorded in the report and changes
what the model is asked (the served label probabilities, so their calibration error, differ); an unknown style is a
usage error."""
from __future__ import annotations

import json
import shutil

import pytest

from service.cli.main import main
from service.tasks.prompt_styles import PROMPT_STYLES
from tests.e2e.test_training_evaluate import nli_file, squad_file


def report(tiny_llama_dir, tmp_path, task: str, data, *flags: str) -> dict:
    out = tmp_path / "eval.json"
    main(["eval", "--task", task, "--adapter", "none", "--base-model", str(tiny_llama_dir), "--adapters-dir",
          str(tmp_path), "--device", "cpu", "--data", str(data), "--max-new-tokens", "8", "--json", str(out), *flags])
    return json.loads(out.read_text())


def test_each_prompt_style_is_recorded_and_asks_the_model_otherwise(tiny_llama_dir, tmp_path):
    data = nli_file(tmp_path / "mnli.jsonl")
    reports = {style: report(tiny_llama_dir, tmp_path, "nli", data, "--prompt-style", style)
               for style in PROMPT_STYLES}
    assert [reports[style]["prompt_style"] for style in PROMPT_STYLES] == list(PROMPT_STYLES)
    assert all(reports[style]["count"] == 20 for style in PROMPT_STYLES)
    eces = [reports[style]["ece"] for style in PROMPT_STYLES]
    assert len(set(eces)) == len(eces), eces
    assert report(tiny_llama_dir, tmp_path, "nli", data)["prompt_style"] == "adapter"  # the default


def test_a_one_shot_squad_eval_answers_with_spans(tiny_llama_dir, tmp_path):
    got = report(tiny_llama_dir, tmp_path, "squad", squad_file(tmp_path / "squad.json"), "--prompt-style", "one_shot")
    assert (got["prompt_style"], got["count"], got["span_rate"]) == ("one_shot", 6, 100.0)


def test_an_unknown_prompt_style_is_a_usage_error(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "nli", "--adapter", "none", "--base-model", str(tiny_llama_dir), "--prompt-style",
              "few_shot"])
    assert exit_.value.code == 2
    assert "--prompt-style: invalid choice: 'few_shot'" in capsys.readouterr().err


def test_an_adapter_whose_own_template_refuses_the_style_s_prompt_is_a_usage_error(tiny_llama_dir, llama_adapters,
                                                                                   tmp_path, capsys):
    """The chat styles render the adapter's own chat template (as the server does); one that refuses a system message
    makes the eval a usage error in one line, not a traceback."""
    folder = shutil.copytree(llama_adapters["one"], tmp_path / "adapters" / "refusing")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                                                "{{ raise_exception('no system messages') }}{% endif %}"
                                                "{{ m['content'] }}{% endfor %}")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "nli", "--adapter", str(folder), "--base-model", str(tiny_llama_dir), "--adapters-dir",
              str(tmp_path / "adapters"), "--device", "cpu", "--data", str(nli_file(tmp_path / "mnli.jsonl")),
              "--prompt-style", "zero_shot"])
    assert exit_.value.code == 2
    assert "no system messages" in capsys.readouterr().err.strip().splitlines()[-1]
