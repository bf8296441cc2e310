"""The two sides of a comparison: atlas folders, or models mapped (or reused) with one setting.

An argument is an atlas when its folder holds atlas.json, a model when its folder holds
config.json or it reads like a Hugging Face id (org/name). Models are mapped into OUT/<name>;
a complete atlas already there that covers the request is reused as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..atlas import Atlas, AtlasMeta, format_layers, parse_layers
from ..atlas.atlas import LayerSpec
from ..atlas.format import META
from ..checks import require_path
from ..errors import AtlasError, FlashlensError
from ..families import MATRICES
from ..mapping import map_model, parse_matrices
from ..weights import ModelSource

Kind = Literal["atlas", "model"]


@dataclass
class Request:
    """What to compare and, for models, how to map them (None: from the other atlas or default)."""

    matrices: str | list[str] | None = None
    layers: LayerSpec | None = None
    top_k: int | None = None
    norm: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"
    block: int | None = None
    overwrite: bool = False  # replace an atlas in `out` made with other settings
    progress: bool = False


def kind_of(arg: str | Path) -> Kind:
    path = Path(require_path(arg, "model or atlas to compare")).expanduser()
    if path.is_dir():
        if (path / META).is_file():
            return "atlas"
        if (path / "config.json").is_file():
            return "model"
        raise FlashlensError(
            f"{path} is neither an atlas (no {META}) nor a model folder (no config.json)"
        )
    if path.exists():
        raise FlashlensError(
            f"{path} is a file; pass an atlas folder, a model folder or a Hugging Face id"
        )
    text = str(arg)
    if not text.startswith((".", "/", "~")) and text.count("/") == 1 and all(text.split("/")):
        return "model"
    raise FlashlensError(
        f"{text} does not exist: pass an atlas folder, a model folder or a "
        "Hugging Face id (org/name)"
    )


def open_pair(
    a: str | Path, b: str | Path, out: str | Path | None, req: Request
) -> tuple[Atlas, Atlas]:
    """Both sides as atlases, mapping the model arguments into `out` first."""
    kinds = (kind_of(a), kind_of(b))
    atlases = [Atlas.open(x) if k == "atlas" else None for x, k in zip((a, b), kinds, strict=True)]
    models = [x for x, k in zip((a, b), kinds, strict=True) if k == "model"]
    if not models:
        return atlases[0], atlases[1]  # type: ignore[return-value]
    if out is None:
        raise FlashlensError(
            f"{models[0]} is a model: pass -o DIR to map it first (its atlas "
            "goes to DIR/<name>, and is reused when already there)"
        )
    template = next((x.meta for x in atlases if x is not None), None)
    names = atlas_names(a, b)
    for i, (x, k) in enumerate(zip((a, b), kinds, strict=True)):
        if k == "model":
            atlases[i] = map_side(x, Path(out) / names[i], req, template)
    return atlases[0], atlases[1]  # type: ignore[return-value]


def atlas_names(a: str | Path, b: str | Path) -> tuple[str, str]:
    """Folder names for the two models' atlases: their last path parts, made distinct."""
    if _same_model(str(a), str(b)):
        name = _parts(a)[-1]
        return name, name
    pa, pb = _parts(a), _parts(b)
    for n in range(1, max(len(pa), len(pb)) + 1):
        na, nb = "-".join(pa[-n:]), "-".join(pb[-n:])
        if na != nb:
            return na, nb
    return f"{pa[-1]}-a", f"{pb[-1]}-b"


def _parts(model: str | Path) -> list[str]:
    path = Path(model).expanduser()
    parts = path.resolve().parts if path.exists() else Path(str(model)).parts
    return [p for p in parts if p not in ("/", "")] or ["model"]


def _same_model(x: str, y: str) -> bool:
    px, py = Path(x).expanduser(), Path(y).expanduser()
    if px.exists() and py.exists():
        return px.resolve() == py.resolve()
    return x == y


def map_side(model: str | Path, target: Path, req: Request, template: AtlasMeta | None) -> Atlas:
    """The atlas of `model` at `target`: reused when complete and covering, else mapped."""
    source = ModelSource.open(model)
    try:
        available = source.family.matrices
        n_layers = source.n_layers
    finally:
        source.close()
    if req.matrices is not None:
        matrices = parse_matrices(req.matrices, available)
    elif template is not None:
        matrices = [m for m in template.matrices if m in available]
    else:
        matrices = list(available)
    if req.layers is not None:
        layers = parse_layers(req.layers, n_layers)
    elif template is not None:
        layers = [x for x in template.layers if x < n_layers] or list(range(n_layers))
    else:
        layers = list(range(n_layers))
    top_k = req.top_k if req.top_k is not None else (template.top_k if template else 10)
    norm = req.norm if req.norm is not None else (template.norm if template else "model")
    old = _existing(target)
    if old is not None:
        if not _same_model(old.model, str(model)):
            raise AtlasError(
                f"{target} holds an atlas of another model ({old.model}); choose another -o folder"
            )
        if (
            old.complete
            and old.top_k == top_k
            and old.norm == norm
            and set(matrices) <= set(old.matrices)
            and set(layers) <= set(old.layers)
        ):
            return Atlas.open(target)
    map_model(
        model,
        target,
        matrices=list(matrices),
        layers=format_layers(layers),
        top_k=top_k,
        norm=norm,
        device=req.device,
        dtype=req.dtype,
        compile=req.compile,
        block=req.block,
        overwrite=req.overwrite,
        progress=req.progress,
    )
    return Atlas.open(target)


