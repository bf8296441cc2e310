"""`map_model`: decode every MLP neuron of a model through its LM-head into an atlas."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, heap
from .atlas.atlas import Atlas, LayerSpec, parse_layers, read_parquet
from .atlas.format import META, TOKENIZER, AtlasMeta, layer_file, read_meta
from .atlas.prob import norms_agree
from .atlas.tokens import tokens_table
from .atlas.writer import AtlasWriter, neuron_ref
from .decode.audit import AuditSample, run_audit
from .decode.engine import BlockResult, Decoder, rows_dtype, warm_up
from .decode.norm import NORM_MODES
from .decode.pilot import PILOT, run_pilot
from .decode.policy import (
    DTYPES,
    block_size,
    check_gemm_dtype,
    dtype_label,
    fallback_dtype,
    resolve_device,
    resolve_dtype,
    use_compile,
)
from .decode.reverse import ReverseIndex
from .errors import AtlasError, FlashlensError
from .families import MATRICES, Matrix
from .progress import progress_bar, status
from .weights import ModelSource

# How often a map saves its resume state: a save costs ~0.3 s of a core at Llama-3.1-8B shapes
# (the reverse table, fsynced), against ~14 s per layer on a 2-core CPU and milliseconds on a GPU
COMMIT_SECONDS = 30.0
# The next layer is read while one maps, so two layers' matrices are held at once, unless a
# matrix is larger than this share of the machine's memory: then one at a time, losing the
# read's overlap (a few per cent) so that the largest mixtures fit (DeepSeek-V3's up matrix:
# 526,336 neurons x 7,168, 7.5 GB in bf16 and 15 GB read from its FP8 release in fp32).
READ_AHEAD_SHARE = 0.25


@dataclass
class MapSummary:
    atlas: Path
    neurons_mapped: int  # in this run
    neurons_skipped: int  # already in the atlas (resumed)
    seconds: float
    device: str
    compute_dtype: str
    block_size: int
    compiled: bool
    audit: dict[str, Any] | None = None  # decode.audit.Audit of this run's sample
    pilot: dict[str, Any] | None = None  # decode.pilot.PilotReport (low precision only)
    warnings: list[str] = field(default_factory=list)  # one line each, for the user
    # the CPU's int8 kernel when this run computed in int8 (decode.int8: "amx", "int_mm" or
    # "u7"; "u7" rounds the neuron vectors to 7 bits), else None
    int8_kernel: str | None = None
    # how the checkpoint's weights were quantised, as atlas.json records it (None: they were
    # not): "int4, one scale per 128 columns of a row"
    quantization: str | None = None

    @property
    def neurons_per_second(self) -> float:
        return self.neurons_mapped / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "atlas": str(self.atlas),
            "neurons_mapped": self.neurons_mapped,
            "neurons_skipped": self.neurons_skipped,
            "seconds": round(self.seconds, 3),
            "neurons_per_second": round(self.neurons_per_second, 1),
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "int8_kernel": self.int8_kernel,
            "quantization": self.quantization,
            "block_size": self.block_size,
            "compiled": self.compiled,
            "audit": self.audit,
            "pilot": self.pilot,
            "warnings": self.warnings,
        }


def _record_int8_kernel(meta: AtlasMeta, summary: MapSummary, resumed: bool) -> None:
    """atlas.json records the int8 kernel that computed the atlas; a resumed run on another
    CPU's kernel adds its own, and warns where the two round the neuron vectors differently
    ("u7": 7 bits; "amx" and "int_mm": 8, the same products)."""
    old, new = meta.int8_kernel, summary.int8_kernel
    if not resumed or old is None:
        meta.int8_kernel = new
        return
    kernels = old.split(", ")
    if new is None or new in kernels:
        return
    meta.int8_kernel = f"{old}, {new}"
    if ("u7" in kernels) != (new == "u7"):
        summary.warnings.append(
            f"this atlas was begun with the int8 kernel {old} and continued with {new}, which "
            "rounds the neuron vectors to a different number of bits (u7: 7, the others: 8), "
            "so its layers differ in rounding; pass --overwrite to map it on one kernel"
        )


def parse_matrices(spec: str | list[str], available: tuple[str, ...]) -> list[Matrix]:
    """The matrices asked for ("all": every one the family has), in the family's order (up,
    gate, down) whatever order they were given in: a run maps, samples and records them the
    same way for any spelling."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(available)  # type: ignore[arg-type]
    bad = [n for n in names if n not in available]
    absent = [n for n in bad if n in MATRICES]
    if absent:
        raise FlashlensError(
            f"this model's MLP has no {', '.join(absent)} matrix (it is ungated, "
            f"down(act(up(x)))): choose from {', '.join(available)}, or all"
        )
    if bad or not names:
        raise FlashlensError(
            f"unknown matrix {', '.join(bad) or '(none)'}: choose from {', '.join(available)}"
        )
    return [m for m in available if m in names]  # type: ignore[misc]


