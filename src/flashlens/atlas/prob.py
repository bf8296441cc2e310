"""The probability one neuron gives one token: `Atlas.prob(...)`.

With the model: p = exp(W_U[t] . final_norm(w) - logsumexp(w)), one dot product against the
stored logsumexp (no full decode). Without it: the atlas answers when it stores the pair, in
the neuron's top-k or in the token's reverse-index entry; otherwise the model is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..checks import is_integer, require_text
from ..errors import AtlasError, CheckpointError, FlashlensError
from .concepts import ConceptError, no_tokenizer
from .query import AtlasDB

if TYPE_CHECKING:
    import torch

    from ..weights import ModelSource
    from .atlas import Atlas, NeuronRecord


@dataclass
class TokenProb:
    layer: int
    matrix: str
    index: int
    token_id: int
    token: str
    text: str
    prob: float
    logit: float
    logsumexp: float
    rank: int | None  # 1-based rank in the neuron's stored top-k, None when outside it
    source: str  # "model", "top-k" or "reverse index"

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def resolve_token(
    atlas: Atlas, token: str | None, token_id: int | None, model_folder: Path | None = None
) -> int:
    """The one vocabulary id meant by a text like ' puppy' (or a raw token like 'Ġpuppy')."""
    vocab = AtlasDB.of(atlas).vocab
    if token_id is not None:
        if token is not None:
            raise FlashlensError("give a token text or --token-id, not both")
        if not is_integer(token_id):
            raise ConceptError(f"the token id must be an integer, not {token_id!r}")
        if not 0 <= token_id < atlas.meta.d_vocab:
            raise ConceptError(
                f"token id {token_id} is out of range: the vocabulary has ids "
                f"0-{atlas.meta.d_vocab - 1}"
            )
        return token_id
    token = require_text(token, "token", " puppy")
    if not token:
        raise ConceptError("the token is empty: give its text, e.g. ' puppy', or --token-id N")
    ids = vocab.ids(token)
    if len(ids) == 1:
        return ids[0]
    if len(ids) > 1:
        listed = ", ".join(f"{i} ({vocab.tokens[i]!r})" for i in ids)
        raise ConceptError(
            f"{token!r} is written by several tokens: {listed}; choose one with --token-id"
        )
    if token in vocab.by_token:
        return vocab.by_token[token]
    if vocab.ids_only:
        raise ConceptError(
            f"cannot read {token!r} as a token: "
            + no_tokenizer("give the token by id: --token-id N")
        )
    exact = _token_ids(token, model_folder)
    pieces = [vocab.texts[i] for i in (exact or vocab.encode(token))]
    near = vocab.nearest(token)
    hint = f"; nearest tokens: {', '.join(map(repr, near))}" if near else ""
    approx = (
        f" ({vocab.no_tokenizer})"
        if not exact and vocab.tokenizer is None and vocab.no_tokenizer
        else ""
    )
    if len(pieces) == 1 and pieces[0] != token:
        # one token of another text: a SentencePiece tokenizer adds a word-start space
        raise ConceptError(
            f"{token!r} is no token's text here; the tokenizer reads it as {pieces[0]!r}, one "
            f"token: give that text, e.g. {pieces[0]!r}"
        )
    raise ConceptError(
        f"{token!r} is not one token: it tokenizes as "
        f"{' + '.join(map(repr, pieces)) or '(nothing)'}{approx}{hint}"
    )


def _token_ids(text: str, folder: Path | None) -> list[int]:
    """Ids of the real tokenizer's split of `text`, or [] without a tokenizer (their texts are
    read from the atlas, as each reads in running text: decoding a piece alone drops a
    word-start space)."""
    if folder is None:
        return []
    from .tokens import load_tokenizer

    tok = load_tokenizer(folder)
    if tok is None:
        return []
    return list(tok.encode(text, add_special_tokens=False).ids)


def token_prob(
    atlas: Atlas,
    layer: int,
    index: int,
    token: str | None = None,
    *,
    matrix: str = "up",
    token_id: int | None = None,
    model: str | Path | None = None,
) -> TokenProb:
    atlas.check_neuron(layer, index, matrix)
    rec = atlas.neuron(layer, index, matrix)
    if model is not None:
        return _from_model(atlas, rec, token, token_id, model)
    tid = resolve_token(atlas, token, token_id)
    vocab = AtlasDB.of(atlas).vocab
    top = {s.token_id: (r, s) for r, s in enumerate(rec.top, 1)}
    base: dict[str, Any] = dict(
        layer=layer,
        matrix=matrix,
        index=index,
        token_id=tid,
        token=vocab.tokens[tid],
        text=vocab.texts[tid],
        logsumexp=rec.logsumexp,
    )
    if tid in top:
        r, s = top[tid]
        return TokenProb(**base, prob=s.prob, logit=s.logit, rank=r, source="top-k")
    db = AtlasDB.of(atlas)
    rows = db.rows(
        'SELECT prob, logit, "rank" FROM read_parquet(?) WHERE token_id = ? '
        'AND layer = ? AND matrix = ? AND "index" = ?',
        [db.reverse_file, tid, layer, matrix, index],
    )
    if rows:
        return TokenProb(
            **base,
            prob=float(rows[0][0]),
            logit=float(rows[0][1]),
            rank=None,
            source="reverse index",
        )
    bound = _upper_bound(db, tid, rec.top[-1].prob if rec.top else 1.0)
    raise FlashlensError(
        f"the atlas does not store {vocab.texts[tid]!r} for {matrix} {layer}:{index} (it is "
        f"below {bound:.3g}: outside the neuron's top-{len(rec.top)} and the token's top "
        f"neurons); pass --model MODEL to compute it exactly"
    )


def _upper_bound(db: AtlasDB, token_id: int, kth: float) -> float:
    """A stored-pair miss is below the neuron's k-th prob and the token's N-th neuron prob."""
    rows = db.rows(
        "SELECT min(prob), count(*) FROM read_parquet(?) WHERE token_id = ?",
        [db.reverse_file, token_id],
    )
    nth, n = rows[0]
    full = n >= db.atlas.meta.reverse_n
    return min(kth, float(nth)) if full and nth is not None else kth


def _from_model(
    atlas: Atlas, rec: NeuronRecord, token: str | None, token_id: int | None, model: str | Path
) -> TokenProb:
    import torch

    layer, index, matrix, lse = rec.layer, rec.index, rec.matrix, rec.logsumexp
    source = _open_model(atlas, model)
    try:
        if source.config_hash != atlas.meta.config_hash:
            raise AtlasError(
                f"{model} is not the model this atlas was made from "
                f"({atlas.meta.model}, config {atlas.meta.config_hash}; this one "
                f"has config {source.config_hash})"
            )
        tid = resolve_token(atlas, token, token_id, source.folder)
        w = source.neuron_rows(matrix, layer, torch.tensor([index]))[0]  # type: ignore[arg-type]
        check_weights(atlas, rec, w, model)
        logit = float(checked_logits(atlas, rec, source, model, [tid])[0])
    finally:
        source.close()
    rank = next((r for r, s in enumerate(rec.top, 1) if s.token_id == tid), None)
    vocab = AtlasDB.of(atlas).vocab
    return TokenProb(
        layer,
        matrix,
        index,
        tid,
        vocab.tokens[tid],
        vocab.texts[tid],
        math.exp(logit - lse),
        logit,
        lse,
        rank,
        "model",
    )


def _open_model(atlas: Atlas, model: str | Path) -> ModelSource:
    """The model of `--model`; an error names the model the atlas was made from."""
    from ..weights import ModelSource

    try:
        return ModelSource.open(model)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}; --model takes the model this atlas was made from ({atlas.meta.model})"
        ) from None


def exact_logits(
    atlas: Atlas, rec: NeuronRecord, source: ModelSource, ids: torch.Tensor
) -> torch.Tensor:
    """fp32 logits (n,) the neuron's vector in `source` gives tokens `ids` (n,): the final
    norm as the atlas applied it, rows of the LM-head, the head's bias and soft-cap where the
    family has them."""
    import torch

    from ..decode.norm import apply_final_norm, head_tail

    one = torch.tensor([rec.index])  # the neuron's row alone, not a copy of its layer
    w = source.neuron_rows(rec.matrix, rec.layer, one)[0].float()  # type: ignore[arg-type]
    readout = source.readout()
    x = apply_final_norm(w[None], readout, atlas.meta.norm)[0]  # type: ignore[arg-type]  # (d_model,)
    logits = source.W_U()[ids].float() @ x  # (n,)
    return head_tail(logits, readout.scaled_logit_bias, source.logit_softcap, ids)


# The atlas's top-k logits are exact fp32 (rescored): 0.1 apart means other weights.
LOGIT_TOLERANCE = 0.1


def checked_logits(
    atlas: Atlas, rec: NeuronRecord, source: ModelSource, model: str | Path, ids: list[int]
) -> torch.Tensor:
    """fp32 logits (n,) the neuron gives tokens `ids` in `source`, after checking that its
    stored top tokens get there the logits the atlas stores for them (within LOGIT_TOLERANCE):
    weights that keep the neuron's norm but not its reading (a sign flipped, entries
    permuted), which `check_weights` lets through, are refused. One decode serves both."""
    import torch

    top = [t.token_id for t in rec.top]
    logits = exact_logits(atlas, rec, source, torch.tensor(top + ids, dtype=torch.long))
    want = torch.tensor([t.logit for t in rec.top], dtype=torch.float32)
    if bool(((logits[: len(top)] - want).abs() > LOGIT_TOLERANCE).any()):  # (NaN: not refused)
        raise AtlasError(
            _not_the_model(
                atlas,
                rec,
                model,
                "decodes to other logits for its stored top tokens (same "
                "config.json and |w|, other weights)",
            )
        )
    return logits[len(top) :]


def _not_the_model(atlas: Atlas, rec: NeuronRecord, model: str | Path, what: str) -> str:
    """The refusal of a model whose neuron `rec` is not the atlas's, and the ways out: the
    atlas's own model folder, changed since, can only be mapped again."""
    local = Path(model).expanduser()
    same = str(model) == atlas.meta.model  # (a hub id as recorded, or the same path)
    if same or (
        local.is_dir() and local.resolve() == Path(atlas.meta.model).expanduser().resolve()
    ):
        return (
            f"the weights at {model} changed since the atlas at {atlas.root} was mapped from "
            f"them: neuron {rec.matrix}:{rec.layer}:{rec.index} {what}; map the model again "
            f"(flashlens map {model} -o {atlas.root} --overwrite)"
        )
    return (
        f"{model} is not the model the atlas at {atlas.root} was mapped from "
        f"({atlas.meta.model}): neuron {rec.matrix}:{rec.layer}:{rec.index} {what}; map it "
        f"into a new atlas (flashlens map {model} -o OUT), or pass --model {atlas.meta.model}"
    )


