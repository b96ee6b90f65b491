"""The calibration an adapter's card holds (service/lora/card.py): read when the adapter is registered, T = 1 without
a card or its field, and a bad value refused with a clear error that leaves the registry as it was."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.errors import AdapterError
from service.http.errors import status_of
from service.lora.card import CALIBRATION_FIELD, CARD_FILE
from service.tasks.prompts import NLI_LABELS
from tests.lora_helpers import engine_model

LABELS = list(NLI_LABELS)


def with_card(source: Path, name: str, card) -> Path:
    """A copy of the adapter at ``source`` beside it (in its adapter root) named ``name``, with ``card`` as its
    card.json (text as it is, anything else as JSON; None: no card)."""
    folder = source.parent / name
    shutil.copytree(source, folder)
    if card is not None:
        (folder / CARD_FILE).write_text(card if isinstance(card, str) else json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def served(base_dir, ranked):
    """(model, registry) with r4 registered."""
    return engine_model(base_dir, {"r4": ranked["r4"]})


@pytest.mark.parametrize("card, temperature", [
    ({CALIBRATION_FIELD: {"temperature": 1.7, "labels": LABELS, "count": 119}, "name": "x"}, 1.7),
    ({CALIBRATION_FIELD: {"temperature": 3, "labels": LABELS}}, 3.0),
    ({"name": "x", "metrics": {}}, 1.0),  # a card without the field
    (None, 1.0),  # no card
])
def test_the_temperature_comes_from_the_card_and_is_one_without_it(served, ranked, tmp_path, card, temperature):
    _, registry = served
    name = f"t{abs(hash(json.dumps(card))) % 10_000}"
    described, _ = registry.register(name, with_card(ranked["r2"], f"card_{tmp_path.name}", card))
    calibration = registry.lookup(name).calibration
    assert calibration.temperature == temperature and described["label_temperature"] == temperature
    assert calibration.temperature_for(NLI_LABELS) == temperature
    assert calibration.temperature_for(("yes", "no")) == 1.0  # fitted for one label set only
    registry.unregister(name)


@pytest.mark.parametrize("card, named", [
    ({CALIBRATION_FIELD: {"temperature": 0, "labels": LABELS}}, "temperature"),
    ({CALIBRATION_FIELD: {"temperature": -1.5, "labels": LABELS}}, "temperature"),
    ('{"label_calibration": {"temperature": NaN, "labels": ["a", "b"]}}', "temperature"),
    ('{"label_calibration": {"temperature": Infinity, "labels": ["a", "b"]}}', "temperature"),
    ('{"label_calibration": {"temperature": 1e400, "labels": ["a", "b"]}}', "temperature"),
    ({CALIBRATION_FIELD: {"temperature": "1.5", "labels": LABELS}}, "temperature"),
    ({CALIBRATION_FIELD: {"temperature": True, "labels": LABELS}}, "temperature"),
    ({CALIBRATION_FIELD: {"labels": LABELS}}, "temperature"),
    ({CALIBRATION_FIELD: {"temperature": 1.5}}, "labels"),
    ({CALIBRATION_FIELD: {"temperature": 1.5, "labels": ["entailment", "entailment"]}}, "labels"),
    ({CALIBRATION_FIELD: 1.5}, CALIBRATION_FIELD),
    ("{not json", "JSON"),
    ("[1, 2]", "JSON object"),
])
def test_a_bad_calibration_is_refused_and_leaves_the_registry_unchanged(served, ranked, tmp_path, card, named):
    _, registry = served
    before = registry.describe()
    with pytest.raises(AdapterError) as refused:
        registry.register("calibrated", with_card(ranked["r2"], f"card_{tmp_path.name}", card))
    assert status_of(type(refused.value)) == 422
    assert named in str(refused.value) and CARD_FILE in str(refused.value)
    assert registry.describe() == before and "calibrated" not in registry.names()


def test_a_card_that_is_a_symlink_to_nothing_is_refused(served, ranked, tmp_path):
    """A review: a card.json linked to a file that is not there was taken for no card, and the adapter served with
    T = 1, whatever its card was to hold; a chat template so linked is refused (``runtime.read_chat_template``)."""
    _, registry = served
    before = registry.describe()
    folder = with_card(ranked["r2"], f"card_{tmp_path.name}", None)
    (folder / CARD_FILE).unlink(missing_ok=True)
    (folder / CARD_FILE).symlink_to(folder / "gone.json")  # inside the folder: a link out of it is refused anyway
    with pytest.raises(AdapterError, match=f"{CARD_FILE} is a symlink to nothing") as refused:
        registry.register("dangling", folder)
    assert status_of(type(refused.value)) == 422
    assert registry.describe() == before and "dangling" not in registry.names()
