"""Which adapter folder ``--adapter`` names, one rule for ``loraswap eval``, ``calibrate`` and ``merge``. Light (no
torch): the commands' own modules import it."""
from __future__ import annotations

import argparse
from pathlib import Path

from service.cli.command import UsageError, flag, given_as
from service.settings import ADAPTER_CONFIG_FILE

CARD_IDENTITY = ("name", "task", "base_model", "base_file", "base_sha256", "command")  # of an adapter's card.json


def adapter_folder(args: argparse.Namespace, besides: str = "") -> Path:
    """The adapter folder ``args.adapter`` names: the path as given (from the working directory, or absolute) where it
    holds ``ADAPTER_CONFIG_FILE``, else the folder of that name in ``args.adapters_dir`` where that one does; a folder
    without it is no adapter's, passed over. Raises UsageError where a relative path names an adapter both ways (two
    folders: which was meant cannot be told, as POST /adapters refuses a relative path two adapter roots hold; a
    review: the working directory's won without a word), and where it names none, saying which of the two is a folder
    without ``ADAPTER_CONFIG_FILE`` and, for a name looked up, where the adapters folder does not exist
    (``adapters_dir_absent``).
    ``besides``: what else the option takes, for that error to list first (eval's "'none' or 'base', ")."""
    given, listed = Path(args.adapter), Path(args.adapters_dir) / args.adapter
    found = [folder for folder in (given, listed) if (folder / ADAPTER_CONFIG_FILE).is_file()]
    if len(found) == 2 and not given.samefile(listed):  # an absolute --adapter is its own listed path
        raise UsageError(f"--adapter {args.adapter} names two adapter folders, {given.resolve()} (from the working "
                         f"directory) and {listed} (in {given_as(args, 'adapters_dir')}): give the absolute path of "
                         "the one meant")
    if found:
        return found[0]
    looked_up = "" if given == listed else f", or one in {args.adapters_dir}"  # an absolute path is looked up once
    folders = [str(folder) for folder in dict.fromkeys((given, listed)) if folder.is_dir()]
    without = f" ({' and '.join(folders)} {'is a folder' if len(folders) == 1 else 'are folders'} without one)"
    raise UsageError(f"--adapter {args.adapter}: unknown adapter: not {besides}an adapter folder (one holding "
                     f"{ADAPTER_CONFIG_FILE}){looked_up}{without if folders else ''}"
                     f"{adapters_dir_absent(args) if looked_up else ''}")


def adapters_dir_absent(args: argparse.Namespace) -> str:
    """Where ``args.adapters_dir``, in which ``--adapter NAME`` is looked up, is no folder, the words that say so and
    where it came from (``given_as``: ``--adapters-dir``, ``LORASWAP_ADAPTERS_DIR``, else its default), to end an
    error with; else ''. A review: ``merge --adapter squad`` without the folder said the adapter held no weights."""
    if Path(args.adapters_dir).is_dir():
        return ""
    given = given_as(args, "adapters_dir")
    source = f"{flag('adapters_dir')}'s default" if given == "adapters_dir" else given
    return f": the adapters folder {args.adapters_dir} ({source}) does not exist"


def adapter_identity(folder: Path) -> dict:
    """What names the adapter in ``folder`` unambiguously, for a report or card to record what it used: ``path``, the
    folder (absolute, links resolved), ``weights_sha256``, the sha256 of its weights (``WEIGHTS_FILE``: what
    ``sha256sum`` prints for it), and ``card``, what its card says it is (``CARD_IDENTITY``), None without one. Raises
    AdapterError for a card the server would refuse (``card.read_card``)."""
    from service.lora.adapter_files import WEIGHTS_FILE
    from service.lora.card import CARD_FILE, read_card
    from service.model.base_model import sha256_of

    card = read_card(folder / CARD_FILE)
    return {"path": str(folder.resolve()), "weights_sha256": sha256_of(folder / WEIGHTS_FILE),
            "card": None if card is None else {key: card[key] for key in CARD_IDENTITY if key in card}}
