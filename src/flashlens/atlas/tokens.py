"""The tokens table: how each vocabulary id looks as a token and as decoded text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..checks import is_hub_id
from .format import TOKENIZER, TOKENS_SCHEMA


def readable(text: str, token: str | None = None) -> str:
    """How a token reads to people: its decoded text, or, when that text holds U+FFFD (a byte
    token, or part of a multi-byte character: it does not decode alone), the tokenizer's own
    form of it (e.g. <0xE2>), which tells such tokens apart."""
    if "\ufffd" in text and token and token != text:
        return token
    return text


def load_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A `tokenizers.Tokenizer` from tokenizer.json, or None when the folder has none."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


_CHECKED_IDS = 512  # ids compared between a tokenizer and the atlas' tokens table


def atlas_tokenizer(root: Path, model: str, tokens: Sequence[str]) -> tuple[Any, str | None]:
    """The tokenizer that splits text as the atlas' model does, and, when there is none, a
    line that says where it was looked for. Tried in turn: tokenizer.json in the atlas folder,
    in the model folder the atlas was made from, and (for a hub id) in the Hugging Face cache
    (never the network). A tokenizer whose tokens are not the atlas' is passed over."""
    places, where = [root / TOKENIZER], [str(root / TOKENIZER)]
    folder = Path(model).expanduser()
    if is_hub_id(model) and not folder.is_dir():
        places += _cached(model)
        where.append(f"the Hugging Face cache of {model}")
    else:
        places.append(folder / TOKENIZER)
        where.append(str(folder / TOKENIZER))
    for path in places:
        tok = _read(path)
        if tok is not None and _same_tokens(tok, tokens):
            return tok, None
    return None, (
        f"the model's tokenizer was not found at {' or '.join(where)}: this split is "
        f"approximate (the longest vocabulary token first); copy the model's {TOKENIZER} "
        f"into {root} for the model's own"
    )


def _cached(repo_id: str) -> list[Path]:
    """The hub cache's tokenizer.json of `repo_id`, when it holds one (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, TOKENIZER)
    except Exception:  # not a valid hub id, an unreadable cache: nothing cached
        return []
    return [Path(cached)] if isinstance(cached, str) else []


def _read(path: Path) -> Any:
    """A tokenizer from a tokenizer.json file, None when it is missing or unreadable."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # a damaged or foreign file: the tokenizers library's errors vary
        return None


def _same_tokens(tok: Any, tokens: Sequence[str]) -> bool:
    """Does `tok` name the atlas' tokens as its tokens table does (ids spread over the
    vocabulary)?"""
    step = max(1, len(tokens) // _CHECKED_IDS)
    return all(
        (tok.id_to_token(i) or f"<id {i}>") == tokens[i] for i in range(0, len(tokens), step)
    )


def tokens_table(folder: Path, d_vocab: int) -> pa.Table:
    """token_id, token, text for ids 0..d_vocab-1 (ids the tokenizer lacks read `<id N>`)."""
    tok = load_tokenizer(folder)
    ids = list(range(d_vocab))
    if tok is None:
        names = [f"<id {i}>" for i in ids]
        texts = list(names)
    else:
        names = [tok.id_to_token(i) or f"<id {i}>" for i in ids]
        texts = _texts(tok, ids)
    return pa.Table.from_pydict({"token_id": ids, "token": names, "text": texts}, TOKENS_SCHEMA)


def _texts(tok, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    """Each token's text as it reads inside running text, leading space included.

    Decoding a token alone drops a SentencePiece word-start space ("▁dog" -> "dog"), so each
    token is decoded after a plain anchor token and the anchor's text is cut off again.
    """
    alone = tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    anchor = tok.token_to_id("a")
    if anchor is None:
        return list(alone)
    prefix = tok.decode([anchor], skip_special_tokens=False)
    paired = tok.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
    return [
        p[len(prefix) :] if p.startswith(prefix) else a for p, a in zip(paired, alone, strict=True)
    ]
