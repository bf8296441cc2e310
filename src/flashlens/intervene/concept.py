"""A concept as the model's next-token distribution sees it: the token ids that write it.

The same expansion `flashlens search` uses (flashlens.atlas.concepts): ' dog', 'dog', ' Dog',
'DOG', ... each as the token whose decoded text is exactly that form. Unlike search, which falls
back to a multi-token concept's first token, a measurement refuses such a concept: P(' e') is
not P(' elephant'). Pass the piece itself to measure it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..atlas.concepts import ConceptError, Expansion, Vocab, expand


def concept_variants(
    concept: str, tokens: Sequence[str], texts: Sequence[str], plural: bool = False
) -> Expansion:
    """The concept's single-token variants over a vocabulary (tokens and texts by id)."""
    return single_token(expand(concept, Vocab(tokens, texts), plural))


def single_token(expansion: Expansion) -> Expansion:
    """`expansion` when some variant writes the whole concept; else a ConceptError."""
    key = expansion.concept.strip().lower()
    if any(v.text.strip().lower().startswith(key) for v in expansion.variants):
        return expansion
    why = "; ".join(n.removesuffix("; searching by its first token") for n in expansion.notes)
    raise ConceptError(
        f"unknown concept {expansion.concept!r}: no single token writes it ({why}); "
        "clamp and validate measure one next token: pass a piece, e.g. "
        f"{expansion.variants[0].text.strip()!r}"
    )


def model_concept(concept: str, folder: Path, d_vocab: int, plural: bool = False) -> Expansion:
    """The concept's token variants in the vocabulary of the model at `folder`."""
    from ..atlas.tokens import tokens_table

    table = tokens_table(folder, d_vocab)  # (d_vocab,) token_id, token, text
    return concept_variants(
        concept, table.column("token").to_pylist(), table.column("text").to_pylist(), plural
    )


def variant_ids(expansion: Expansion) -> list[int]:
    return [v.token_id for v in expansion.variants]
