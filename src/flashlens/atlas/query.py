"""Concept search over an atlas with DuckDB (embedded): `Atlas.search(...)`.

A neuron's concept probability is the sum of the probabilities it gives the concept's variant
tokens, as the atlas stores them: in the neuron's own top-k list (layer files) and in each
token's top-N neurons (reverse.parquet). A variant stored in both has the same probability in
both. A variant stored in neither is below both the neuron's k-th probability and the token's
N-th, so the sum is exact for every neuron that matters and a lower bound for the rest.

Every value reaches DuckDB as a bound parameter (`?`); only the number of placeholders is
written into the SQL text.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AtlasError, NeuronError
from .concepts import TokenVariant, Vocab, expand
from .format import REVERSE

if TYPE_CHECKING:
    import duckdb

    from .atlas import Atlas

VALIDATION = "validation.parquet"
N_TOP_TOKENS = 5


@dataclass
class SearchHit:
    layer: int
    matrix: str
    index: int
    concept_prob: float  # sum of the stored probabilities of the concept's variants
    concept_rank: int | None  # 1-based rank of the best variant in the neuron's top-k, or None
    top_tokens: list[str]  # decoded texts of the neuron's top 5 tokens
    validated: bool | None = None  # from validation.parquet, None when never validated

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SearchResult:
    concept: str
    variants: list[TokenVariant]
    notes: list[str]
    hits: list[SearchHit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "variants": [v.to_dict() for v in self.variants],
            "notes": list(self.notes),
            "hits": [h.to_dict() for h in self.hits],
        }


# --- the connection ------------------------------------------------------------------------
_DBS: weakref.WeakKeyDictionary[Atlas, AtlasDB] = weakref.WeakKeyDictionary()


class AtlasDB:
    """One in-memory DuckDB connection over an atlas' Parquet files (kept per Atlas)."""

    def __init__(self, atlas: Atlas) -> None:
        import duckdb

        self.atlas = atlas
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET enable_object_cache = true")  # Parquet metadata stays cached
        self.vocab = Vocab(atlas.tokens, atlas.texts, _tokenizer(atlas.meta.model))

    @classmethod
    def of(cls, atlas: Atlas) -> AtlasDB:
        if atlas not in _DBS:
            _DBS[atlas] = cls(atlas)
        return _DBS[atlas]

    def rows(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        """Run a query; a missing or damaged Parquet file becomes an AtlasError."""
        import duckdb

        try:
            return self.con.execute(sql, params).fetchall()
        except (duckdb.IOException, duckdb.InvalidInputException) as err:
            first = str(err).strip().splitlines()[0]
            raise AtlasError(
                f"the atlas at {self.atlas.root} is damaged ({first}); map it "
                "again with --overwrite"
            ) from None

    def register(self, name: str, table: Any) -> duckdb.DuckDBPyConnection:
        return self.con.register(name, table)

    def layer_files(self, matrices: list[str], layers: list[int]) -> list[str]:
        files = [self.atlas.layer_path(m, layer) for m in matrices for layer in layers]
        for f in files:
            if not f.is_file():
                raise AtlasError(
                    f"{f} is missing; the atlas is damaged: map it again with --overwrite"
                )
        return [str(f) for f in files]

    @property
    def reverse_file(self) -> str:
        path = self.atlas.root / REVERSE
        if not path.is_file():
            raise AtlasError(
                f"{path} is missing; the atlas is damaged: map it again with --overwrite"
            )
        return str(path)


def _tokenizer(model: str) -> Any:
    """The model's tokenizer when the atlas was made from a local folder that holds one."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    from .tokens import load_tokenizer

    return load_tokenizer(folder)


def select(
    atlas: Atlas, matrix: str | None, layers: list[int] | None
) -> tuple[list[str], list[int]]:
    """Checked matrices and layers (None = all in the atlas)."""
    m = atlas.meta
    if matrix is not None and matrix not in m.matrices:
        raise NeuronError(f"matrix {matrix!r} is not in this atlas; it has {', '.join(m.matrices)}")
    chosen = sorted(set(layers)) if layers is not None else list(m.layers)
    missing = [x for x in chosen if x not in m.layers]
    if missing or not chosen:
        from .atlas import format_layers

        raise NeuronError(
            f"layer {missing[0] if missing else '(none)'} is not in this atlas; "
            f"it has layers {format_layers(m.layers)}"
        )
    return ([matrix] if matrix else list(m.matrices)), chosen


# --- search --------------------------------------------------------------------------------
def _marks(n: int) -> str:
    return ", ".join("?" * n)


def search(
    atlas: Atlas,
    concept: str,
    *,
    matrix: str | None = None,
    layers: list[int] | None = None,
    limit: int = 20,
    top1: bool = False,
    plural: bool = False,
) -> SearchResult:
    """Neurons ranked by the probability they give a concept's tokens (see module doc)."""
    if limit < 1:
        raise NeuronError(f"--limit must be at least 1 (got {limit})")
    db = AtlasDB.of(atlas)
    matrices, chosen = select(atlas, matrix, layers)
    exp = expand(concept, db.vocab, plural)
    result = SearchResult(exp.concept, exp.variants, list(exp.notes))
    ids = [v.token_id for v in exp.variants]
    files = db.layer_files(matrices, chosen)
    # fwd: (neuron, variant) pairs from the neurons' own top-k lists, with the rank there.
    # rev: (neuron, variant) pairs from each variant's top-N neurons.
    sql = f"""
    WITH fwd_rows AS (
        SELECT layer, matrix, "index", top_ids, top_probs
        FROM read_parquet(?) WHERE list_has_any(top_ids, ?::INTEGER[])
          {"AND list_contains(?::INTEGER[], top_ids[1])" if top1 else ""}
    ), fwd AS (
        SELECT * FROM (
            SELECT layer, matrix, "index", unnest(top_ids) AS token_id,
                   unnest(top_probs) AS prob, unnest(range(1, len(top_ids) + 1)) AS pos
            FROM fwd_rows)
        WHERE list_contains(?::INTEGER[], token_id)
    ), rev AS (
        SELECT layer, matrix, "index", token_id, prob, NULL::BIGINT AS pos
        FROM read_parquet(?)
        WHERE token_id IN ({_marks(len(ids))}) AND matrix IN ({_marks(len(matrices))})
          AND layer IN ({_marks(len(chosen))})
    ), known AS (
        SELECT layer, matrix, "index", token_id, arg_max(prob, pos IS NOT NULL) AS prob,
               min(pos) AS pos
        FROM (SELECT * FROM fwd UNION ALL SELECT * FROM rev)
        GROUP BY ALL
    ), neurons AS (
        SELECT layer, matrix, "index", sum(prob) AS concept_prob, min(pos) AS concept_rank
        FROM known GROUP BY ALL
    )
    SELECT n.layer, n.matrix, n."index", n.concept_prob, n.concept_rank,
           f.top_ids[1:{N_TOP_TOKENS}] AS top_ids
    FROM neurons n LEFT JOIN fwd_rows f USING (layer, matrix, "index")
    {"WHERE f.top_ids IS NOT NULL" if top1 else ""}
    ORDER BY n.concept_prob DESC, n.layer, n.matrix, n."index"
    LIMIT ?
    """
    params: list[Any] = [files, ids]
    if top1:
        params.append(ids)
    params += [ids, db.reverse_file, *ids, *matrices, *chosen, limit]
    rows = db.rows(sql, params)
    tops = _top_ids(db, [(r[0], r[1], r[2]) for r in rows if r[5] is None])
    texts = db.vocab.texts
    for layer, mat, index, prob, rank, top in rows:
        top = top if top is not None else tops[(layer, mat, index)]
        result.hits.append(
            SearchHit(
                int(layer),
                str(mat),
                int(index),
                float(prob),
                None if rank is None else int(rank),
                [texts[i] for i in top],
            )
        )
    _mark_validated(db, result)
    if not result.hits:
        where = "with its top token among them" if top1 else "that stores them"
        result.notes.append(f"nothing found: no neuron in the chosen layers and matrices {where}")
        near = [t for t in db.vocab.nearest(exp.concept) if t not in {v.text for v in exp.variants}]
        if near:
            result.notes.append("nearest tokens: " + ", ".join(map(repr, near)))
    return result


def _top_ids(
    db: AtlasDB, keys: list[tuple[int, str, int]]
) -> dict[tuple[int, str, int], list[int]]:
    """Top token ids of neurons found only through the reverse index."""
    out: dict[tuple[int, str, int], list[int]] = {}
    by_file: dict[tuple[str, int], list[int]] = {}
    for layer, mat, index in keys:
        by_file.setdefault((mat, layer), []).append(index)
    for (mat, layer), indices in by_file.items():
        path = db.layer_files([mat], [layer])
        rows = db.rows(
            f'SELECT "index", top_ids[1:{N_TOP_TOKENS}] FROM read_parquet(?) '
            f'WHERE "index" IN ({_marks(len(indices))})',
            [path, *indices],
        )
        out.update({(layer, mat, int(i)): list(t) for i, t in rows})
        for i in indices:
            if (layer, mat, i) not in out:
                raise AtlasError(
                    f"{path[0]} has no row for neuron {i}; the atlas is damaged: "
                    "map it again with --overwrite"
                )
    return out


def _mark_validated(db: AtlasDB, result: SearchResult) -> None:
    """Fill `validated` from validation.parquet (latest row per neuron) when it exists."""
    path = Path(db.atlas.root) / VALIDATION
    if not path.is_file() or not result.hits:
        return
    rows = db.rows(
        'SELECT layer, matrix, "index", arg_max(validated, created) FROM read_parquet(?) '
        "WHERE lower(concept) = ? GROUP BY ALL",
        [str(path), result.concept.lower()],
    )
    seen = {(int(la), str(m), int(i)): bool(v) for la, m, i, v in rows if v is not None}
    for h in result.hits:
        h.validated = seen.get((h.layer, h.matrix, h.index))