def map_model(
    model: str | Path,
    out: str | Path,
    *,
    matrices: str | list[str] = "all",
    layers: LayerSpec | None = None,
    top_k: int = 10,
    norm: str = "model",
    reverse_n: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    block: int | None = None,
    compile: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    audit: int = 32,
    pilot: int = PILOT,
) -> MapSummary:
    """Map neurons of `model` (hub id or folder) into the atlas folder `out`.

    Rerunning the same call resumes an interrupted run; other settings are refused unless
    `overwrite`. `audit` neurons of those mapped, drawn with a fixed seed, are decoded again
    exactly in fp32 and compared (`summary.audit`, also in atlas.json; 0 skips it). Before a
    low-precision map, `pilot` neurons check the GEMM first and decide how to compute
    (decode.pilot; `summary.pilot`; 0 skips it). Returns a summary (with `warnings`: no
    tokenizer, all-zero or non-finite neurons); open the result with `Atlas.open(out)`.
    """
    if norm not in NORM_MODES:
        raise FlashlensError(f"unknown norm mode {norm!r}: choose from {', '.join(NORM_MODES)}")
    if top_k < 1 or reverse_n < 1:
        raise FlashlensError("--top-k and --reverse-n must be at least 1")
    if audit < 0:
        raise FlashlensError("--audit must be 0 (off) or a number of neurons to check")
    if pilot < 0:
        raise FlashlensError("--pilot must be 0 (off) or a number of neurons to check")
    if block is not None and block < 1:
        raise FlashlensError(
            f"--block {block} is not a number of neurons: give at least 1, or leave it out "
            "(a size from the vocabulary)"
        )
    if compile not in ("auto", "on", "off"):
        raise FlashlensError(f"unknown --compile {compile!r}: use auto, on or off")
    source = ModelSource.open(model)
    try:
        return _map(
            source,
            Path(out),
            parse_matrices(matrices, source.family.matrices),
            parse_layers(layers, source.n_layers)
            if layers is not None
            else list(range(source.n_layers)),
            top_k,
            norm,
            reverse_n,
            device,
            dtype,
            block,
            compile,
            overwrite,
            progress,
            audit,
            pilot,
        )
    finally:
        source.close()


