"""The bytes each token of a vocabulary stands for, the unit that constrained decoding matches text in."""
from __future__ import annotations

import json
import re
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

SENTENCEPIECE_SPACE = "\u2581"  # "▁": SentencePiece's spelling of a space
SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """For each token id in [0, len(tokenizer)), the UTF-8 bytes it decodes to inside a text, or None for a special
    token (end of text, chat markers: never text).

    Two spellings of a vocabulary are read exactly, told apart by the tokenizer's decoder: byte-level BPE (GPT-2,
    Llama 3, SmolLM2: each byte is one of 256 printable characters, ``bytes_to_unicode`` of GPT-2's encoder), and
    SentencePiece ("▁" for a space, ``<0xNN>`` byte-fallback tokens: Llama 2). A token's bytes may be part of a
    character (byte-level BPE splits rare characters into their bytes). Raises ValueError for a tokenizer whose
    decoder is neither."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {i for i, piece in enumerate(pieces) if piece is None}
    special |= {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.get_added_vocab()}
    spell = piece_bytes(tokenizer)
    spelled = {i: spell(piece) for i, piece in enumerate(pieces) if i not in special}
    return [spelled.get(i) for i in range(len(pieces))]


def piece_bytes(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes]:
    """The function from a token's piece (its ``convert_ids_to_tokens`` spelling) to the bytes it stands for, for the
    two spellings ``token_bytes`` reads (it raises KeyError for a byte-level piece outside GPT-2's 256 characters, such
    as an added token's). Raises ValueError for a tokenizer whose decoder is neither."""
    kinds = decoder_kinds(tokenizer)
    if "ByteLevel" in kinds:
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        return lambda piece: bytes(byte_of[char] for char in piece)
    if kinds & {"Metaspace", "ByteFallback"}:
        return sentencepiece_bytes
    raise ValueError(f"this tokenizer's decoder ({sorted(kinds) or 'none'}) is neither byte-level BPE nor "
                     "SentencePiece; its tokens' bytes are unknown, so answers cannot be constrained to spans")


def decoder_kinds(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """The types of the ``tokenizers`` decoder of a fast tokenizer and of the decoders in its sequence ("ByteLevel",
    "Metaspace", "ByteFallback", ...); empty for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    decoder = json.loads(backend.decoder.__getstate__())  # the decoder's own JSON, as tokenizer.json holds it
    return {decoder["type"], *(inner["type"] for inner in decoder.get("decoders") or [])}


def sentencepiece_bytes(piece: str) -> bytes:
    """The bytes of one SentencePiece token: ``<0xNN>`` is the byte NN, "▁" a space, the rest UTF-8."""
    byte = SENTENCEPIECE_BYTE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(SENTENCEPIECE_SPACE, " ").encode()
