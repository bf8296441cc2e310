"""Reading an atlas: `Atlas.open(path)` and `atlas.neuron(layer, index, matrix)`."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..checks import is_integer, require_path
from ..errors import AtlasError, NeuronError
from .format import (
    FORMAT_VERSION,
    META,
    REVERSE,
    TOKENS,
    AtlasMeta,
    atlas_files,
    is_model_folder,
    layer_file,
    read_meta,
)

if TYPE_CHECKING:
    from .prob import TokenProb
    from .query import SearchResult
    from .stats import AtlasStats
    from .validation import ValidationRecord


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    token: str  # as the tokenizer shows it (e.g. "Ġdog")
    text: str  # decoded text (e.g. " dog")
    prob: float
    logit: float


@dataclass(frozen=True)
class NeuronRecord:
    layer: int
    matrix: str
    index: int
    top: list[TokenScore]  # most promoted first
    bottom: list[TokenScore]  # most suppressed first
    logsumexp: float
    entropy: float
    w_norm: float
    logit_mean: float
    logit_std: float
    logit_skew: float
    logit_kurtosis: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def degenerate(self) -> bool:
        """An all-zero or non-finite weight vector: its tokens are meaningless."""
        return is_degenerate(self.w_norm)


# The decoder floors the logits' variance at 1e-30 (std 1e-15): a std at that floor is a
# constant distribution, whose skew and kurtosis are undefined.
_STD_FLOOR = 2e-15


def is_degenerate(w_norm: float) -> bool:
    """A neuron whose weight vector is all zero or not finite (|w| is 0, NaN or inf): `map`
    warns about them, `search` ranks them nowhere and `stats` counts them apart."""
    return not (math.isfinite(w_norm) and w_norm != 0)


def _moments(w_norm: float, std: float, skew: float, kurtosis: float) -> tuple[float, float]:
    """Skew and excess kurtosis, both NaN (undefined) for a degenerate neuron or a constant
    distribution (which the decoder stores as skew 0 and kurtosis NaN)."""
    if is_degenerate(w_norm) or not std > _STD_FLOOR:
        return math.nan, math.nan
    return skew, kurtosis


def read_parquet(path: Path, **kwargs: Any) -> pa.Table:
    """Read a table of the atlas; a missing or damaged file is an AtlasError."""
    return _read_table(pq.read_table, path, **kwargs)


def check_parquet(path: Path) -> None:
    """Check that a table of the atlas is there and its footer reads (no data is read)."""
    _read_table(pq.read_metadata, path)


def _read_table(read: Any, path: Path, **kwargs: Any) -> Any:
    """read(path, **kwargs), a missing or unreadable file an AtlasError that says to remap."""
    if not path.is_file():
        raise AtlasError(f"{path} is missing; the atlas is damaged: map it again with --overwrite")
    try:
        return read(path, **kwargs)
    except (pa.ArrowException, OSError) as err:
        raise AtlasError(
            f"{path} is unreadable ({err}); the atlas is damaged: map it again with --overwrite"
        ) from None


class Atlas:
    """A finished neuron atlas on disk."""

    def __init__(self, root: Path, meta: AtlasMeta) -> None:
        self.root, self.meta = root, meta

    @classmethod
    def open(cls, path: str | Path) -> Atlas:
        root = Path(require_path(path, "atlas folder")).expanduser()
        if root.is_file():
            raise AtlasError(
                f"{root} is a file, not an atlas folder; pass the folder that "
                "`flashlens map MODEL -o FOLDER` wrote"
            )
        if not root.is_dir():
            raise AtlasError(
                f"no atlas at {root}: the folder does not exist; make one with "
                f"`flashlens map MODEL -o {root}`"
            )
        meta_path = root / META
        if is_model_folder(root):
            raise AtlasError(
                f"{root} is a model folder (it has config.json), not an atlas; map it into "
                f"one with `flashlens map {root} -o ATLAS` and pass ATLAS"
            )
        if not meta_path.is_file():
            if atlas_files(root):
                raise AtlasError(
                    f"{root} holds atlas files but no {META} (the atlas is damaged); map the "
                    f"model again with `flashlens map MODEL -o {root} --overwrite`"
                )
            raise AtlasError(
                f"{root} is not an atlas (no {META}); make one with `flashlens map MODEL -o {root}`"
            )
        try:
            meta = read_meta(meta_path)
        except (ValueError, OSError) as err:
            raise AtlasError(
                f"{meta_path} is unreadable ({err}); map the model again with --overwrite"
            ) from None
        if meta.format_version > FORMAT_VERSION:
            raise AtlasError(
                f"{root} was written by a newer flashlens (format "
                f"{meta.format_version}); upgrade flashlens to read it"
            )
        if not meta.complete:
            raise AtlasError(
                f"the atlas at {root} is incomplete (its mapping was interrupted); "
                "rerun the same `flashlens map` command to resume it"
            )
        return cls(root, meta)

    # --- tokens ------------------------------------------------------------------------
    @cached_property
    def tokens(self) -> list[str]:
        return self._tokens.column("token").to_pylist()

    @cached_property
    def texts(self) -> list[str]:
        return self._tokens.column("text").to_pylist()

    @cached_property
    def _tokens(self) -> pa.Table:
        return read_parquet(self.root / TOKENS)

    # --- neurons -----------------------------------------------------------------------
    def check_neuron(self, layer: int, index: int, matrix: str) -> None:
        m = self.meta
        for what, value in (("layer", layer), ("neuron index", index)):
            if not is_integer(value):
                raise NeuronError(f"the {what} must be an integer, not {value!r}")
        if matrix not in m.matrices:
            raise NeuronError(
                f"matrix {matrix!r} is not in this atlas; it has {', '.join(m.matrices)}"
            )
        if layer not in m.layers:
            raise NeuronError(
                f"layer {layer} is not in this atlas; it has layers {format_layers(m.layers)}"
            )
        width = m.width(layer)
        if not 0 <= index < width:
            which = "layers have" if m.widths is None else f"layer {layer} has"
            raise NeuronError(
                f"neuron index {index} is out of range: {which} {width} neurons (0-{width - 1})"
            )

    def layer_path(self, matrix: str, layer: int) -> Path:
        return layer_file(self.root, matrix, layer)

    def check_files(self) -> None:
        """Check that every table the atlas lists is there and readable (their footers only:
        cheap); an AtlasError names the first that is not."""
        paths = [self.root / TOKENS, self.reverse_path]
        paths += [
            self.layer_path(m, layer) for m in self.meta.matrices for layer in self.meta.layers
        ]
        for path in paths:
            check_parquet(path)

    def layer_table(self, matrix: str, layer: int) -> pa.Table:
        return read_parquet(self.layer_path(matrix, layer))

    def expert_of(self, layer: int, index: int) -> tuple[int | str, int] | None:
        """(expert, unit) of neuron `index` of `layer` in a mixture of experts, expert "shared"
        for the shared expert's units; None for a dense MLP (or a dense layer of a mixture)."""
        decoding = self.meta.decoding or {}
        experts = int(decoding.get("experts", 1))
        if experts <= 1 or layer in decoding.get("dense_layers", []):
            return None
        shared = int(decoding.get("shared_expert", 0))
        d_expert = (self.meta.width(layer) - shared) // experts
        if index >= experts * d_expert:
            return "shared", index - experts * d_expert
        return divmod(index, d_expert)

    def neuron(self, layer: int, index: int, matrix: str = "up") -> NeuronRecord:
        self.check_neuron(layer, index, matrix)
        table = read_parquet(self.layer_path(matrix, layer), filters=[("index", "=", index)])
        if table.num_rows != 1:
            raise AtlasError(
                f"{self.layer_path(matrix, layer)} has no row for neuron {index}; "
                "the atlas is damaged: map it again with --overwrite"
            )
        row = {k: v[0] for k, v in table.to_pydict().items()}
        lse = row["logsumexp"]
        skew, kurtosis = _moments(
            row["w_norm"], row["logit_std"], row["logit_skew"], row["logit_kurtosis"]
        )
        return NeuronRecord(
            layer=layer,
            matrix=matrix,
            index=index,
            top=self._scores(row["top_ids"], row["top_logits"], lse),
            bottom=self._scores(row["bottom_ids"], row["bottom_logits"], lse),
            logsumexp=lse,
            entropy=row["entropy"],
            w_norm=row["w_norm"],
            logit_mean=row["logit_mean"],
            logit_std=row["logit_std"],
            logit_skew=skew,
            logit_kurtosis=kurtosis,
        )

    def validations(self, layer: int, index: int, matrix: str = "up") -> list[ValidationRecord]:
        """What `flashlens validate` recorded for this neuron (validation.parquet): one record
        per concept and model, empty when it was never validated."""
        from .validation import neuron_validations

        self.check_neuron(layer, index, matrix)
        return neuron_validations(self.root, layer, index, matrix)

    def _scores(self, ids: list[int], logits: list[float], lse: float) -> list[TokenScore]:
        return [
            TokenScore(i, self.tokens[i], self.texts[i], math.exp(lg - lse), lg)
            for i, lg in zip(ids, logits, strict=True)
        ]

    @property
    def reverse_path(self) -> Path:
        return self.root / REVERSE

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"Atlas({str(self.root)!r}, model={m.model!r}, layers={len(m.layers)}, "
            f"d_mlp={m.d_mlp}, matrices={m.matrices})"
        )

    # --- queries (atlas/query.py, atlas/stats.py, atlas/prob.py) ---------------------------
    def search(
        self,
        concept: str,
        *,
        matrix: str | None = None,
        layers: LayerSpec | None = None,
        limit: int = 20,
        top1: bool = False,
        plural: bool = False,
    ) -> SearchResult:
        """Neurons ranked by the probability they give `concept`'s token variants."""
        from .query import search

        return search(
            self, concept, matrix=matrix, layers=layers, limit=limit, top1=top1, plural=plural
        )

    def stats(
        self,
        *,
        matrix: str | None = None,
        layers: LayerSpec | None = None,
        kurtosis: float | None = None,
        skew: float | None = None,
    ) -> AtlasStats:
        """Per layer and matrix: top-1 probability, entropy, top-token kinds, prediction and
        suppression neurons (excess kurtosis > `kurtosis` and skew > `skew` or < -`skew`;
        defaults in atlas/stats.py)."""
        from .stats import atlas_stats

        return atlas_stats(self, matrix=matrix, layers=layers, kurtosis=kurtosis, skew=skew)

    def prob(
        self,
        layer: int,
        index: int,
        token: str | None = None,
        *,
        matrix: str = "up",
        token_id: int | None = None,
        model: str | Path | None = None,
    ) -> TokenProb:
        """The probability neuron (layer, index) gives one token: exact with `model`, else
        from the atlas when it stores it."""
        from .prob import token_prob

        return token_prob(self, layer, index, token, matrix=matrix, token_id=token_id, model=model)


