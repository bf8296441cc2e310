"""The paper's validation as a batch: which neurons causally raise their concept's probability.

Each neuron is clamped alone at a few values: multiples of its largest natural |activation| on
the prompts in set and add mode (activation units), plain factors in scale mode. It is
validated when the best ratio P(concept | clamped) / P(concept) of the next token, averaged over
prompts, reaches `factor`. Results go to ATLAS/validation.parquet with the conditions they hold
under (factor, mode, positions, number of prompts): one row per concept, neuron and model;
rerunning replaces that row. `flashlens search` reads it for its "validated" column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atlas import Atlas
from ..atlas.atlas import read_parquet
from ..atlas.concepts import Expansion, TokenVariant
from ..atlas.format import VALIDATION, atomic_write
from ..atlas.prob import check_weights, checked_logits
from ..atlas.validation import (
    KEY,
    VALIDATION_SCHEMA,
    check_validation,
    read_table,
)
from ..errors import AtlasError, NeuronError
from ..progress import progress_bar
from ..weights import ModelSource
from .concept import concept_variants, single_token, variant_ids
from .dose import (
    DEFAULT_MULTIPLES,
    DEFAULT_SCALES,
    ActivationRange,
    activation_ranges,
    clamped_probs,
    concept_prob,
)
from .hooks import Mode, Positions, resolve_site
from .loading import LoadedModel
from .neuron import Neuron
from .prompts import encode, length_note


@dataclass
class NeuronValidation:
    layer: int
    matrix: str
    index: int
    baseline_prob: float
    clamped_prob: float
    best_value: float  # in the report's `unit`
    ratio: float
    validated: bool
    absmax: float  # largest natural |activation| on the prompts (set, add: the multiples' unit)
    values: list[float]  # in the report's `unit`
    probs: list[float]
    concept_prob: float | None = None  # from the atlas: the probability its decoded vector gives

    @property
    def neuron(self) -> Neuron:
        return Neuron(self.layer, self.index, self.matrix)  # type: ignore[arg-type]


@dataclass
class ValidationReport:
    concept: str
    variants: list[TokenVariant]  # the concept's tokens (as in search)
    model: str  # a local folder resolved, a hub id as given
    factor: float
    multiples: list[float]  # set, add: of each neuron's max |activation|; scale: the factors
    n_prompts: int
    mode: str
    positions: str
    unit: str  # of values and best_value: "activation" (set, add) or "factor" (scale)
    results: list[NeuronValidation]
    notes: list[str] = field(default_factory=list)
    path: str | None = None  # the validation.parquet written

    @property
    def n_validated(self) -> int:
        return sum(r.validated for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"n_validated": self.n_validated}


def check_model_matches(atlas: Atlas, model: str | Path, name: str | None = None) -> None:
    """Refuse a model that is not the one the atlas was mapped from: another config.json, or
    other weights (the atlas's weights fingerprint; an atlas from before fingerprints has
    only the validated neurons checked, in `check_model_weights`). A clamp's effect depends on
    every weight of the model, not only on the neuron's. Reads no more than config.json and
    the fingerprint's windows (0.05 s on an 8B model): the CLI checks before it loads the
    model, and `validate` checks again for Python callers. `name`: the model as the user
    gave it, for messages (default: `model`)."""
    source = ModelSource.open(model)
    try:
        _check_source_matches(atlas, source, str(name or model))
    finally:
        source.close()


def _check_source_matches(atlas: Atlas, source: ModelSource, model: str) -> None:
    if source.config_hash != atlas.meta.config_hash:
        raise AtlasError(
            f"model {model} does not match the atlas at {atlas.root}: its config hash is "
            f"{source.config_hash}, the atlas was mapped from {atlas.meta.model} (config "
            f"hash {atlas.meta.config_hash}); pass the model the atlas was made from"
        )
    want = atlas.meta.weights_fingerprint
    found = source.fingerprint() if want is not None else None
    if found != want:
        raise AtlasError(
            f"model {model} is not the one the atlas at {atlas.root} was mapped from "
            f"({atlas.meta.model}): same config.json, other weights (weights fingerprint "
            f"{found}, the atlas's {want}), such as a fine-tune. Pass the model the atlas was "
            f"made from, or map this one into its own atlas (flashlens map {model} -o OUT)"
        )


def check_factor(factor: float) -> None:
    """Refuse a validation factor that is not a positive, finite number."""
    if not 0 < factor < math.inf:
        raise NeuronError(f"--factor must be positive and finite (got {factor:g})")


def check_model_weights(
    atlas: Atlas, lm: LoadedModel, neurons: Sequence[Neuron], source: ModelSource
) -> None:
    """Refuse a model whose neurons are not the ones the atlas decoded: each neuron's |w| in
    the loaded module, and its stored top tokens' logits from the checkpoint `source` (an
    edit that keeps the norm, such as a flipped sign, changes them)."""
    for n in neurons:
        atlas.check_neuron(n.layer, n.index, n.matrix)
        rec = atlas.neuron(n.layer, n.index, n.matrix)
        site = resolve_site(lm.model, n)  # the module of the neuron's matrix
        check_weights(atlas, rec, site.weight_vector(n).detach(), lm.name)
        checked_logits(atlas, rec, source, lm.name, [])


def model_key(name: str) -> str:
    """The model as validation.parquet records it: a local folder as its resolved path (the
    same folder given through a symlink or a relative path is one model), a hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def value_unit(mode: str) -> str:
    """What a clamp value is in `mode`: a factor (scale) or an activation (set, add)."""
    return "factor" if mode == "scale" else "activation"


