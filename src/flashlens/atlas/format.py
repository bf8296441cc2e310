"""The on-disk atlas: `atlas.json` + Parquet tables, written atomically.

    ATLAS/
      atlas.json                 AtlasMeta; "complete": true only once every table is written
      tokens.parquet             token_id, token (as the tokenizer shows it), text (decoded)
      up/layer_012.parquet       one row per neuron (see LAYER_SCHEMA); also gate/, down/
      reverse.parquet            token_id, rank, layer, matrix, index, prob, logit
      validation.parquet         written by `flashlens validate` (intervene/validate.py)
      .state/                    resume state of an unfinished run (removed when complete)

These are the atlas's own files (`atlas_files`): `map --overwrite` removes them and keeps
anything else in the folder. A model folder (one with a config.json) is never an atlas: its
tokenizer.json is the model's.

A file is written to a dot-prefixed temporary name in its folder and renamed into place, so a
half-written file never carries a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
META = "atlas.json"
TOKENS = "tokens.parquet"
REVERSE = "reverse.parquet"
VALIDATION = "validation.parquet"  # written by `flashlens validate`, derived from the atlas
TOKENIZER = "tokenizer.json"  # the model's tokenizer, kept with the atlas (search splits text)
STATE_DIR = ".state"
MATRIX_DIRS = ("up", "gate", "down")

MODEL_CONFIG = "config.json"  # marks a model folder, which is never an atlas

# Final names of the atlas's own files, in its root and in its matrix folders. A temporary file
# of `atomic_write` is the final name between "." and ".<random>.tmp". The tokenizer copy counts
# only beside the others: alone, a tokenizer.json is not a sign of an atlas.
_ROOT_NAMES = "|".join(re.escape(n) for n in (META, TOKENS, REVERSE, VALIDATION))
_KEPT_NAMES = re.escape(TOKENIZER)
_LAYER_NAMES = r"layer_\d{3,}\.parquet"


def layer_file(root: Path, matrix: str, layer: int) -> Path:
    return root / matrix / f"layer_{layer:03d}.parquet"


def _own(name: str, names: str) -> bool:
    return re.fullmatch(rf"(?:{names})|\.(?:{names})\..+\.tmp", name) is not None


def is_model_folder(root: Path) -> bool:
    """A folder holding a model (its config.json) and no atlas.json: `map` never writes an
    atlas into it, and its files are never taken for a damaged atlas's. (An atlas that has a
    config.json beside it is still an atlas.)"""
    return (root / MODEL_CONFIG).is_file() and not (root / META).is_file()


def atlas_files(root: Path) -> list[Path]:
    """The atlas's own files found in `root` (atlas.json, its tables, validation.parquet, the
    tokenizer copy, the resume state and temporary files of interrupted writes); anything else
    is the user's. A model folder holds none."""
    if not root.is_dir() or is_model_folder(root):
        return []
    found = [p for p in root.iterdir() if p.is_file() and _own(p.name, _ROOT_NAMES)]
    if (root / STATE_DIR).is_dir():
        found.append(root / STATE_DIR)
    for sub in MATRIX_DIRS:
        if (root / sub).is_dir():
            found += [
                p for p in (root / sub).iterdir() if p.is_file() and _own(p.name, _LAYER_NAMES)
            ]
    if found and not (root / MODEL_CONFIG).is_file():  # (beside a config.json: the model's)
        found += [p for p in root.iterdir() if p.is_file() and _own(p.name, _KEPT_NAMES)]
    return sorted(found)


def remove_temporary(root: Path) -> None:
    """Delete the temporary files interrupted writes left in `root` (never a final name)."""
    for path in atlas_files(root):
        if path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)


def remove_atlas(root: Path) -> None:
    """Delete the atlas's own files in `root` (and its matrix folders once empty); the user's
    other files stay."""
    for path in atlas_files(root):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for sub in MATRIX_DIRS:
        if (root / sub).is_dir() and not any((root / sub).iterdir()):
            (root / sub).rmdir()


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(t)


