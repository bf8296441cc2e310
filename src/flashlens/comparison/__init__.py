"""Compare two models neuron by neuron: `compare(a, b)` over their atlases (and weights).

    cmp = flashlens.compare("atlas/llama31-8b", "atlas/llama31-8b-instruct")
    cmp.figures("up").same_top1        # share of up neurons whose top-1 token is unchanged
    cmp.changed(limit=20)              # the neurons that moved most, top tokens before/after

Figures per neuron: same top-1 token, top-k Jaccard overlap, bounds on the total-variation
distance from the atlases alone (figures.py) and, when both models' weights are at hand, the
exact Jensen-Shannon divergence and total-variation distance (exact.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from ..atlas import Atlas
from ..atlas.atlas import LayerSpec
from ..decode.policy import resolve_device
from ..errors import AtlasError, FlashlensError
from ..families import Matrix
from ..progress import progress_bar
from ..weights import ModelSource
from ..weights.resolve import HUB_PATTERNS
from .exact import ExactPair, Stored
from .figures import topk_figures
from .inputs import Request, check_compatible, common_scope, kind_of, open_pair
from .result import Comparison, Figures, NeuronTable

__all__ = ["Comparison", "Figures", "compare"]

Distance = Literal["auto", "exact", "atlas"]


def compare(
    a: str | Path,
    b: str | Path,
    *,
    out: str | Path | None = None,
    matrices: str | list[str] | None = None,
    layers: LayerSpec | None = None,
    top_k: int | None = None,
    norm: str | None = None,
    distance: Distance = "auto",
    device: str = "auto",
    dtype: str = "auto",
    compile: str = "auto",
    block: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Comparison:
    """Compare model A with model B neuron by neuron.

    a, b: atlas folders, or models (folder or hub id) that are first mapped with the same
    settings into `out`/<name> (an atlas already there is reused). matrices/layers restrict the
    comparison (and the mapping); top_k/norm are mapping settings (default: the other atlas'
    or 10/model); device/dtype/compile/block/overwrite are passed to `map_model` (device also
    places the exact decode; overwrite replaces an atlas in `out` made with other settings).
    distance: "exact" reads both models' weights for the exact JSD/TV, "atlas" uses the
    atlases alone, "auto" is exact when both models' weights are on this machine. progress: a
    progress bar on stderr. Neurons with no finite decoded distribution (a NaN weight vector)
    are left out of the distance means, with a note.
    """
    if distance not in ("auto", "exact", "atlas"):
        raise FlashlensError(f"unknown distance {distance!r}: use auto, exact or atlas")
    req = Request(matrices, layers, top_k, norm, device, dtype, compile, block, overwrite, progress)
    A, B = open_pair(a, b, out, req)
    check_compatible(A, B, top_k)
    ms, ls, notes = common_scope(A, B, matrices, layers)
    k = compared_top_k(A, B, top_k)
    if A.meta.compute_dtype != B.meta.compute_dtype:
        notes.append(
            f"the atlases were decoded in different precisions ({A.meta.compute_dtype} "
            f"vs {B.meta.compute_dtype}); near-ties may differ for that reason alone"
        )
    folders = _weights(A, a, B, b, distance, notes)
    pair = None
    if folders is not None:
        pair = ExactPair(folders[0], folders[1], A.meta.norm, resolve_device(device))  # type: ignore[arg-type]
    try:
        parts = _compare_layers(A, B, ms, ls, k, pair, progress)
    finally:
        if pair is not None:
            pair.close()
    neurons = NeuronTable.concat(parts)
    undefined = np.isnan(neurons.tv_lo)  # a NaN decoded distribution: no distance
    if pair is not None:
        undefined |= np.isnan(neurons.jsd)
    if undefined.any():
        i, n = int(np.flatnonzero(undefined)[0]), int(undefined.sum())
        notes.append(
            ("1 neuron has" if n == 1 else f"{n} neurons have")
            + " no finite decoded distribution in A or B (e.g. "
            f"{neurons.matrix[i]} {neurons.layer[i]}:{neurons.index[i]}: a non-finite weight "
            "vector); the distance means leave them out"
        )
    return Comparison(
        atlas_a=str(A.root),
        atlas_b=str(B.root),
        model_a=A.meta.model,
        model_b=B.meta.model,
        matrices=ms,
        layers=ls,
        top_k=k,
        exact=pair is not None,
        neurons=neurons,
        texts=A.texts,
        tokens=A.tokens,
        notes=notes,
    )


def _compare_layers(
    A: Atlas,
    B: Atlas,
    matrices: list[str],
    layers: list[int],
    k: int,
    pair: ExactPair | None,
    progress: bool,
) -> list[NeuronTable]:
    total = len(matrices) * sum(A.meta.width(layer) for layer in layers)
    parts: list[NeuronTable] = []
    with progress_bar(progress, total, "comparing", unit="neurons") as advance:
        for matrix in matrices:
            for layer in layers:
                d_mlp = A.meta.width(layer)
                what = f"{matrix} layer {layer}"
                ta, tb = _layer(A, matrix, layer), _layer(B, matrix, layer)
                ids_a, probs_a = ta["top_ids"][:, :k], ta["top_probs"][:, :k]
                ids_b, probs_b = tb["top_ids"][:, :k], tb["top_probs"][:, :k]
                fig = topk_figures(ids_a, probs_a, ids_b, probs_b, A.meta.d_vocab)
                nan = np.full(d_mlp, np.nan)
                jsd, tv = nan, nan.copy()
                if pair is not None:

                    def step(n: int, w: str = what) -> None:
                        advance(n, w)

                    stored = (Stored(**ta), Stored(**tb))
                    jsd, tv = pair.layer(_matrix(matrix), layer, stored, step)
                else:
                    advance(d_mlp, what)
                parts.append(
                    NeuronTable(
                        matrix=np.full(d_mlp, matrix),
                        layer=np.full(d_mlp, layer, dtype=np.int64),
                        index=np.arange(d_mlp, dtype=np.int64),
                        same_top1=fig.same_top1,
                        jaccard=fig.jaccard,
                        tv_lo=fig.tv_lo,
                        tv_hi=fig.tv_hi,
                        jsd=jsd,
                        tv=tv,
                        top_ids_a=ids_a,
                        top_probs_a=probs_a,
                        top_ids_b=ids_b,
                        top_probs_b=probs_b,
                    )
                )
    return parts


def compared_top_k(A: Atlas, B: Atlas, top_k: int | None) -> int:
    """The k of the compared top-k lists: `top_k` (the first k of each stored list) or, by
    default, all the atlases store."""
    stored = min(A.meta.top_k, B.meta.top_k)
    if top_k is None:
        return stored
    if top_k < 1:
        raise FlashlensError(f"--top-k {top_k}: give 1 to {stored}")
    if top_k > stored:
        raise FlashlensError(
            f"--top-k {top_k}: the atlases store top-{stored} lists (at least one of them); "
            f"compare the first 1-{stored} of them, or map again with --top-k {top_k} --overwrite"
        )
    return top_k


def _matrix(name: str) -> Matrix:
    assert name in ("up", "gate", "down")
    return name  # type: ignore[return-value]


def _layer(atlas: Atlas, matrix: str, layer: int) -> dict[str, np.ndarray]:
    """One layer's top-k lists as (d_mlp, k) arrays and w_norm (d_mlp,), in neuron order."""
    table = atlas.layer_table(matrix, layer).select(["index", "top_ids", "top_probs", "w_norm"])
    n, k = atlas.meta.width(layer), atlas.meta.top_k
    index = table.column("index").to_numpy()
    if len(index) != n or not np.array_equal(index, np.arange(n)):
        raise AtlasError(
            f"{atlas.layer_path(matrix, layer)} does not hold neurons 0-{n - 1} in "
            "order; the atlas is damaged: map it again with --overwrite"
        )
    out = {"w_norm": table.column("w_norm").to_numpy()}
    for name in ("top_ids", "top_probs"):
        flat = pa.concat_arrays([c.flatten() for c in table.column(name).chunks]).to_numpy()
        if flat.size != n * k:
            raise AtlasError(
                f"{atlas.layer_path(matrix, layer)} has top lists of the wrong "
                f"length (atlas.json says top-k {k}); the atlas is damaged"
            )
        out[name] = flat.reshape(n, k)
    return out


