"""Writing an atlas layer by layer, resumably.

The resume state (`.state/reverse.safetensors`) holds the reverse index over exactly the layers
named in its metadata. A layer counts as done only when its Parquet file exists AND the state
names it, so a run killed between the two writes redoes that layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from ..decode.engine import BlockResult
from ..decode.reverse import ReverseIndex
from ..errors import AtlasError
from .atlas import Atlas
from .format import (
    LAYER_SCHEMA,
    META,
    REVERSE,
    REVERSE_SCHEMA,
    STATE_DIR,
    TOKENIZER,
    TOKENS,
    AtlasMeta,
    atlas_files,
    atomic_write,
    is_model_folder,
    layer_file,
    read_meta,
    remove_atlas,
    remove_temporary,
    write_json,
)

STATE = "reverse.safetensors"


def _canonical(setting: str, value: Any) -> Any:
    """A setting as compared between runs: the matrices as a set (their order is not a
    setting)."""
    return sorted(value) if setting == "matrices" and isinstance(value, list) else value


def _key(matrix: str, layer: int) -> str:
    return f"{matrix}:{layer}"


class AtlasWriter:
    def __init__(
        self,
        root: Path,
        meta: AtlasMeta,
        overwrite: bool = False,
        dtype_asked: str | None = None,
    ) -> None:
        """Start or resume the atlas at `root`. A resumed run (layers already written) computes
        as the interrupted one did: `meta` takes its compute dtype and pilot report, and a
        `dtype_asked` (an explicit --dtype, None for auto) that differs from it is refused,
        before anything is written: one atlas never mixes dtypes."""
        self.root, self.meta = root, meta
        self.already_complete = False
        self.done: set[str] = set()  # layers recorded in the resume state
        self._written: set[str] = set()  # layers written since, not yet recorded
        self.seconds_before = 0.0  # mapping time of earlier runs, up to their last save
        old = self._existing_meta(overwrite)
        self.existing = None if overwrite else old  # the atlas found in the folder, if any
        if old is not None and not overwrite:
            diff = {
                k: (v, meta.settings()[k])
                for k, v in old.settings().items()
                if _canonical(k, v) != _canonical(k, meta.settings()[k])
                and not (k == "decoding" and v is None)  # (unrecorded: see map's checks)
            }
            if diff:
                what = "; ".join(
                    f"{k}: atlas has {a!r}, this run asks {b!r}" for k, (a, b) in diff.items()
                )
                raise AtlasError(
                    f"{root} holds an atlas made with other settings ({what}); "
                    "pass --overwrite to replace it, or choose another -o folder"
                )
            if old.complete:
                Atlas(root, old).check_files()  # a damaged atlas is not "already complete"
            self.already_complete = old.complete
            if not old.complete:
                meta.created = old.created
        if overwrite:
            remove_atlas(root)  # the atlas's own files only (validation.parquet included)
        elif not self.already_complete:
            remove_temporary(root)  # half-written files of an interrupted run
        self.done = self._load_done()
        if self.done and old is not None and not self.already_complete:
            if dtype_asked is not None and dtype_asked != old.compute_dtype:
                raise AtlasError(
                    f"{root} holds an interrupted map computed in {old.compute_dtype}; this run "
                    f"asks --dtype {dtype_asked}. Rerun with --dtype {old.compute_dtype} (or "
                    "auto) to resume it, or pass --overwrite to start again"
                )
            meta.compute_dtype, meta.pilot = old.compute_dtype, old.pilot
            meta.int8_kernel = old.int8_kernel  # (the run records its own beside it: _map)
        if not self.already_complete:
            write_json(root / META, meta.to_dict())

    def _existing_meta(self, overwrite: bool) -> AtlasMeta | None:
        """The atlas already in the folder, None when there is none (or `overwrite` replaces
        one whose atlas.json is missing or unreadable); refuses a folder of other files."""
        if not self.root.exists():
            return None
        if not self.root.is_dir():
            raise AtlasError(f"{self.root} is a file; choose a folder for the atlas")
        if is_model_folder(self.root):
            raise AtlasError(
                f"{self.root} is a model folder (it has config.json); choose another -o "
                "folder for the atlas, such as atlas/<model name>"
            )
        path = self.root / META
        if not path.is_file():
            own = atlas_files(self.root)
            if own and not overwrite:
                names = ", ".join(str(p.relative_to(self.root)) for p in own[:3])
                raise AtlasError(
                    f"{self.root} holds atlas files ({names}{', ...' if len(own) > 3 else ''}) "
                    f"but no {META}; pass --overwrite to map again into it (other files in "
                    "it are kept)"
                )
            if not own and any(self.root.iterdir()):
                raise AtlasError(
                    f"{self.root} is not empty and holds no atlas; choose an empty or new folder"
                )
            return None
        try:
            return read_meta(path)
        except (ValueError, OSError) as err:
            if overwrite:
                return None
            raise AtlasError(
                f"{path} is unreadable ({err}); pass --overwrite to map again into {self.root}"
            ) from None

    def save_meta(self) -> None:
        """Rewrite atlas.json after a change to `meta` (the pilot's decision, for example)."""
        write_json(self.root / META, self.meta.to_dict())

    # --- progress ----------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.root / STATE_DIR / STATE

    def _load_done(self) -> set[str]:
        path = self._state_path()
        if not path.is_file():
            return set()
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            saved = fh.metadata() or {}
        named = set(json.loads(saved.get("done", "[]")))
        self.seconds_before = float(saved.get("seconds", 0.0))
        return {k for k in named if layer_file(self.root, *_split(k)).is_file()}

    def is_done(self, matrix: str, layer: int) -> bool:
        return _key(matrix, layer) in self.done

    def load_reverse(self, reverse: ReverseIndex) -> None:
        if self.done:
            reverse.load(load_file(str(self._state_path())))

    # --- writing -----------------------------------------------------------------------
    def has_tokens(self) -> bool:
        return (self.root / TOKENS).is_file()

    def write_tokens(self, table: pa.Table) -> None:
        atomic_write(self.root / TOKENS, lambda tmp: pq.write_table(table, tmp))

    def keep_tokenizer(self, model_folder: Path) -> None:
        """Copy the model's tokenizer.json into the atlas (when it has one): search splits a
        concept as the model does even once the model folder has moved or gone."""
        src = model_folder / TOKENIZER
        if src.is_file() and not (self.root / TOKENIZER).is_file():
            atomic_write(self.root / TOKENIZER, lambda tmp: shutil.copyfile(src, tmp))

    def write_layer(self, matrix: str, layer: int, results: list[BlockResult]) -> None:
        table = layer_table(matrix, layer, results)
        atomic_write(layer_file(self.root, matrix, layer), lambda tmp: pq.write_table(table, tmp))
        self._written.add(_key(matrix, layer))

    def commit(self, state: dict[str, torch.Tensor], seconds: float = 0.0) -> None:
        """Record the layers written so far as done, together with the reverse index that
        includes them (its `ReverseIndex.state()` taken right after the last of them), and
        the `seconds` this run had mapped for by then. A layer written but not yet committed is
        mapped again by a resumed run."""
        self.done |= self._written
        self._written.clear()
        total = self.seconds_before + seconds
        meta = {"done": json.dumps(sorted(self.done)), "seconds": f"{total:.3f}"}
        atomic_write(self._state_path(), lambda tmp: save_file(state, str(tmp), metadata=meta))

    def finish(
        self, reverse: ReverseIndex, seconds: float, audit: dict[str, Any] | None = None
    ) -> None:
        table = reverse_table(reverse, self.meta)
        atomic_write(self.root / REVERSE, lambda tmp: pq.write_table(table, tmp))
        self.meta.complete = True
        self.meta.seconds = round(self.seconds_before + seconds, 3)  # over every run
        if audit is not None:
            self.meta.audit = audit
        write_json(self.root / META, self.meta.to_dict())
        shutil.rmtree(self.root / STATE_DIR, ignore_errors=True)


def _split(key: str) -> tuple[str, int]:
    matrix, layer = key.split(":")
    return matrix, int(layer)


def layer_table(matrix: str, layer: int, results: list[BlockResult]) -> pa.Table:
    r = BlockResult.cat(results)
    n = r.logsumexp.shape[0]
    cols: dict[str, object] = {
        "layer": pa.array([layer] * n, pa.int16()),
        "matrix": pa.array([matrix] * n, pa.string()),
        "index": pa.array(range(n), pa.int32()),
    }
    for name in ("top_ids", "top_probs", "top_logits", "bottom_ids", "bottom_logits"):
        values = getattr(r, name)  # (n, k)
        flat = pa.array(values.reshape(-1).numpy())
        offsets = pa.array(range(0, values.numel() + 1, values.shape[1]), pa.int32())
        cols[name] = pa.ListArray.from_arrays(offsets, flat)
    for name in (
        "logsumexp",
        "entropy",
        "w_norm",
        "logit_mean",
        "logit_std",
        "logit_skew",
        "logit_kurtosis",
    ):
        cols[name] = pa.array(getattr(r, name).numpy())
    return pa.table(cols, schema=LAYER_SCHEMA)


def reverse_table(reverse: ReverseIndex, meta: AtlasMeta) -> pa.Table:
    state = reverse.state()  # (N', V) each, N' >= N (a low-precision map keeps spares)
    logp, logit, ref = state["logp"], state["logit"], state["ref"]
    order = logp.argsort(dim=0, descending=True)[: meta.reverse_n]  # the best N, best first
    logp, logit, ref = logp.gather(0, order), logit.gather(0, order), ref.gather(0, order)
    N, V = logp.shape
    keep = (ref >= 0).T.reshape(-1)  # token-major
    token = torch.arange(V).repeat_interleave(N)[keep]
    rank = torch.arange(N).repeat(V)[keep]
    ref_t = ref.T.reshape(-1)[keep]
    index = ref_t % meta.d_mlp
    layer = (ref_t // meta.d_mlp) % meta.n_layers
    matrix_code = ref_t // (meta.d_mlp * meta.n_layers)
    names = pa.array(["up", "gate", "down"])
    return pa.table(
        {
            "token_id": pa.array(token.numpy().astype("int32")),
            "rank": pa.array(rank.numpy().astype("int16")),
            "layer": pa.array(layer.numpy().astype("int16")),
            "matrix": names.take(pa.array(matrix_code.numpy())),
            "index": pa.array(index.numpy().astype("int32")),
            "prob": pa.array(logp.T.reshape(-1)[keep].exp().numpy()),
            "logit": pa.array(logit.T.reshape(-1)[keep].numpy()),
        },
        schema=REVERSE_SCHEMA,
    )


MATRIX_CODE = {"up": 0, "gate": 1, "down": 2}


def neuron_ref(matrix: str, layer: int, n_layers: int, d_mlp: int) -> int:
    """Global id of a layer's first neuron in the reverse index (add the neuron index)."""
    return (MATRIX_CODE[matrix] * n_layers + layer) * d_mlp
