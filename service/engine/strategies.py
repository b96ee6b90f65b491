"""The decoding strategies and the sampling parameters each reads. Light (no torch): shared by the HTTP schemas,
which refuse a parameter the strategy does not read (422), and ``loraswap eval``'s options (a usage error)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

Strategy = Literal["greedy", "top_k", "nucleus", "temperature"]
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}  # a parameter not given
SAMPLING_PARAMETERS = frozenset(SAMPLING_DEFAULTS)
# the highest temperature a request may ask for (0 to it: /v1, /answer's decoding, eval's --temperature): OpenAI's API
# takes 0 to 2, and vLLM refuses more on every route (SamplingParams); the engine samples at any finite temperature
MAX_TEMPERATURE = 2.0
READ_BY = {"greedy": frozenset(), "top_k": frozenset({"temperature", "top_k"}),  # Decoding.row_params
           "nucleus": frozenset({"temperature", "top_p"}), "temperature": frozenset({"temperature"})}


# the seed of a request's random draws: read by every strategy that draws (all but greedy, which draws nothing)
SEED = "seed"


def reads(strategy: str) -> frozenset[str]:
    """The parameters ``strategy`` reads: its sampling parameters (``READ_BY``) and, where it draws, ``SEED``."""
    return READ_BY[strategy] | ({SEED} if strategy != "greedy" else frozenset())


def unread(strategy: str, given: Iterable[str], temperature: float) -> list[str]:
    """The sampling parameters among ``given`` (their names; ``SEED`` among them) that ``strategy`` does not read,
    sorted: given, they would be dropped without a word. greedy takes a ``temperature`` of 0, which means greedy."""
    names = sorted(set(given) & (SAMPLING_PARAMETERS | {SEED}) - reads(strategy))
    if strategy == "greedy" and temperature == 0 and "temperature" in names:
        names.remove("temperature")
    return names


def unread_reason(strategy: str, spell: Callable[[str], str] = str, name: str = "") -> str:
    """Why parameter ``name`` given is refused, after its name: what ``strategy`` reads instead, each parameter's
    name spelled by ``spell`` (a flag's spelling on the command line); for ``SEED``, that the strategy draws
    nothing."""
    if name == SEED:
        return (f"is not read by strategy {strategy!r}, which draws nothing at random: leave it out or choose a "
                "strategy that samples")
    every = listed(map(spell, sorted(SAMPLING_PARAMETERS | {SEED})))
    read = listed(map(spell, sorted(reads(strategy)))) or f"none of {every}"
    return f"is not read by strategy {strategy!r}, which reads {read}: leave it out or choose a strategy that reads it"


def listed(names: Iterable[str]) -> str:
    """``names`` in words: "a, b and c"; empty for none."""
    *most, last = [*names] or [""]
    return f"{', '.join(most)} and {last}" if most else last
