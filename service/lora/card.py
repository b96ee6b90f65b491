"""An adapter's card (``card.json`` beside its weights, written by ``loraswap train``): the one part of it the server
uses, the calibration of its label probabilities (``loraswap calibrate`` writes it).

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", section 4.2): the served label
probabilities are softmax(z / T) over the candidate labels' scores z, with one scalar T > 0 fitted after training by
minimising the negative log-likelihood of the gold labels on data the adapter was not trained on. T changes no
prediction (the order of the scores stays), only how confident the probabilities are.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from service import strict_json
from service.errors import AdapterError
from service.lora.bounded_read import MAX_ADAPTER_JSON_BYTES, read_bounded

CARD_FILE = "card.json"
CALIBRATION_FIELD = "label_calibration"  # {"temperature": T, "labels": [...], and how T was fitted}


@dataclass(frozen=True)
class Calibration:
    """A temperature ``temperature`` (> 0, finite) fitted for the label set ``labels``, scored as the adapter was
    trained (by each label's first token). The default, for an adapter whose card holds none: T = 1 for any set."""

    temperature: float = 1.0
    labels: tuple[str, ...] = ()

    def temperature_for(self, labels: tuple[str, ...]) -> float:
        """T for scoring ``labels``: the fitted one for exactly the fitted label set (same labels, same order), else 1
        (a temperature fitted on one label set says nothing of another)."""
        return self.temperature if tuple(labels) == self.labels else 1.0


def read_card(card_path: Path) -> dict | None:
    """The card at ``card_path`` (a ``card.json``) as the server reads it: bounded, a regular file only
    (``read_bounded``), strictly (``strict_json``); None when there is none. Raises AdapterError for a card that is a
    symlink to nothing (as for the chat template: ``chat_template.read_chat_template``), that is no regular file (a
    FIFO, a folder) or is over ``MAX_ADAPTER_JSON_BYTES``, that cannot be read as JSON or names a key twice in one
    object, and for one that is not a JSON object."""
    if card_path.is_symlink() and not card_path.exists():
        raise AdapterError(f"{card_path} is a symlink to nothing")
    if not card_path.exists():
        return None
    try:
        card = strict_json.loads(read_bounded(card_path, MAX_ADAPTER_JSON_BYTES))  # AdapterError: a FIFO, too large
    except (strict_json.RepeatedKey, AdapterError) as exc:  # AdapterError: read_bounded's, which names no folder
        raise AdapterError(f"{card_path}: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError(f"{card_path} cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(card, dict):
        raise AdapterError(f"{card_path} is not a JSON object")
    return card


def read_calibration(card_path: Path) -> Calibration:
    """The calibration in the card at ``card_path`` (a ``card.json``): the default (T = 1) when there is no card or it
    has no ``label_calibration`` field. Raises AdapterError (422) for a card ``read_card`` refuses, or a field that is
    not an object with a finite ``temperature`` > 0 (a JSON number, not a string or a boolean) and ``labels``, a list
    of at least two distinct non-empty strings."""
    try:
        card = read_card(card_path)
    except AdapterError as exc:
        raise AdapterError(f"{exc}, so its label calibration is unknown") from None
    if card is None or CALIBRATION_FIELD not in card:
        return Calibration()
    return parse_calibration(card[CALIBRATION_FIELD], f"{card_path}: {CALIBRATION_FIELD}")


def parse_calibration(field: object, where: str) -> Calibration:
    """``field`` (a card's ``label_calibration``) as a Calibration; AdapterError naming ``where`` if it is not one (see
    ``read_calibration``)."""
    if not isinstance(field, dict):
        raise AdapterError(f"{where} must be an object with a temperature and labels, not {field!r:.100}")
    temperature, labels = field.get("temperature"), field.get("labels")
    if type(temperature) not in (int, float) or not math.isfinite(temperature) or temperature <= 0:
        raise AdapterError(f"{where}.temperature must be a finite number above 0, not {temperature!r:.100}")
    if (not isinstance(labels, list) or len(labels) < 2 or len(set(map(str, labels))) != len(labels)
            or not all(isinstance(label, str) and label for label in labels)):
        raise AdapterError(f"{where}.labels must be a list of at least two distinct non-empty strings, not "
                           f"{labels!r:.100}")
    return Calibration(float(temperature), tuple(labels))
