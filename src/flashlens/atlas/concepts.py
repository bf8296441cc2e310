"""From a concept (a word or phrase) to the vocabulary tokens that write it.

A concept expands to its surface forms (with and without a leading space; as written, lower,
Title and UPPER case; optionally plural) and each form to the token whose decoded text is
exactly that form. A concept no form of which is one token is searched by its first token:
the longest vocabulary token the concept's text starts with.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from ..checks import require_text
from ..errors import FlashlensError


class ConceptError(FlashlensError):
    """A concept or token that this vocabulary cannot write."""


@dataclass(frozen=True)
class TokenVariant:
    token_id: int
    token: str  # as the tokenizer shows it (e.g. "Ġdog")
    text: str  # decoded text (e.g. " dog")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Expansion:
    """The token variants of a concept and what the user should know about them."""

    concept: str
    variants: list[TokenVariant]
    notes: list[str]


_IRREGULAR = {
    "child": "children",
    "man": "men",
    "woman": "women",
    "person": "people",
    "mouse": "mice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "wolf": "wolves",
    "knife": "knives",
    "leaf": "leaves",
    "life": "lives",
    "wife": "wives",
    "half": "halves",
    "calf": "calves",
}


def plural(word: str) -> str:
    """English plural of the last word of `word` (a heuristic: rules plus common irregulars)."""
    head, _, last = word.rpartition(" ")
    lower = last.lower()
    if lower in _IRREGULAR:
        p = _IRREGULAR[lower]
        p = (
            p.upper()
            if last.isupper() and len(last) > 1
            else (p.title() if last[:1].isupper() else p)
        )
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        p = last + ("ES" if last.isupper() and len(last) > 1 else "es")
    elif len(lower) > 1 and lower.endswith("y") and lower[-2] not in "aeiou":
        p = last[:-1] + ("IES" if last.isupper() else "ies")
    else:
        p = last + ("S" if last.isupper() and len(last) > 1 else "s")
    return f"{head} {p}" if head else p


def surface_forms(concept: str, with_plural: bool = False) -> list[str]:
    """Distinct forms, most natural first: ' dog', 'dog', ' Dog', 'Dog', ' DOG', 'DOG', ..."""
    base = concept.strip()
    cases = [base, base.lower(), _title(base), base.upper()]
    if with_plural:
        cases += [plural(c) for c in cases]
    forms: list[str] = []
    for c in cases:
        forms += [" " + c, c]
    return list(dict.fromkeys(forms))


def _title(text: str) -> str:
    return text[:1].upper() + text[1:].lower() if " " not in text else text.title()


class Vocab:
    """Token ids by decoded text, over the atlas' tokens table."""

    def __init__(
        self,
        tokens: Sequence[str],
        texts: Sequence[str],
        tokenizer: Any = None,
        no_tokenizer: str | None = None,
    ) -> None:
        self.tokens, self.texts = tokens, texts
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` of the model, when at hand
        self.no_tokenizer = no_tokenizer  # without one: where it was looked for (a note)

    @cached_property
    def ids_only(self) -> bool:
        """The atlas was mapped without a tokenizer: every token reads `<id N>`."""
        return all(t == f"<id {i}>" for i, t in enumerate(self.tokens))

    @cached_property
    def by_text(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            out.setdefault(t, []).append(i)
        return out

    @cached_property
    def by_token(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def _max_len(self) -> int:
        return max((len(t) for t in self.by_text), default=0)

    def variant(self, token_id: int) -> TokenVariant:
        return TokenVariant(token_id, self.tokens[token_id], self.texts[token_id])

    def ids(self, text: str) -> list[int]:
        """Ids whose decoded text is exactly `text` (byte-fallback twins included)."""
        return self.by_text.get(text, [])

    def first_token(self, text: str) -> int | None:
        """The longest token that `text` starts with and that writes real characters."""
        for n in range(min(len(text), self._max_len), 0, -1):
            ids = [i for i in self.ids(text[:n]) if not _is_byte_or_special(self.tokens[i])]
            if ids and "\ufffd" not in text[:n]:
                return ids[0]
        return None

    def encode(self, text: str) -> list[int]:
        """How the model's tokenizer splits `text` (greedy longest match without one)."""
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if ids and all(0 <= i < len(self.texts) for i in ids) and self.texts[ids[0]].strip():
                return list(ids)
        return self.segment(text)

    def pieces(self, text: str) -> list[str]:
        """The tokens (tokenizer forms) the model's tokenizer writes `text` with, less a
        SentencePiece word-start piece that writes only the space ([] without a tokenizer)."""
        if self.tokenizer is None:
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.tokens[i] for i in ids if 0 <= i < len(self.texts) and self.texts[i].strip()]

    def segment(self, text: str) -> list[int]:
        """Greedy longest-match split of `text` into token ids (an approximation of BPE)."""
        out: list[int] = []
        while text:
            i = self.first_token(text)
            if i is None:
                break
            out.append(i)
            text = text[len(self.texts[i]) :]
        return out

    @cached_property
    def _pool(self) -> dict[str, dict[str, str]]:
        """Printable token texts by first letter: key (lowercased, stripped) -> text."""
        pool: dict[str, dict[str, str]] = {}
        for t in self.by_text:
            key = t.strip().lower()
            if key and "\ufffd" not in t and t.isprintable():
                pool.setdefault(key[0], {}).setdefault(key, t)
        return pool

    def nearest(self, text: str, n: int = 5) -> list[str]:
        """The n vocabulary texts closest to `text` (difflib ratio, case- and space-blind),
        among those with the same first letter (all, when none has it)."""
        key = text.strip().lower()
        if not key:
            return []
        pool = self._pool.get(key[0]) or {k: v for d in self._pool.values() for k, v in d.items()}
        close = difflib.get_close_matches(key, list(pool), n=n, cutoff=0.5)
        return [pool[c] for c in close]


def _is_byte_or_special(token: str) -> bool:
    return (token.startswith("<0x") and token.endswith(">")) or (
        token.startswith("<") and token.endswith(">") and len(token) > 2
    )


def no_tokenizer(instead: str) -> str:
    """Why an atlas mapped without a tokenizer knows no text, and what to do."""
    return (
        "this atlas has no tokenizer (its tokens are ids only, e.g. '<id 42>'): put the "
        "model's tokenizer files (tokenizer.json) in the model folder and map it again with "
        f"--overwrite, or {instead}"
    )


def _by_id(text: str, vocab: Vocab) -> Expansion:
    """A concept in an atlas of ids only: the token it names ('<id 42>')."""
    ids = vocab.ids(text.strip())
    if not ids:
        raise ConceptError(
            f"cannot search {text!r}: " + no_tokenizer("search a token by its id, e.g. '<id 42>'")
        )
    return Expansion(text.strip(), [vocab.variant(i) for i in ids], [])


def expand(concept: str, vocab: Vocab, with_plural: bool = False) -> Expansion:
    """A concept's token variants; a ConceptError when the vocabulary cannot write it.

    A concept that is only whitespace ("\\n") is the tokens of exactly that text; one that no
    surface form writes but that is a token's tokenizer form ("<0x0A>", "▁and") is that token.
    """
    text = unicodedata.normalize("NFC", require_text(concept, "concept", "dog"))
    base = text.strip()
    if text and vocab.ids_only:
        return _by_id(text, vocab)
    if not base:
        if vocab.ids(text):
            return Expansion(text, [vocab.variant(i) for i in vocab.ids(text)], [])
        if text:
            raise ConceptError(
                f"no token of this vocabulary is exactly {text!r} (a concept of whitespace "
                "only searches the token with that text)"
            )
        raise ConceptError("the concept is empty: give a word or phrase, e.g. `dog`")
    forms = surface_forms(base, with_plural)
    ids = list(dict.fromkeys(i for f in forms for i in vocab.ids(f)))
    notes: list[str] = []
    if ids:
        missing = [f for f in forms if not vocab.ids(f)]
        if missing:
            notes.append("not single tokens here, left out: " + ", ".join(map(repr, missing)))
        return Expansion(base, [vocab.variant(i) for i in ids], notes)
    if base in vocab.by_token:
        return Expansion(base, [vocab.variant(vocab.by_token[base])], notes)
    # No form is one token: search by the first token of the concept as written.
    firsts: dict[int, tuple[str, list[int]]] = {}
    for form in (" " + base, base):
        seg = vocab.encode(form)
        first = seg[0] if seg else None
        if first is not None and vocab.texts[first].strip() and "\ufffd" not in vocab.texts[first]:
            firsts.setdefault(first, (form, seg))
    if not firsts:
        near = vocab.nearest(base)
        hint = f"; nearest tokens: {', '.join(map(repr, near))}" if near else ""
        pieces = vocab.pieces(base)
        if pieces:  # (byte pieces, mostly): each is searchable by its tokenizer form
            hint = (
                f": the tokenizer writes it as {len(pieces)} piece"
                f"{'s' if len(pieces) > 1 else ''} ({', '.join(map(repr, pieces))}); search "
                f"one by its tokenizer form, e.g. {pieces[0]!r}{hint}"
            )
        raise ConceptError(f"{base!r} has no token in this vocabulary{hint}")
    splits = "; ".join(
        f"{form!r} -> " + " + ".join(repr(vocab.texts[i]) for i in seg)
        for form, seg in firsts.values()
    )
    if any(len(seg) > 1 for _, seg in firsts.values()):
        notes.append(f"{base!r} is several tokens long ({splits}); searching by its first token")
    else:  # the tokenizer reads it as one token of another text (e.g. after normalizing)
        notes.append(f"{base!r} is no token's text here; the tokenizer reads it as ({splits})")
    if vocab.tokenizer is None and vocab.no_tokenizer:
        notes.append(vocab.no_tokenizer)
    near = vocab.nearest(base)
    if near:
        notes.append("nearest single tokens: " + ", ".join(map(repr, near)))
    return Expansion(base, [vocab.variant(i) for i in firsts], notes)
