"""ATLAS/validation.parquet: the records of `flashlens validate`, read and written.

One row per (concept, neuron, model): the clamp that raised P(concept) most, its ratio over the
unclamped run, whether that reached the factor asked for, and the conditions it holds under.
pyarrow and DuckDB only: the viewer, `search` and `show` read it without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import AtlasError
from .format import VALIDATION

VALIDATION_SCHEMA = pa.schema(
    [
        ("concept", pa.string()),  # lowercased
        ("layer", pa.int16()),
        ("matrix", pa.string()),
        ("index", pa.int32()),
        ("baseline_prob", pa.float32()),
        ("clamped_prob", pa.float32()),  # at best_value
        ("best_value", pa.float32()),  # activation units (set, add) or a factor (scale)
        ("ratio", pa.float32()),  # clamped_prob / baseline_prob
        ("validated", pa.bool_()),  # ratio >= factor
        ("factor", pa.float32()),  # the conditions `validated` holds under ...
        ("mode", pa.string()),  # set, add or scale
        ("positions", pa.string()),  # all or last
        ("n_prompts", pa.int32()),
        ("model", pa.string()),  # a local folder resolved, a hub id as given
        ("created", pa.string()),  # ISO 8601, UTC
    ]
)
KEY = ("concept", "layer", "matrix", "index", "model")
# Columns added to the schema later: a file written before them reads them as nulls.
ADDED = ("factor", "mode", "positions", "n_prompts")


@dataclass
class ValidationRecord:
    """One recorded causal check of a neuron for a concept (a row of validation.parquet)."""

    concept: str
    validated: bool
    ratio: float  # P(concept | best clamp) / P(concept), mean over prompts
    baseline_prob: float
    clamped_prob: float
    best_value: float  # activation units (set, add) or a factor (scale)
    factor: float | None  # the ratio asked for (None: a file from before it was recorded)
    mode: str | None
    positions: str | None
    n_prompts: int | None
    model: str
    created: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_text(x: float) -> str:
    """A clamp's probability ratio as the CLI and the viewer print it: 3 significant digits,
    thousands grouped from 1000 (1,711, not 1.71e+03)."""
    return f"{x:.3g}" if not x >= 1000 else f"{x:,.0f}"


def read_table(path: Path) -> pa.Table:
    """A validation.parquet in VALIDATION_SCHEMA; a file written before the ADDED columns
    existed has them null. An AtlasError when it is unreadable."""
    try:
        table = pq.read_table(path)
        for name in ADDED:
            if name not in table.column_names:
                kind = VALIDATION_SCHEMA.field(name).type
                table = table.append_column(name, pa.nulls(table.num_rows, kind))
        return table.select(VALIDATION_SCHEMA.names).cast(VALIDATION_SCHEMA)
    except (pa.ArrowException, OSError, KeyError) as err:
        raise _unreadable(path, str(err)) from None


def check_validation(root: Path) -> None:
    """Check that ROOT/validation.parquet, when there, can be read and merged into."""
    path = Path(root) / VALIDATION
    if path.is_file():
        read_table(path)


def read_validation(root: Path, concept: str | None = None) -> pa.Table:
    """ROOT/validation.parquet (optionally one concept's rows); empty when never validated."""
    path = Path(root) / VALIDATION
    if not path.is_file():
        return VALIDATION_SCHEMA.empty_table()
    table = read_table(path)
    if concept is not None:
        table = table.filter(pc.equal(table["concept"], concept.strip().lower()))
    return table


def neuron_validations(root: Path, layer: int, index: int, matrix: str) -> list[ValidationRecord]:
    """The recorded checks of one neuron, by concept then model (one row each: a rerun of
    `validate` replaces its row); empty when it was never validated."""
    table = read_validation(root)
    mask = pc.and_(
        pc.and_(pc.equal(table["layer"], layer), pc.equal(table["index"], index)),
        pc.equal(table["matrix"], matrix),
    )
    rows = table.filter(mask).sort_by([("concept", "ascending"), ("model", "ascending")])
    return [ValidationRecord(**r) for r in rows.drop(["layer", "matrix", "index"]).to_pylist()]


def validated_marks(root: Path, concept: str) -> dict[tuple[int, str, int], bool]:
    """Whether each neuron checked for `concept` (any case) was validated, by its latest row
    over every model: {(layer, matrix, index): validated}; empty when never validated. Only
    these columns are read (DuckDB), so files with more columns, or another order, work."""
    import duckdb

    path = Path(root) / VALIDATION
    if not path.is_file():
        return {}
    try:
        with duckdb.connect(":memory:") as con:
            rows = con.execute(
                'SELECT layer, matrix, "index", arg_max(validated, created) '
                "FROM read_parquet(?) WHERE lower(concept) = ? GROUP BY ALL",
                [str(path), concept.strip().lower()],
            ).fetchall()
    except duckdb.Error as err:
        raise _unreadable(path, str(err)) from None
    return {(int(la), str(m), int(i)): bool(v) for la, m, i, v in rows if v is not None}


def _unreadable(path: Path, why: str) -> AtlasError:
    first = why.strip().splitlines()[0] if why.strip() else "unknown error"
    return AtlasError(
        f"{path} is unreadable ({first}); it only holds the records of `flashlens validate`, "
        "not the atlas: delete it (and validate again if you need them)"
    )