def idle_notes(ranges: Mapping[Neuron, ActivationRange], positions: str) -> list[str]:
    """Notes on the neurons of a mixture of experts whose expert the router sent none of the
    tokens a clamp acts on (all real tokens, or each prompt's last): the clamp did nothing."""
    out = []
    for n, r in ranges.items():
        where = "tokens" if positions == "all" else "last tokens"
        if r.tokens == 0 or (positions == "last" and r.next_mean is None):
            out.append(
                f"{n}: the router sent none of the prompts' {where} to its expert, so its "
                "clamp had nothing to act on"
            )
    return out


def clamp_values(mode: str, multiples: Sequence[float], absmax: float) -> list[float]:
    """A neuron's clamp values: in scale mode the multiples are plain factors; in set and add
    mode, multiples of its largest natural |activation| (1 for a neuron silent everywhere)."""
    if mode == "scale":
        return [float(m) for m in multiples]
    unit = absmax or 1.0
    return [m * unit for m in multiples]


def decoded_prob(atlas: Atlas, neuron: Neuron, ids: Sequence[int]) -> float:
    """The probability the neuron's decoded distribution gives the tokens `ids`, summed from
    the atlas as search sums it: each token's probability stored in the neuron's top-k or in
    the token's reverse-index entry; a token stored in neither is below both and counts 0."""
    top = read_parquet(
        atlas.layer_path(neuron.matrix, neuron.layer),
        columns=["top_ids", "top_probs"],
        filters=[("index", "=", neuron.index)],
    ).to_pylist()
    stored = dict(zip(top[0]["top_ids"], top[0]["top_probs"], strict=True)) if top else {}
    wanted = sorted({t for t in ids if t not in stored})
    if wanted:
        rev = read_parquet(
            atlas.reverse_path,
            columns=["token_id", "prob"],
            filters=[
                ("token_id", "in", wanted),
                ("layer", "=", neuron.layer),
                ("matrix", "=", neuron.matrix),
                ("index", "=", neuron.index),
            ],
        )
        stored |= dict(zip(rev["token_id"].to_pylist(), rev["prob"].to_pylist(), strict=True))
    probs = (stored.get(t) for t in set(ids))
    return float(sum(p for p in probs if p is not None and not math.isnan(p)))