def _existing(target: Path) -> AtlasMeta | None:
    path = target / META
    if not path.is_file():
        return None
    try:
        return AtlasMeta.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # map_model reports the damaged file


# --- compatibility ---------------------------------------------------------------------------
SAME = (
    "architecture",
    "family",
    "d_model",
    "d_mlp",
    "widths",
    "n_layers",
    "d_vocab",
    "top_k",
    "norm",
)
LABELS = {"d_vocab": "vocabulary size", "top_k": "top-k", "norm": "norm mode"}


def check_compatible(a: Atlas, b: Atlas, top_k: int | None = None) -> None:
    """Refuse atlases whose figures would not be comparable, saying everything that differs.
    With `top_k` (the first K of each list are compared) their stored k may differ."""
    diffs = [
        f"{LABELS.get(f, f)}: A has {getattr(a.meta, f)!r}, B has {getattr(b.meta, f)!r}"
        + (" (or compare the first K of both lists with --top-k K)" if f == "top_k" else "")
        for f in SAME
        if getattr(a.meta, f) != getattr(b.meta, f) and not (f == "top_k" and top_k is not None)
    ]
    if diffs:
        raise AtlasError(
            f"cannot compare {a.root} (A) with {b.root} (B): "
            + "; ".join(diffs)
            + ". Map both with the same settings and a model of the same shape"
        )
    for what, ta, tb in (("tokens", a.tokens, b.tokens), ("decoded texts", a.texts, b.texts)):
        differ = [i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y]
        if differ or len(ta) != len(tb):
            i = differ[0] if differ else min(len(ta), len(tb))
            ex = f"id {i}: {_at(ta, i)!r} vs {_at(tb, i)!r}"
            raise AtlasError(
                f"cannot compare {a.root} with {b.root}: different tokenizers "
                f"({len(differ)} token ids have different {what}, e.g. {ex}); "
                "neurons only compare over an identical vocabulary"
            )


def _at(xs: list[str], i: int) -> str:
    return xs[i] if i < len(xs) else "(none)"


def common_scope(
    a: Atlas, b: Atlas, matrices: str | list[str] | None, layers: LayerSpec | None
) -> tuple[list[str], list[int], list[str]]:
    """Matrices and layers present in both atlases (and asked for), plus notes on the rest."""
    notes: list[str] = []
    both_m: list[str] = [m for m in MATRICES if m in a.meta.matrices and m in b.meta.matrices]
    both_l = sorted(set(a.meta.layers) & set(b.meta.layers))
    for label, atlas, other in (("A", a, b), ("B", b, a)):
        # (what the user left out with --matrix or --layers is not worth a note)
        only_m = [m for m in atlas.meta.matrices if m not in other.meta.matrices and not matrices]
        only_l = sorted(set(atlas.meta.layers) - set(other.meta.layers)) if layers is None else []
        if only_m:
            notes.append(f"matrices only in {label} ({atlas.root}): {', '.join(only_m)}; skipped")
        if only_l:
            notes.append(f"layers only in {label} ({atlas.root}): {format_layers(only_l)}; skipped")
    if matrices is not None:
        asked = parse_matrices(matrices, MATRICES)
        missing = [m for m in asked if m not in both_m]
        if missing:
            raise AtlasError(
                f"matrix {', '.join(missing)} is not in both atlases; both have "
                f"{', '.join(both_m) or 'no common matrix'}"
            )
        both_m = [m for m in both_m if m in asked]
    if layers is not None:
        asked_l = parse_layers(layers, a.meta.n_layers)
        missing_l = [x for x in asked_l if x not in both_l]
        if missing_l:
            raise AtlasError(
                f"layers {format_layers(missing_l)} are not in both atlases; both "
                f"have {format_layers(both_l) or 'no common layer'}"
            )
        both_l = asked_l
    if not both_m or not both_l:
        raise AtlasError(
            f"{a.root} and {b.root} have no matrix and layer in common "
            f"(A: {', '.join(a.meta.matrices)} layers {format_layers(a.meta.layers)}; "
            f"B: {', '.join(b.meta.matrices)} layers {format_layers(b.meta.layers)})"
        )
    return both_m, both_l, notes