# --- weights for the exact distance ----------------------------------------------------------
def _weights(
    A: Atlas, a: str | Path, B: Atlas, b: str | Path, distance: Distance, notes: list[str]
) -> tuple[Path, Path] | None:
    """Both models' folders when the exact distance is asked for (or possible, with auto)."""
    if distance == "atlas":
        return None
    found, why = [], []
    for label, atlas, arg in (("A", A, a), ("B", B, b)):
        folder, reason = _local_model(atlas, arg)
        found.append(folder)
        if reason:
            why.append(f"{label}: {reason}")
    if all(found):
        return found[0], found[1]  # type: ignore[return-value]
    msg = "; ".join(why)
    if distance == "exact":
        raise FlashlensError(
            f"the exact distance needs both models' weights ({msg}); pass the "
            "models themselves, or use --distance atlas"
        )
    notes.append(f"exact distance unavailable ({msg}): figures use the atlases' top-k bounds")
    return None


def _local_model(atlas: Atlas, arg: str | Path) -> tuple[Path | None, str]:
    """The folder of the weights this atlas decoded, if it is on this machine."""
    model = str(arg) if kind_of(arg) == "model" else atlas.meta.model
    folder = _local_folder(model)
    if folder is None:
        return None, f"{model} is not on this machine"
    try:
        source = ModelSource.open(folder)
    except FlashlensError as err:
        return None, f"{model} is unreadable ({err})"
    try:
        if source.config_hash != atlas.meta.config_hash:
            return None, f"{model}'s config.json changed since {atlas.root} was made"
    finally:
        source.close()
    return folder, ""


def _local_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:  # a hub id: only a snapshot already in the local cache, never a download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        return None