def format_layers(layers: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    out: list[str] = []
    for x in sorted(layers):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        elif out and "-" not in out[-1] and int(out[-1]) == x - 1:
            out[-1] = f"{out[-1]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


LayerSpec = str | int | Sequence[int]  # '0-5,9', 3, or [0, 1, 2]


def parse_layers(spec: LayerSpec, n_layers: int | None) -> list[int]:
    """'0-5,9' -> [0,1,2,3,4,5,9] (also a layer number, or a list of them), checked against
    the model's layer count (None: the caller checks them)."""
    return sorted({x for a, b in _layer_parts(spec, n_layers) for x in range(a, b + 1)})


def atlas_layers(spec: LayerSpec, atlas_layers: list[int], n_layers: int) -> list[int]:
    """The atlas layers a layer spec picks. A single layer ('9', 9, [3, 9]) must be in the
    atlas; a range ('0-5') picks the atlas's layers inside it, and is an error only when the
    whole spec picks none (an atlas mapped with --layers holds only some of the model's)."""
    have = set(atlas_layers)
    chosen: set[int] = set()
    for a, b in _layer_parts(spec, None):
        if a == b and a not in have:
            raise NeuronError(
                f"layer {a} is not in this atlas; it has layers {format_layers(atlas_layers)}"
            )
        if b >= n_layers:
            raise NeuronError(
                f"layer range '{a}-{b}' is out of range: the model has layers 0-{n_layers - 1}"
            )
        chosen.update(x for x in range(a, b + 1) if x in have)
    if not chosen:
        raise NeuronError(
            f"no layer of {_spec_text(spec)} is in this atlas; it has layers "
            f"{format_layers(atlas_layers)}"
        )
    return sorted(chosen)


def _spec_text(spec: LayerSpec) -> str:
    if isinstance(spec, str):
        return "".join(spec.split())  # (as _layer_parts reads it)
    return format_layers(parse_layers(spec, None))


_LAYER_PART = re.compile(r"[0-9]+(?:-[0-9]+)?")


def _layer_parts(spec: LayerSpec, n_layers: int | None) -> list[tuple[int, int]]:
    """'0-5,9' -> [(0, 5), (9, 9)]; a layer number or a list of them are single layers."""
    if not isinstance(spec, str):
        items: list[object] = [spec] if isinstance(spec, int | numbers.Integral) else list(spec)
        if not all(is_integer(x) for x in items):
            raise NeuronError(
                f"bad layers {spec!r}: give '0-5,9', a layer number or a list of them"
            )
        spec = ",".join(str(x) for x in items)
    parts: list[tuple[int, int]] = []
    text = "".join(spec.split())  # (any whitespace)
    if not text:
        raise NeuronError(f"no layers in {spec!r}: use e.g. 0-5,9")
    for part in text.split(","):
        if not part:
            raise NeuronError(f"bad layers {spec!r}: an empty item in the list; use e.g. 0-5,9")
        if part.startswith("-"):
            raise NeuronError(f"bad layer range {part!r}: layers count from 0")
        if not _LAYER_PART.fullmatch(part):  # (not int(): it takes '+3', '3_0', '٣')
            raise NeuronError(f"bad layer range {part!r}: use e.g. 0-5,9")
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a > b:
            raise NeuronError(f"bad layer range {part!r}: start is after end")
        if n_layers is not None and b >= n_layers:
            raise NeuronError(
                f"layer range {part!r} is out of range: the model has layers 0-{n_layers - 1}"
            )
        parts.append((a, b))
    return parts  # (never empty: an empty text or item is refused above)