def _map(
    source: ModelSource,
    out: Path,
    matrices: list[Matrix],
    layers: list[int],
    top_k: int,
    norm: str,
    reverse_n: int,
    device_name: str,
    dtype_name: str,
    block: int | None,
    compile_mode: str,
    overwrite: bool,
    progress: bool,
    audit: int,
    pilot: int,
) -> MapSummary:
    start = time.perf_counter()
    commit_every = commit_interval()  # (a bad setting fails before any work)
    device = resolve_device(device_name)
    if top_k > source.d_vocab:
        raise FlashlensError(f"--top-k {top_k} exceeds the vocabulary size {source.d_vocab}")
    # GEMM work of the whole job (a resumed run decides as the first run did)
    widths = source.widths  # each layer's neurons per matrix
    neurons = len(matrices) * sum(widths[layer] for layer in layers)
    flops = 2.0 * neurons * source.d_vocab * source.d_model
    compute_dtype = resolve_dtype(dtype_name, source.run_dtype, device, flops)
    if dtype_name != "auto":
        check_gemm_dtype(compute_dtype, device, flops)
    fingerprint = source.fingerprint()
    meta = AtlasMeta(
        model=source.model,
        config_hash=source.config_hash,
        architecture=(source.config.get("architectures") or ["?"])[0],
        family=source.family.name,
        d_model=source.d_model,
        d_mlp=source.d_mlp,
        n_layers=source.n_layers,
        d_vocab=source.d_vocab,
        matrices=list(matrices),
        layers=layers,
        norm=norm,
        top_k=top_k,
        reverse_n=reverse_n,
        weight_dtype=dtype_label(source.dtype),
        quantization=source.quantization,
        compute_dtype=dtype_label(compute_dtype),
        flashlens_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        weights_fingerprint=fingerprint,
        decoding=_decoding(source),
        widths=widths if len(set(widths)) > 1 else None,
    )
    if not overwrite:
        _check_same_model(out, source, fingerprint)
    asked = None if dtype_name == "auto" else dtype_label(compute_dtype)
    writer = AtlasWriter(out, meta, overwrite=overwrite, dtype_asked=asked)
    resumed = bool(writer.done)  # then meta holds the interrupted run's dtype and pilot
    compute_dtype = DTYPES[meta.compute_dtype]
    B = block_size(source.d_vocab, source.d_mlp, device, block)
    every = [(m, layer) for m in matrices for layer in layers]  # the whole job, as on a first run
    jobs = [job for job in every if not writer.is_done(*job)]
    total = neurons
    todo = sum(widths[layer] for _, layer in jobs)
    compiled = use_compile(compile_mode, device, todo * source.d_vocab)
    summary = MapSummary(out, 0, total - todo, 0.0, str(device), meta.compute_dtype, B, compiled)
    summary.quantization = source.quantization
    if writer.already_complete:
        summary.neurons_skipped = total
        summary.seconds = time.perf_counter() - start
        assert writer.existing is not None
        made_in = summary.compute_dtype = writer.existing.compute_dtype
        if asked is not None and asked != made_in:
            summary.warnings.append(
                f"the atlas was computed in {made_in}, not in the --dtype {asked} asked for; "
                f"pass --overwrite to map it again in {asked}"
            )
        return summary
    load = lambda job: _load(source, job, device)  # noqa: E731
    # The audit's sample is drawn over the whole job, as on a first run: a resumed run checks
    # the same neurons, those of layers mapped before the interruption read from their files.
    sample = AuditSample([widths[layer] for _, layer in every], audit)
    place = {job: j for j, job in enumerate(every)}
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlens-read") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlens-head") as head_pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlens-write") as write_pool,
    ):
        # Start-up work overlaps: the first layer and the LM-head (+ its row mean) are read on
        # threads while this one compiles the kernels for the block shape.
        first_layer = pool.submit(load, jobs[0]) if jobs else None
        head_dtype = source.checkpoint.dtype(source.W_U_name)
        # read straight into the dtype the decoder keeps it in (an fp32 map of a bf16 head:
        # fp32, without the 1 GiB bf16 copy beside it at Llama-3.1-8B shapes)
        rows = rows_dtype(head_dtype, compute_dtype)
        decoder_job = head_pool.submit(
            lambda: Decoder(
                source.W_U(rows),
                source.readout(),
                norm,  # type: ignore[arg-type]
                top_k,
                device,
                compute_dtype,
                source.logit_softcap,
                compile=compiled,
            )
        )
        what = "reading the LM-head" + (" and preparing the compiled kernels" if compiled else "")
        with status(progress, what):
            if compiled:
                warm_up(
                    B,
                    source.d_vocab,
                    source.d_model,
                    head_dtype,
                    compute_dtype,
                    top_k,
                    source.logit_softcap,
                    device,
                    logit_bias=source.W_U_bias_name is not None,
                )
            decoder = decoder_job.result()
        del decoder_job  # (it would keep this decoder alive if the pilot replaces it)
        head_pool.shutdown()
        if compute_dtype != torch.float32 and pilot > 0 and not resumed:
            first = _pilot_rows(source, every, pilot, seed=1)
            second = functools.cache(lambda: _pilot_rows(source, every, pilot, seed=2))
            reports: list[dict[str, Any]] = []
            while True:  # auto steps down (int8 -> bf16 -> fp32) until a pilot passes
                step = fallback_dtype(compute_dtype, device) if dtype_name == "auto" else None
                what = f"checking the {meta.compute_dtype} GEMM on {len(first)} neurons"
                with status(progress, what):
                    fallback = dtype_label(step) if step is not None else None
                    report = run_pilot(decoder, first, second, B, fallback)
                reports.append(report.to_dict())
                if not report.steps_down:
                    break
                assert step is not None
                compute_dtype = step
                summary.compute_dtype = meta.compute_dtype = report.decision
                with status(progress, f"preparing the {report.decision} decoder"):
                    decoder = _decoder_in(compute_dtype, decoder, source, B, top_k, compiled)
                if compute_dtype == torch.float32:
                    break
            summary.pilot = meta.pilot = _chain(reports)
            heap.trim()
        recorded = meta.int8_kernel
        summary.int8_kernel = decoder.head8.kernel if decoder.head8 is not None else None
        _record_int8_kernel(meta, summary, resumed)
        if summary.pilot is not None or meta.int8_kernel != recorded:
            writer.save_meta()  # (once, for the pilot's decision and the kernel alike)
        # low precision: spare entries per token, cut to the best reverse_n once made exact
        reverse = ReverseIndex(source.d_vocab, reverse_n + decoder.reverse_spare, device)
        writer.load_reverse(reverse)
        # A layer's Parquet file and resume state are written (and fsynced) on a thread while
        # the next layer maps; at most one is in flight, and its errors surface at the next.
        # The resume state (the reverse table: 82 MB at Llama-3.1-8B shapes) is saved after
        # the last layer and whenever commit_every seconds have passed since it last was.
        writing: Future[None] | None = None
        last_commit = time.perf_counter()
        with progress_bar(progress, total, "mapping", done=total - todo, unit="neurons") as advance:
            ahead = read_ahead(source, jobs, device)
            layers_read = _prefetched(pool, load, jobs, first_layer, ahead)
            del first_layer  # (its future holds the first layer: the generator alone keeps it)
            # (a counter of its own: enumerate's and zip's reused result tuples would keep the
            # last layer alive while the next one is read)
            i = -1
            for (matrix, layer), W in layers_read:
                i += 1
                base = neuron_ref(matrix, layer, source.n_layers, source.d_mlp)
                width = widths[layer]
                results: list[BlockResult] = []
                for lo in range(0, width, B):
                    n = min(B, width - lo)
                    refs = torch.arange(base + lo, base + lo + n)
                    results.append(decoder.decode_padded(W[lo : lo + n], B, refs, reverse))
                    if device.type == "cpu" and (lo // B + 1) % heap.BLOCKS_PER_TRIM == 0:
                        heap.trim()  # the last blocks' temporaries (see heap)
                    advance(n, f"{matrix} layer {layer}")
                _keep_sample(sample, place[matrix, layer], W, results)
                if writing is not None:
                    writing.result()
                heap.trim()  # this layer's temporaries and the last write's (see heap)
                state = None
                if i == len(jobs) - 1 or time.perf_counter() - last_commit >= commit_every:
                    state, last_commit = reverse.state(), time.perf_counter()  # as of this layer
                job = (matrix, layer, results, state, time.perf_counter() - start)
                writing = write_pool.submit(_write_layer, writer, *job)
                del job, state, results  # the writer holds them until written, no longer
                del W  # (read one at a time: this layer goes before the next is read)
                summary.neurons_mapped += width
        if writing is not None:
            writing.result()
        decoder.release_gemm()  # the logits block and the GEMM's head copy
        heap.trim()
        if not decoder.exact:
            # Its work is the table's size (V x N), not the job's: compiled whenever that is
            # large, unless --compile off
            pairs = source.d_vocab * reverse.n
            if compile_mode != "off" and use_compile("auto", device, pairs * 4096):
                decoder.compile_pairs()
            what = "computing the reverse index's entries exactly in fp32"
            with status(progress, what):
                for (matrix, layer), W in _prefetched(pool, load, every, None, ahead):
                    base = neuron_ref(matrix, layer, source.n_layers, source.d_mlp)
                    rescore = functools.partial(decoder.exact_pairs, W)
                    reverse.rescore(base, widths[layer], rescore)
                    del rescore, W
        # The tokens table (Python-heavy, ~0.2 GiB while built) is made during the audit, not
        # while the map runs: it would add to the peak memory.
        tokens_job = None
        if not writer.has_tokens():
            tokens_job = pool.submit(tokens_table, source.folder, source.d_vocab)
        for done in every:
            if done not in jobs:  # mapped before an interruption: as the atlas stores it
                _keep_stored(sample, place[done], source, out, *done)
        checked = None
        if len(sample):
            with status(progress, f"checking {len(sample)} neurons against an exact fp32 decode"):
                checked = run_audit(
                    sample,
                    decoder.W_U,
                    decoder.readout,
                    decoder.norm,
                    decoder.softcap,
                    meta.compute_dtype,
                )
        del decoder  # the LM-head (and its int8 copy): not needed to finish
        writer.keep_tokenizer(source.folder)
        if tokens_job is not None:
            writer.write_tokens(tokens_job.result())
            if not (source.folder / TOKENIZER).is_file():
                summary.warnings.append(
                    f"no tokenizer found in {source.folder} (no tokenizer.json): the atlas's "
                    "tokens read <id N> and search cannot find words; put the model's "
                    "tokenizer files there and map again with --overwrite"
                )
    summary.audit = checked.to_dict() if checked is not None else None
    summary.seconds = time.perf_counter() - start
    writer.finish(reverse, summary.seconds, summary.audit)
    atlas = Atlas.open(out)  # the finished atlas must open
    summary.warnings += _degenerate_neurons(atlas)
    return summary


def _decoding(source: ModelSource) -> dict[str, Any]:
    """How the final norm and W_U are applied, as atlas.json records it (AtlasMeta.decoding):
    the norm's kind and the logits' scale only where they are not RMSNorm and 1, so that the
    atlases of the families without them read as they did before those existed."""
    out: dict[str, Any] = {
        "norm_eps": source.norm_eps,
        "logit_softcap": source.logit_softcap,
        "tied": source.tied,
    }
    if source.family.norm_kind != "rms":
        out["norm_kind"] = source.family.norm_kind
    if source.logit_scale != 1.0:
        out["logit_scale"] = source.logit_scale
    if source.W_U_bias_name is not None:
        out["logit_bias"] = True
    if source.n_experts > 1:  # neuron e * d_expert + i is unit i of expert e
        out["experts"] = source.n_experts
    if source.d_shared:  # then the shared expert's units
        out["shared_expert"] = source.d_shared
    if source.dense_layers:  # dense MLPs among a mixture's sparse layers
        out["dense_layers"] = source.dense_layers
    return out


def _check_same_model(out: Path, source: ModelSource, fingerprint: str) -> None:
    """An atlas in `out` must hold this model's neurons before a rerun resumes or reuses it:
    a moved folder is fine, another checkpoint with the same config.json (a fine-tune, a
    retrain, the same folder's weights changed) is refused. The atlas's weights fingerprint
    is compared with the model's; an atlas from before fingerprints, recorded from another
    folder or hub id, has one finished layer's stored |w| compared instead. An atlas from
    before `decoding` was recorded, of a config whose logit soft-cap comes from the family's
    default, is refused too: earlier versions mapped it uncapped."""
    try:
        old = read_meta(out / META)
    except (ValueError, OSError):
        return  # no atlas there, or a damaged atlas.json: the writer says what to do
    if old.config_hash != source.config_hash:
        return  # (another config: the writer refuses it, naming the setting)
    key, cap = source.family.logit_softcap_key, source.logit_softcap
    if old.decoding is None and key is not None and key not in source.settings and cap:
        raise AtlasError(
            f"{out} holds an atlas of {old.model} made before flashlens recorded the logit "
            f"soft-cap, and earlier versions read a {source.family.name} config.json "
            f"without {key} as no cap (transformers caps at {cap:g}, as this version does); "
            "pass --overwrite to map it again with the cap, so that no layers are mixed"
        )
    if old.weights_fingerprint is not None:
        if old.weights_fingerprint != fingerprint:
            raise AtlasError(
                f"{out} holds an atlas of {old.model}, and {source.model} has other weights "
                f"with the same config.json (weights fingerprint {fingerprint}, the atlas's "
                f"{old.weights_fingerprint}); choose another -o folder, or pass --overwrite "
                "to replace it"
            )
        return
    if old.model == source.model:
        return
    for matrix in old.matrices:
        for layer in old.layers:
            path = layer_file(out, matrix, layer)
            if not path.is_file():
                continue
            try:
                stored = read_parquet(path, columns=["w_norm"]).column("w_norm").to_numpy()
            except AtlasError:
                return  # a damaged layer file: the writer's checks name it
            W = source.neurons(matrix, layer)  # type: ignore[arg-type]  # (d_mlp, d_model)
            found = torch.cat([W[i : i + 1024].float().norm(dim=1) for i in range(0, len(W), 1024)])
            if found.shape[0] != stored.shape[0] or not norms_agree(found.numpy(), stored).all():
                raise AtlasError(
                    f"{out} holds an atlas of {old.model}, and {source.model} has other weights "
                    f"with the same config.json ({matrix} layer {layer}: neuron norms differ); "
                    "choose another -o folder, or pass --overwrite to replace it"
                )
            return  # one layer tells


def _degenerate_neurons(atlas: Atlas) -> list[str]:
    """A warning when neurons' weight vectors are all zero or not finite (a pruned or damaged
    model): their rows are mapped, but say nothing. From the stored w_norm (cheap)."""
    count, example = 0, ""
    for matrix in atlas.meta.matrices:
        for layer in atlas.meta.layers:
            norms = read_parquet(atlas.layer_path(matrix, layer), columns=["w_norm"])
            w_norm = norms.column("w_norm").to_numpy()
            bad = ~(np.isfinite(w_norm) & (w_norm != 0))
            n = int(bad.sum())
            if n and not count:
                example = f"{matrix}:{layer}:{int(bad.nonzero()[0][0])}"
            count += n
    if not count:
        return []
    return [
        f"{count:,} {'neuron has' if count == 1 else 'neurons have'} an all-zero or "
        f"non-finite weight vector (e.g. {example}): their tokens are meaningless (a pruned "
        "or damaged checkpoint?)"
    ]


def read_ahead(source: ModelSource, jobs: list[tuple[Matrix, int]], device: torch.device) -> bool:
    """Whether the next layer is read while one maps (two layers' matrices held at once): on
    the CPU, unless the largest matrix of the jobs, as read, exceeds READ_AHEAD_SHARE of the
    machine's physical memory (where the OS says how much there is)."""
    if device.type != "cpu" or not jobs:
        return True
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (no sysconf, or no such value)
        return True
    width = max(source.width(layer) for _, layer in jobs)
    return width * source.d_model * source.dtype.itemsize <= READ_AHEAD_SHARE * memory


def _prefetched(
    pool: ThreadPoolExecutor,
    load: Callable[[tuple[Matrix, int]], torch.Tensor],
    jobs: list[tuple[Matrix, int]],
    first: Future[torch.Tensor] | None = None,
    ahead: bool = True,
) -> Iterator[tuple[tuple[Matrix, int], torch.Tensor]]:
    """Each job with its layer (d_mlp, d_model), in order, each read on `pool` while the
    previous one is used (ahead), or once the previous one is done with (not ahead: the
    consumer drops its reference before asking for the next, so one layer is held at a
    time). `first`: the first job's read, if already submitted."""
    pending = first if first is not None or not jobs else pool.submit(load, jobs[0])
    del first  # a layer's weights are freed once it is mapped and the next one is asked for
    for i, job in enumerate(jobs):
        if pending is None:  # (not read ahead)
            pending = pool.submit(load, job)
        W = pending.result()
        pending = pool.submit(load, jobs[i + 1]) if ahead and i + 1 < len(jobs) else None
        yield job, W
        del W


def _pilot_rows(
    source: ModelSource, jobs: list[tuple[Matrix, int]], n: int, seed: int
) -> torch.Tensor:
    """(n, d_model) raw vectors of n neurons of `jobs` drawn with `seed`, read row by row."""
    sample = AuditSample([source.width(layer) for _, layer in jobs], n, seed)
    rows = [
        source.neuron_rows(*job, sample.rows(j))
        for j, job in enumerate(jobs)
        if sample.rows(j).numel()
    ]
    return torch.cat(rows)


def _chain(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The pilots' reports as one: the first, with each later one under "then"."""
    out = dict(reports[-1])
    for earlier in reversed(reports[:-1]):
        out = {**earlier, "then": out}
    return out


def _decoder_in(
    dtype: torch.dtype,
    decoder: Decoder,
    source: ModelSource,
    block: int,
    top_k: int,
    compiled: bool,
) -> Decoder:
    """A decoder like `decoder` that computes its GEMM in `dtype` (its kernels prepared)."""
    if compiled:
        warm_up(
            block,
            source.d_vocab,
            source.d_model,
            decoder.W_U.dtype,
            dtype,
            top_k,
            decoder.softcap,
            decoder.device,
            logit_bias=decoder.readout.logit_bias is not None,
        )
    return Decoder(
        decoder.W_U,
        decoder.readout,
        decoder.norm,
        top_k,
        decoder.device,
        dtype,
        decoder.softcap,
        compile=compiled,
    )


def _load(source: ModelSource, job: tuple[Matrix, int], device: torch.device) -> torch.Tensor:
    """A layer's neurons (d_mlp, d_model) on `device`, read on a loader thread."""
    W = source.neurons(*job).contiguous()  # materialise from the memory map (disk read here)
    return _to_cuda(W, device) if device.type == "cuda" else W


def _to_cuda(W: torch.Tensor, device: torch.device) -> torch.Tensor:
    """W copied host-to-device on a stream of its own, so that the copy overlaps the blocks
    computing on the default stream (a copy queued there would wait for them). It returns once
    the copy is done, so the consumer needs no event; `record_stream` keeps the caching
    allocator from reusing W's memory while the default stream's kernels still read it."""
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        W_dev = W.pin_memory().to(device, non_blocking=True)
    stream.synchronize()
    W_dev.record_stream(torch.cuda.default_stream(device))
    return W_dev


def _keep_sample(
    sample: AuditSample, job: int, W: torch.Tensor, results: list[BlockResult]
) -> None:
    """Record the audit sample's rows of a job: raw vectors and what the engine gave."""
    rows = sample.rows(job)
    if rows.numel() == 0:
        return
    r = BlockResult.cat(results).rows(rows)
    sample.add(W[rows.to(W.device)], r.top_ids, r.top_logits, r.top_probs, r.logsumexp)


def _keep_stored(
    sample: AuditSample, job: int, source: ModelSource, out: Path, matrix: Matrix, layer: int
) -> None:
    """Record the audit sample's rows of a job written by an earlier run: raw vectors read
    from the checkpoint, and what the atlas stores for them."""
    rows = sample.rows(job)
    if rows.numel() == 0:
        return
    columns = ["top_ids", "top_logits", "top_probs", "logsumexp"]
    t = read_parquet(layer_file(out, matrix, layer), columns=columns).take(rows.numpy())

    def stored(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(t.column(name).to_pylist(), dtype=np.float64))

    sample.add(
        source.neuron_rows(matrix, layer, rows),
        stored("top_ids").long(),
        stored("top_logits"),
        stored("top_probs"),
        stored("logsumexp"),
    )


def _write_layer(
    writer: AtlasWriter,
    matrix: Matrix,
    layer: int,
    results: list[BlockResult],
    state: dict[str, torch.Tensor] | None,
    seconds: float,
) -> None:
    writer.write_layer(matrix, layer, results)
    if state is not None:
        writer.commit(state, seconds)


def commit_interval() -> float:
    """Seconds between saves of a map's resume state: $FLASHLENS_COMMIT_SECONDS, else
    COMMIT_SECONDS; 0 saves it after every layer. An interrupted run loses the layers mapped
    since the last save (rerunning maps them again)."""
    raw = os.environ.get("FLASHLENS_COMMIT_SECONDS", "").strip()
    if not raw:
        return COMMIT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise FlashlensError(
            f"FLASHLENS_COMMIT_SECONDS={raw!r} is not a number of seconds: unset it (the "
            f"default saves the resume state every {COMMIT_SECONDS:g} s) or set e.g. 0 to save "
            "after every layer"
        )
    return seconds
