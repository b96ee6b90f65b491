"""Distinguishable adapters for a load test, derived from one the server has registered, and their registration.

Derived adapter ``i`` keeps the source's ``lora_A`` rows (its first ``rank``) on the source's modules of the chosen
kinds (``q_proj``, ``v_proj``, GPT-2's ``c_attn``), and draws its ``lora_B`` from a normal distribution seeded by
``i``, its spread that of the source's ``lora_B`` times ``spread``: each adapter pushes the model its own way, so
that the answer key tells them apart (``AnswerKey.distinct_fraction`` says how well it did). They are small (rank 4
on two kinds of module), so a hundred fit on disk and load fast."""
from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "loadtest_"  # the names of the adapters a load test registers: loadtest_<scenario>_<run>_<i>
KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


def source_path(admin: httpx.Client, name: str | None) -> Path:
    """The folder of the registered adapter ``name`` (None: the first the server lists that is not a load test's),
    from ``GET /adapters`` with the admin key. Raises ValueError when there is none such, httpx.HTTPStatusError for
    a refused call."""
    listed = admin.get("/adapters").raise_for_status().json()["adapters"]
    for adapter in listed:
        if adapter["name"] == name or (name is None and not adapter["name"].startswith(PREFIX)):
            return Path(adapter["path"])
    raise ValueError(f"the server has no adapter {name or 'to derive from'}: it lists "
                     f"{[adapter['name'] for adapter in listed]}")


def derive(source: Path, out: Path, seed: int, rank: int, kinds: Sequence[str], spread: float) -> Path:
    """Write to ``out`` an adapter derived from the PEFT folder ``source`` (see the module's docstring): its modules
    whose last name is one of ``kinds`` (all of them if it has none such, or when its target_modules is a pattern),
    rank min(``rank``, the source's), alpha / r as the source's, float32. Returns ``out``. Raises ValueError for a
    source that gives modules ranks or scales of their own, or whose weights numpy cannot read (bfloat16)."""
    config = json.loads((source / CONFIG_FILE).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{source}: derive from an adapter without rank_pattern or alpha_pattern")
    try:
        weights = load_file(source / WEIGHTS_FILE)
    except (SafetensorError, TypeError) as exc:
        raise ValueError(f"{source}: cannot read its weights as numpy arrays (bfloat16?): {exc}") from None
    targets = config["target_modules"]
    kept = [kind for kind in kinds if isinstance(targets, list) and kind in targets] or targets
    new_rank = min(rank, config["r"])
    generator = np.random.default_rng(seed)
    derived = {}
    for key in sorted(weights):
        module, part = KEY.fullmatch(key).group("module", "part")
        if isinstance(kept, list) and module.rsplit(".", 1)[-1] not in kept:
            continue
        tensor = weights[key].astype(np.float32)
        if part == "A":
            derived[key] = np.ascontiguousarray(tensor[:new_rank])
        else:
            derived[key] = generator.standard_normal((tensor.shape[0], new_rank), np.float32) * tensor.std() * spread
    out.mkdir(parents=True, exist_ok=True)
    save_file(derived, out / WEIGHTS_FILE)
    config.update(r=new_rank, lora_alpha=config["lora_alpha"] * new_rank / config["r"], target_modules=kept)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def register(admin: httpx.Client, name: str, path: Path) -> None:
    """``POST /adapters``; httpx.HTTPStatusError unless it answers 201."""
    admin.post("/adapters", json={"name": name, "path": str(path)}).raise_for_status()


def unregister(admin: httpx.Client, name: str) -> None:
    """``DELETE /adapters/{name}``; an adapter already gone is fine. httpx.HTTPStatusError for another refusal."""
    reply = admin.delete(f"/adapters/{name}")
    if reply.status_code != 404:
        reply.raise_for_status()


def new_run() -> str:
    """A run id for a load test's adapter names and folders: 6 random hex digits, so that load tests run at once
    against one server and adapter root do not share names."""
    return secrets.token_hex(3)


def run_names(scenario: str, run: str, count: int) -> list[str]:
    """The names of a run's ``count`` adapters, loadtest_<scenario>_<run>_<i>: plain identifiers of at most 64
    characters, as adapter names must be."""
    return [f"{PREFIX}{scenario}_{run}_{i:03d}" for i in range(count)]


@contextmanager
def derived_adapters(admin: httpx.Client, source: Path, root: Path, scenario: str, count: int, *, seed: int,
                     rank: int, kinds: Sequence[str], spread: float, run: str | None = None
                     ) -> Iterator[dict[str, Path]]:
    """``count`` adapters derived from ``source`` (seeds ``seed``, ``seed`` + 1, ...), written under ``root`` (a
    folder the server may load adapters from, one of its ``--adapter-roots``) and registered under this run's names
    (``run_names``; ``run`` None: a ``new_run``), each in a folder of its name: {name: folder}. On leaving, the
    adapters this run registered are unregistered and the folders it wrote removed, and ``root`` and its parents too,
    those this made, while they are empty; nothing another run registered or wrote is touched (a registration a stop
    cut short, which the server may have taken, counts as this run's). Raises
    FileExistsError for a folder already there and httpx.HTTPStatusError when the server refuses a registration (409
    for a name taken): neither is replaced."""
    names = {name: root / name for name in run_names(scenario, run or new_run(), count)}
    made = [folder for folder in (root, *root.parents) if not folder.exists()]  # innermost first
    written, registered = [], []
    try:
        for i, (name, folder) in enumerate(names.items()):
            folder.mkdir(parents=True)  # FileExistsError rather than writing into another run's folder
            written.append(folder)
            derive(source, folder, seed + i, rank, kinds, spread)
            registered.append(name)  # before the call: one a stop cuts short may have registered it (a review)
            try:
                register(admin, name, folder)
            except Exception as exc:  # a reply came (HTTPStatusError, of whichever httpx the client is): refused,
                if getattr(exc, "response", None) is not None:  # not this run's to unregister
                    registered.remove(name)
                raise
        yield names
    finally:
        for name in registered:
            unregister(admin, name)
        for folder in written:
            shutil.rmtree(folder, ignore_errors=True)
        with suppress(OSError):  # not empty: something else wrote there meanwhile
            for folder in made:
                folder.rmdir()