LAYER_SCHEMA = pa.schema(
    [
        ("layer", pa.int16()),
        ("matrix", pa.string()),
        ("index", pa.int32()),
        ("top_ids", _list(pa.int32())),
        ("top_probs", _list(pa.float32())),
        ("top_logits", _list(pa.float32())),
        ("bottom_ids", _list(pa.int32())),
        ("bottom_logits", _list(pa.float32())),
        ("logsumexp", pa.float32()),
        ("entropy", pa.float32()),
        ("w_norm", pa.float32()),
        ("logit_mean", pa.float32()),
        ("logit_std", pa.float32()),
        ("logit_skew", pa.float32()),
        ("logit_kurtosis", pa.float32()),
    ]
)

REVERSE_SCHEMA = pa.schema(
    [
        ("token_id", pa.int32()),
        ("rank", pa.int16()),
        ("layer", pa.int16()),
        ("matrix", pa.string()),
        ("index", pa.int32()),
        ("prob", pa.float32()),
        ("logit", pa.float32()),
    ]
)

TOKENS_SCHEMA = pa.schema([("token_id", pa.int32()), ("token", pa.string()), ("text", pa.string())])


@dataclass
class AtlasMeta:
    """Everything needed to know exactly how an atlas was made."""

    model: str  # hub id as given, or the local model folder as an absolute path
    config_hash: str
    architecture: str
    family: str
    d_model: int
    d_mlp: int
    n_layers: int
    d_vocab: int
    matrices: list[str]
    layers: list[int]
    norm: str
    top_k: int
    reverse_n: int
    weight_dtype: str
    compute_dtype: str
    flashlens_version: str
    created: str
    complete: bool = False
    format_version: int = FORMAT_VERSION
    seconds: float | None = None
    audit: dict[str, Any] | None = None  # decode.audit: the last run's sample vs exact fp32
    pilot: dict[str, Any] | None = None  # decode.pilot: how the low-precision GEMM was checked
    extra: dict[str, Any] = field(default_factory=dict)
    # Checkpoint.fingerprint of the weights mapped (None: an atlas from before it was recorded)
    weights_fingerprint: str | None = None
    # How the final norm and W_U were applied, as resolved from config.json and the family's
    # defaults: {"norm_eps", "logit_softcap" (None: no cap), "tied", and where they apply
    # "norm_kind" ("layer"), "logit_scale" (the factor on the logits), "logit_bias" (true:
    # the head adds a bias), "experts" (a mixture of experts: neuron e * d_expert + i is unit
    # i of expert e, d_expert = (width - shared_expert) / experts), "shared_expert" (the
    # width of a shared expert, whose units come last) and "dense_layers" (a mixture's dense
    # MLP layers)}. None: an atlas from
    # before it was recorded (then only config_hash says it).
    decoding: dict[str, Any] | None = None
    # Neurons per matrix of each of the model's layers, where they differ (a mixture of experts
    # with dense layers); None: d_mlp in every layer. d_mlp is then the widest layer's.
    widths: list[int] | None = None
    # The CPU int8 kernel that computed it (decode.int8: "amx", "int_mm" or "u7", whose neuron
    # vectors are rounded to 7 bits, not 8); "a, b" when a resumed run continued on another
    # CPU's kernel. None: not int8 on a CPU, or an atlas from before it was recorded.
    int8_kernel: str | None = None
    # How the checkpoint's weights were quantised, e.g. "fp8 e4m3, 128 x 128 blocks": the map
    # decoded them dequantized, in weight_dtype (fp32 for FP8, the scales' dtype or fp32 for
    # compressed-tensors, bf16 for MXFP4). None: stored unquantised.
    quantization: str | None = None

    def width(self, layer: int) -> int:
        """Layer `layer`'s neurons per matrix."""
        return self.d_mlp if self.widths is None else int(self.widths[layer])

    # Fields that define the result: a rerun must match them to resume.
    SETTINGS = (
        "config_hash",
        "matrices",
        "layers",
        "norm",
        "top_k",
        "reverse_n",
        "d_vocab",
        "decoding",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AtlasMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SETTINGS}


def read_meta(path: Path) -> AtlasMeta:
    """An atlas.json; ValueError when it is not valid JSON or not an atlas's description."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    try:
        return AtlasMeta.from_dict(data)
    except TypeError as err:
        raise ValueError(str(err)) from None


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask sets it too, so not on a thread


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename over `path`.
    The file gets the permissions of any new file (0666 less the umask), not mkstemp's 0600:
    an atlas is shared (a server run by another user, a colleague's copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