def validate(
    atlas: Atlas,
    concept: str,
    lm: LoadedModel,
    *,
    neurons: Sequence[Neuron] | None = None,
    limit: int = 20,
    matrix: str | None = None,
    layers: list[int] | None = None,
    factor: float = 2.0,
    prompts: list[str],
    multiples: Sequence[float] | None = None,
    mode: Mode = "set",
    positions: Positions = "all",
    plural: bool = False,
    write: bool = True,
    progress: bool = False,
) -> ValidationReport:
    """Validate `neurons` (default: the top `limit` search hits for `concept`).

    multiples: None for DEFAULT_MULTIPLES (set, add) or DEFAULT_SCALES (scale).
    """
    check_factor(factor)
    if write:
        check_validation(atlas.root)  # before any clamping, not when the results are written
    if multiples is None:
        multiples = DEFAULT_SCALES if mode == "scale" else DEFAULT_MULTIPLES
    decoded: dict[Neuron, float] = {}
    if neurons is None:
        found = atlas.search(concept, matrix=matrix, layers=layers, limit=limit, plural=plural)
        expansion = single_token(Expansion(found.concept, found.variants, found.notes))
        chosen = [Neuron(h.layer, h.index, h.matrix) for h in found.hits]  # type: ignore[arg-type]
        decoded = {n: h.concept_prob for n, h in zip(chosen, found.hits, strict=True)}
    else:
        expansion = concept_variants(concept, atlas.tokens, atlas.texts, plural)
        chosen = list(dict.fromkeys(neurons))
    source = ModelSource.open(lm.folder)  # (one open for both checks of the model)
    try:
        _check_source_matches(atlas, source, lm.name)
        check_model_weights(atlas, lm, chosen, source)
    finally:
        source.close()
    ids = variant_ids(expansion)
    for n in chosen:
        if n not in decoded:
            decoded[n] = decoded_prob(atlas, n, ids)
    report = ValidationReport(
        expansion.concept.lower(),
        list(expansion.variants),
        model_key(lm.name),
        factor,
        list(multiples),
        len(prompts),
        mode,
        positions,
        value_unit(mode),
        [],
        list(expansion.notes),
    )
    if not chosen:
        report.notes.append("no neurons to validate")
        return report
    batch = encode(lm.tokenizer, prompts, lm.device)
    note = length_note(lm.model, batch)
    report.notes += [note] if note else []
    with progress_bar(progress, 2 + len(chosen) * len(multiples), "validating") as advance:
        baseline = concept_prob(lm.model, batch, ids)
        advance()
        ranges = activation_ranges(lm.model, batch, chosen)
        advance()
        report.notes += idle_notes(ranges, positions)
        for n in chosen:
            values = clamp_values(mode, multiples, ranges[n].absmax)
            probs = clamped_probs(
                lm.model, batch, [n], ids, values, mode, positions, advance=advance
            )
            best = max(range(len(probs)), key=probs.__getitem__)
            ratio = probs[best] / baseline if baseline > 0 else float("inf")
            report.results.append(
                NeuronValidation(
                    n.layer,
                    n.matrix,
                    n.index,
                    baseline,
                    probs[best],
                    values[best],
                    ratio,
                    ratio >= factor,
                    ranges[n].absmax,
                    values,
                    probs,
                    decoded.get(n),
                )
            )
    if write:
        report.path = str(write_validation(atlas.root, report))
    return report


def write_validation(root: Path, report: ValidationReport) -> Path:
    """Merge the report's rows into ROOT/validation.parquet (atomically)."""
    path = Path(root) / VALIDATION
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [
        {
            "concept": report.concept,
            "layer": r.layer,
            "matrix": r.matrix,
            "index": r.index,
            "baseline_prob": r.baseline_prob,
            "clamped_prob": r.clamped_prob,
            "best_value": r.best_value,
            "ratio": r.ratio,
            "validated": r.validated,
            "factor": report.factor,
            "mode": report.mode,
            "positions": report.positions,
            "n_prompts": report.n_prompts,
            "model": report.model,
            "created": created,
        }
        for r in report.results
    ]
    new = pa.Table.from_pylist(rows, VALIDATION_SCHEMA)
    if path.is_file():
        old = read_table(path)
        replaced = {tuple(r[k] for k in KEY) for r in rows}
        keep = [tuple(r[k] for k in KEY) not in replaced for r in old.select(KEY).to_pylist()]
        new = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
    new = new.sort_by(
        [
            ("concept", "ascending"),
            ("layer", "ascending"),
            ("matrix", "ascending"),
            ("index", "ascending"),
        ]
    )
    atomic_write(path, lambda tmp: pq.write_table(new, tmp))
    return path
