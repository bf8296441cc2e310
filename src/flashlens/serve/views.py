"""The data behind each viewer page, as plain dicts (no web framework here).

Each page's HTML is rendered from exactly the dict its JSON twin returns, so the two can not
disagree. A request the atlas can not answer raises `ViewError` with an HTTP status and a
message that says what was wrong and what would work.
"""

from __future__ import annotations

import re
from typing import Any

from ..atlas import Atlas
from ..atlas.tokens import readable
from ..atlas.validation import validated_marks
from ..errors import AtlasError, FlashlensError, NeuronError

N_NEURON_TOKENS = 5  # top tokens shown beside each neuron on the token page


class ViewError(Exception):
    """A request the viewer refuses: `status` is the HTTP status, `message` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def neuron_path(matrix: str, layer: int, index: int) -> str:
    return f"/neuron/{matrix}/{layer}/{index}"


def token_path(token_id: int) -> str:
    return f"/token/{token_id}"


def vocab(atlas: Atlas, ids: list[int]) -> dict[str, dict[str, str]]:
    """The tokenizer form and decoded text of these token ids, keyed by id (as JSON keys are
    strings): what a page needs to show each of them as a token cell."""
    return {str(i): {"token": atlas.tokens[i], "text": atlas.texts[i]} for i in sorted(set(ids))}


def _int(value: str, what: str, example: str, status: int = 404) -> int:
    """A number in an address: ASCII digits only, so that each page has one address (int()
    also reads '+3', '3_0', ' 3' and other scripts' digits)."""
    if re.fullmatch(r"-[0-9]+", value):
        raise ViewError(status, f"{what} {value} is negative")
    if not re.fullmatch(r"[0-9]+", value):
        raise ViewError(status, f"{what} {value!r} is not a whole number, e.g. {example}")
    return int(value)


# --- / -------------------------------------------------------------------------------------
def overview(atlas: Atlas) -> dict[str, Any]:
    """The atlas' metadata and a link to the first neuron of every (matrix, layer)."""
    m = atlas.meta
    return {
        "meta": m.to_dict(),
        "links": {
            "neurons": {
                mat: {str(layer): neuron_path(mat, layer, 0) for layer in m.layers}
                for mat in m.matrices
            },
        },
    }


# --- /neuron/{matrix}/{layer}/{index} --------------------------------------------------------
def neuron(atlas: Atlas, matrix: str, layer: str, index: str) -> dict[str, Any]:
    """One neuron's record plus links to its neighbours and its twins in other matrices."""
    layer_n = _int(layer, "layer", "/neuron/up/2/7")
    index_n = _int(index, "neuron index", "/neuron/up/2/7")
    try:
        rec = atlas.neuron(layer_n, index_n, matrix)
    except NeuronError as err:
        raise ViewError(404, str(err)) from None
    m = atlas.meta
    pos = m.layers.index(layer_n)
    prev = next_ = None
    if index_n > 0:
        prev = neuron_path(matrix, layer_n, index_n - 1)
    elif pos > 0:
        prev = neuron_path(matrix, m.layers[pos - 1], m.width(m.layers[pos - 1]) - 1)
    if index_n < m.width(layer_n) - 1:
        next_ = neuron_path(matrix, layer_n, index_n + 1)
    elif pos < len(m.layers) - 1:
        next_ = neuron_path(matrix, m.layers[pos + 1], 0)
    expert = atlas.expert_of(layer_n, index_n)  # (expert, unit) in a mixture of experts
    return {
        **rec.to_dict(),
        **({} if expert is None else {"expert": expert[0], "unit": expert[1]}),
        "model": m.model,
        "validations": [c.to_dict() for c in atlas.validations(layer_n, index_n, matrix)],
        "links": {
            "prev": prev,
            "next": next_,
            "matrices": {mat: neuron_path(mat, layer_n, index_n) for mat in m.matrices},
        },
    }


# --- /token/{token_id} -----------------------------------------------------------------------
def token(atlas: Atlas, token_id: str) -> dict[str, Any]:
    """The neurons that give a token most probability (from reverse.parquet), best first."""
    from ..atlas.atlas import read_parquet

    tid = _int(token_id, "token id", "/token/42")
    n_vocab = len(atlas.tokens)
    if tid >= n_vocab:
        raise ViewError(
            404,
            f"token id {tid} is out of range: the vocabulary has {n_vocab} "
            f"tokens (0-{n_vocab - 1})",
        )
    table = read_parquet(atlas.reverse_path, filters=[("token_id", "=", tid)])
    rows = sorted(table.to_pylist(), key=lambda r: r["rank"])
    tops = _top_ids(atlas, [(r["matrix"], r["layer"], r["index"]) for r in rows])
    concept = atlas.texts[tid].strip().lower()  # as `flashlens validate` records a concept
    marks = validated_marks(atlas.root, concept) if concept else {}
    neurons = []
    for r in rows:
        ids = tops[(r["matrix"], r["layer"], r["index"])]
        neurons.append(
            {
                "rank": r["rank"],
                "layer": r["layer"],
                "matrix": r["matrix"],
                "index": r["index"],
                "prob": r["prob"],
                "logit": r["logit"],
                "top_tokens": [readable(atlas.texts[i], atlas.tokens[i]) for i in ids],
                "top_token_ids": ids,
                "validated": marks.get((r["layer"], r["matrix"], r["index"])),
            }
        )
    return {
        "token_id": tid,
        "token": atlas.tokens[tid],
        "text": atlas.texts[tid],
        "concept": concept,
        "reverse_n": atlas.meta.reverse_n,
        "neurons": neurons,
        "vocab": vocab(atlas, [i for n in neurons for i in n["top_token_ids"]]),
    }


def _top_ids(
    atlas: Atlas, keys: list[tuple[str, int, int]]
) -> dict[tuple[str, int, int], list[int]]:
    """Ids of the top tokens of each (matrix, layer, index), one read per file."""
    from ..atlas.atlas import read_parquet

    by_file: dict[tuple[str, int], set[int]] = {}
    for mat, layer, index in keys:
        by_file.setdefault((mat, layer), set()).add(index)
    out: dict[tuple[str, int, int], list[int]] = {}
    for (mat, layer), indices in by_file.items():
        table = read_parquet(
            atlas.layer_path(mat, layer),
            columns=["index", "top_ids"],
            filters=[("index", "in", sorted(indices))],
        )
        for index, ids in zip(
            table.column("index").to_pylist(), table.column("top_ids").to_pylist(), strict=True
        ):
            out[(mat, layer, index)] = list(ids[:N_NEURON_TOKENS])
    return out


# --- /search?q= ------------------------------------------------------------------------------
_ADDRESS = re.compile(r"^\s*(?:([A-Za-z_]+)\s*[ /:]\s*)?([0-9]+)\s*:\s*([0-9]+)\s*$", re.ASCII)


def neuron_address(q: str, atlas: Atlas, matrix: str = "") -> str | None:
    """'2:7', 'up 2:7', 'Up 2:7' or 'gate/2:7' -> the neuron's path; without a matrix in the
    text, the form's `matrix` or the atlas's first. A word that names no matrix of the atlas
    ('mlp 2:7') is a 400 that says which matrices it has (no concept is written that way)."""
    match = _ADDRESS.match(q)
    if not match:
        return None
    named = match.group(1).lower() if match.group(1) else None
    if named is not None and named not in atlas.meta.matrices:
        raise ViewError(
            400,
            f"{q.strip()!r} reads as a neuron address, but {match.group(1)!r} is no matrix of "
            f"this atlas: it has {', '.join(atlas.meta.matrices)} (e.g. "
            f"{atlas.meta.matrices[0]} {match.group(2)}:{match.group(3)})",
        )
    chosen = named or (matrix if matrix in atlas.meta.matrices else atlas.meta.matrices[0])
    return neuron_path(chosen, int(match.group(2)), int(match.group(3)))


def search(
    atlas: Atlas,
    q: str,
    *,
    matrix: str | None = None,
    layers: str | None = None,
    limit: str | None = None,
    top1: bool = False,
    plural: bool = False,
) -> dict[str, Any]:
    """`Atlas.search` for the page's query, with the query echoed back."""
    matrix = matrix or None
    layers = (layers or "").strip() or None
    limit_n = _int(limit, "limit", "20", 400) if limit else 20
    query = {
        "q": q,
        "matrix": matrix,
        "layers": layers,
        "limit": limit_n,
        "top1": top1,
        "plural": plural,
    }
    try:
        # (as given: a range searches the atlas's layers inside it, as on the command line)
        result = atlas.search(
            q, matrix=matrix, layers=layers, limit=limit_n, top1=top1, plural=plural
        )
    except AtlasError:
        raise  # a damaged atlas is the server's problem, not the query's
    except FlashlensError as err:
        raise ViewError(400, str(err)) from None
    shown = [i for h in result.hits for i in h.top_token_ids]
    return {"query": query, **result.to_dict(), "vocab": vocab(atlas, shown)}
