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
from typing import TYPE_CHECKING, Any

from ..checks import is_integer
from ..errors import AtlasError, NeuronError
from .concepts import TokenVariant, Vocab, expand
from .format import REVERSE
from .tokens import atlas_tokenizer, readable
from .validation import validated_marks

if TYPE_CHECKING:
    import duckdb

    from .atlas import Atlas, LayerSpec

MATRICES = ("up", "gate", "down")
N_TOP_TOKENS = 5


@dataclass
class SearchHit:
    layer: int
    matrix: str
    index: int
    concept_prob: float  # sum of the stored probabilities of the concept's variants
    concept_rank: int | None  # 1-based rank of the best variant in the neuron's top-k, or None
    top_tokens: list[str]  # decoded texts of the neuron's top 5 tokens (tokens.readable)
    top_token_ids: list[int]  # their vocabulary ids
    validated: bool | None = None  # from validation.parquet, None when never validated
    # concept_prob leaves out a variant the atlas does not store for this neuron (below its
    # top-k and the token's reverse list): the true sum is higher (`prob --model` has it)
    lower_bound: bool = False

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
        tokenizer, missing = atlas_tokenizer(atlas.root, atlas.meta.model, atlas.tokens)
        self.vocab = Vocab(atlas.tokens, atlas.texts, tokenizer, missing)
        self._tables: set[str] = set()

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

    def table(self, kind: str, matrix: str = "") -> str:
        """Name of an in-memory table, loaded from the Parquet files on first use.

        fwd_M:  token_id, layer, index, pos, prob: every neuron's top-k, one row per entry,
                sorted by token (so `token_id = ?` touches one stretch of it)
        top5_M: layer, index, top5: each neuron's 5 best token ids, sorted by neuron
        bad_M:  layer, matrix, index of the degenerate neurons (|w| zero or not finite)
        rev:    reverse.parquet, sorted by token
        """
        if matrix and matrix not in MATRICES:
            raise NeuronError(f"unknown matrix {matrix!r}: choose from {', '.join(MATRICES)}")
        name = f"{kind}_{matrix}" if matrix else kind
        if name in self._tables:
            return name
        if kind == "fwd":
            sql = (
                f"CREATE TABLE {name} AS SELECT * FROM (SELECT unnest(top_ids) AS token_id, "
                'layer, "index", unnest(range(1, len(top_ids) + 1)) AS pos, '
                "unnest(top_probs) AS prob FROM read_parquet(?)) ORDER BY token_id"
            )
        elif kind == "bad":
            sql = (
                f'CREATE TABLE {name} AS SELECT layer, matrix, "index" FROM read_parquet(?) '
                f"WHERE {degenerate_sql()}"
            )
        elif kind == "top5":
            sql = (
                f'CREATE TABLE {name} AS SELECT layer, "index", top_ids[1:{N_TOP_TOKENS}] '
                'AS top5 FROM read_parquet(?) ORDER BY layer, "index"'
            )
        else:
            sql = f"CREATE TABLE {name} AS SELECT * FROM read_parquet(?) ORDER BY token_id"
        files = (
            self.layer_files([matrix], list(self.atlas.meta.layers))
            if matrix
            else self.reverse_file
        )
        self.rows(sql, [files])
        self._tables.add(name)
        return name

    @property
    def reverse_file(self) -> str:
        path = self.atlas.root / REVERSE
        if not path.is_file():
            raise AtlasError(
                f"{path} is missing; the atlas is damaged: map it again with --overwrite"
            )
        return str(path)


def degenerate_sql(w_norm: str = "w_norm") -> str:
    """SQL true for a degenerate neuron (|w| zero or not finite: `atlas.is_degenerate`)."""
    return f"NOT (isfinite({w_norm}) AND {w_norm} <> 0)"


def select(
    atlas: Atlas, matrix: str | None, layers: LayerSpec | None
) -> tuple[list[str], list[int]]:
    """Checked matrices and layers (None = all in the atlas; a range = the atlas's layers in
    it, see `atlas.atlas_layers`)."""
    m = atlas.meta
    if matrix is not None and matrix not in m.matrices:
        raise NeuronError(f"matrix {matrix!r} is not in this atlas; it has {', '.join(m.matrices)}")
    from .atlas import atlas_layers

    chosen = list(m.layers) if layers is None else atlas_layers(layers, m.layers, m.n_layers)
    return ([matrix] if matrix else list(m.matrices)), chosen


