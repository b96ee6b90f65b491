"""The base an adapter's config names (``base_model_name_or_path``): a label, shown in ``GET /adapters``, and a warning
where it names another base than the server's (a review: an adapter whose config named gpt2 was registered on
SmolLM2 without a word; its modules and shapes fit, which is all the server can check)."""
from __future__ import annotations

import json
import logging

import pytest

from service.model.base_model import names_the_base
from tests.server_helpers import ADMIN, ready_client, settings_in


@pytest.mark.parametrize(("label", "base_model", "named"), [
    (None, "smollm2", True),
    ("", "/models/tiny", True),
    ("smollm2", "smollm2", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", True),
    ("huggingfacetb/smollm2-135m-instruct", "smollm2", True),
    ("HuggingFaceTB/SmolLM2-135M", "smollm2", False),  # the base model, not the instruct one the GGUF quantizes
    ("gpt2", "smollm2", False),
    ("/models/tiny", "/models/tiny", True),
    ("org/tiny", "/models/tiny", True),  # a hub id, served from a download of it
    ("/elsewhere/tiny", "/models/tiny", True),
    ("org/other", "/models/tiny", False),
    ("smollm2", "/models/tiny", False),
])
def test_a_label_names_the_base_by_its_name_or_its_last_path_part(label, base_model, named):
    assert names_the_base(label, base_model) is named


def test_an_adapter_of_another_base_is_served_with_a_warning_and_its_label_shown(tiny_llama_dir, llama_adapters,
                                                                                tmp_path, caplog):
    settings = settings_in(tmp_path, tiny_llama_dir, llama_adapters)
    other = settings.adapters_dir / "one"
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "gpt2"
    (other / "adapter_config.json").write_text(json.dumps(config))
    caplog.set_level(logging.WARNING)
    with ready_client(settings) as client:
        described = {adapter["name"]: adapter for adapter in client.get("/adapters", headers=ADMIN).json()["adapters"]}
        assert described["one"]["base_model"] == "gpt2"
        assert described["two"]["base_model"] == str(tiny_llama_dir)
        warned = [record.getMessage() for record in caplog.records if "trained on" in record.getMessage()]
        assert warned == [f"adapter 'one' was trained on 'gpt2' (its config's base_model_name_or_path), not on this "
                          f"server's LORASWAP_BASE_MODEL {tiny_llama_dir}: served, as its modules and shapes fit, "
                          "but one trained on another base answers wrongly"], warned
        assert client.post("/nli", json={"premise": "p", "hypothesis": "h", "adapter": "one"}).status_code == 200
