"""The tokens table: how each vocabulary id looks as a token and as decoded text."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from .format import TOKENS_SCHEMA


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