# --- search --------------------------------------------------------------------------------
def search(
    atlas: Atlas,
    concept: str,
    *,
    matrix: str | None = None,
    layers: LayerSpec | None = None,
    limit: int = 20,
    top1: bool = False,
    plural: bool = False,
) -> SearchResult:
    """Neurons ranked by the probability they give a concept's tokens (see module doc)."""
    if not is_integer(limit):
        raise NeuronError(f"limit must be an integer, not {limit!r}")
    if limit < 1:
        raise NeuronError(f"limit must be at least 1 (got {limit})")
    db = AtlasDB.of(atlas)
    matrices, chosen = select(atlas, matrix, layers)
    exp = expand(concept, db.vocab, plural)
    result = SearchResult(exp.concept, exp.variants, list(exp.notes) + layer_notes(layers, chosen))
    ids = [v.token_id for v in exp.variants]
    # fwd: (neuron, variant) pairs from the neurons' own top-k lists, with the rank there.
    # rev: (neuron, variant) pairs from each variant's top-N neurons.
    # One `token_id = ?` branch per variant and matrix: each reads one stretch of a sorted table.
    # A degenerate neuron (|w| zero or not finite) ranks nowhere: its "top tokens" are a flat
    # distribution's tie-break or NaN (which DuckDB would sort above every number).
    fwd_parts, params = [], []
    for m in matrices:
        fwd = db.table("fwd", m)
        for t in ids:
            fwd_parts.append(
                f'SELECT layer, ? AS matrix, "index", token_id, prob, pos FROM {fwd} '
                "WHERE token_id = ?"
            )
            params += [m, t]
    rev = db.table("rev")
    rev_parts = [
        f'SELECT layer, matrix, "index", token_id, prob, NULL AS pos FROM {rev} WHERE token_id = ?'
    ] * len(ids)
    params += ids
    bad = " UNION ALL ".join(
        f'SELECT layer, matrix, "index" FROM {db.table("bad", m)}' for m in matrices
    )
    sql = f"""
    WITH pairs AS (
        SELECT * FROM ({" UNION ALL ".join(fwd_parts + rev_parts)})
        WHERE list_contains(?::VARCHAR[], matrix) AND list_contains(?::INTEGER[], layer)
              AND NOT isnan(prob)
    ), good AS (
        SELECT * FROM pairs ANTI JOIN ({bad}) USING (layer, matrix, "index")
    ), known AS (
        SELECT layer, matrix, "index", token_id, arg_max(prob, pos IS NOT NULL) AS prob,
               min(pos) AS pos
        FROM good GROUP BY ALL
    )
    SELECT layer, matrix, "index", sum(prob) AS concept_prob, min(pos) AS concept_rank,
           count(*) AS n_stored
    FROM known GROUP BY ALL
    {"HAVING min(pos) = 1" if top1 else ""}
    ORDER BY concept_prob DESC, layer, matrix, "index"
    LIMIT ?
    """
    params += [matrices, chosen, limit]
    rows = db.rows(sql, params)
    tops = _top_ids(db, [(int(r[0]), str(r[1]), int(r[2])) for r in rows])
    texts, names = db.vocab.texts, db.vocab.tokens
    n_variants = len(set(ids))
    for layer, mat, index, prob, rank, n_stored in rows:
        top = tops[(int(layer), str(mat), int(index))]
        result.hits.append(
            SearchHit(
                int(layer),
                str(mat),
                int(index),
                float(prob),
                None if rank is None else int(rank),
                [readable(texts[i], names[i]) for i in top],
                [int(i) for i in top],
                lower_bound=int(n_stored) < n_variants,
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


def layer_notes(layers: LayerSpec | None, chosen: list[int], done: str = "searched") -> list[str]:
    """Which layers of the ranges asked for are not in the atlas (they are left out); `done`
    says what was done with the others."""
    from .atlas import format_layers, parse_layers

    if layers is None:
        return []
    absent = sorted(set(parse_layers(layers, None)) - set(chosen))
    if not absent:
        return []
    are = "layers {} are" if len(absent) > 1 else "layer {} is"
    return [
        f"{are.format(format_layers(absent))} not in this atlas; {done} {format_layers(chosen)}"
    ]


def _top_ids(
    db: AtlasDB, keys: list[tuple[int, str, int]]
) -> dict[tuple[int, str, int], list[int]]:
    """The top token ids of these neurons (layer, matrix, index)."""
    if not keys:
        return {}
    parts, params = [], []
    for layer, mat, index in keys:
        parts.append(
            f'SELECT layer, ? AS matrix, "index", top5 FROM {db.table("top5", mat)} '
            'WHERE layer = ? AND "index" = ?'
        )
        params += [mat, layer, index]
    rows = db.rows(" UNION ALL ".join(parts), params)
    out = {(int(la), str(m), int(i)): list(t) for la, m, i, t in rows}
    for key in keys:
        if key not in out:
            raise AtlasError(
                f"the atlas at {db.atlas.root} has no row for {key[1]} neuron "
                f"{key[0]}:{key[2]}; it is damaged: map it again with --overwrite"
            )
    return out


def _mark_validated(db: AtlasDB, result: SearchResult) -> None:
    """Fill `validated` from validation.parquet (latest row per neuron) when it exists."""
    if not result.hits:
        return
    seen = validated_marks(db.atlas.root, result.concept)
    for h in result.hits:
        h.validated = seen.get((h.layer, h.matrix, h.index))