def norms_agree(
    found: NDArray[np.floating], stored: NDArray[np.floating], rtol: float = 1e-4
) -> NDArray[np.bool_]:
    """Per neuron: does the |w| measured in a model match the |w| the atlas stores? Within
    `rtol` (fp32 rounding by default) or 1e-6 absolute; a non-finite norm (a NaN weight)
    matches the same non-finite stored norm. The one test `prob`, `validate` and `compare`
    apply before reading a model's weights against an atlas."""
    return np.isclose(found, stored, rtol=rtol, atol=1e-6, equal_nan=True)


def check_weights(atlas: Atlas, rec: NeuronRecord, w: torch.Tensor, model: str | Path) -> None:
    """Refuse a neuron vector `w` (d_model,) whose norm is not the |w| the atlas stores for it:
    another checkpoint with the same config.json (fine-tuned, edited, retrained).

    The norms agree to fp32 rounding when `w` has the atlas's weight dtype, and to that of the
    coarser dtype when one of them was rounded to the other (e.g. an fp32 model loaded in bf16).
    """
    import torch

    found = float(w.float().norm())
    stored = getattr(torch, atlas.meta.weight_dtype, None)
    dtypes = [d for d in (stored, w.dtype) if isinstance(d, torch.dtype) and d.is_floating_point]
    rtol = 1e-4 if stored == w.dtype else max([1e-4] + [torch.finfo(d).eps for d in dtypes])
    if not norms_agree(np.array(found), np.array(rec.w_norm), rtol):
        raise AtlasError(
            _not_the_model(
                atlas,
                rec,
                model,
                f"has |w| {found:.6g} in it but {rec.w_norm:.6g} in the "
                "atlas (same config.json, other weights)",
            )
        )
