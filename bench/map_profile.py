"""Where `flashlens map` spends its time, step by step (issue 6's profile). Not a test.

    .venv/bin/python bench/map_profile.py [CHECKPOINT] [--layers 0-3] [--block B] [--probe N]
        [--json]

Runs `map_model` (matrices up, compile on) on a checkpoint (default: the 8-layer synthetic
Llama-3.1-8B-shaped one that bench/map_bench.py builds) with timers around the engine's steps,
and prints the seconds spent in each, per call (overall, and over the run's first and last
tenth of calls: the reverse index gets cheaper as its table fills) and as a fraction of the
GEMM. The timers wrap methods from outside; the engine is unchanged. CPU only (no device
synchronisation). With --probe N (fp32 and int8 maps), every N blocks two bare GEMMs are
timed on the map's own head, so the map's rate is compared with the GEMM's through the same
minutes rather than with a peak measured before or after (this VM's rate drifts by tens of
percent).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import flashlens.atlas.writer as writer_mod
import flashlens.decode.engine as engine_mod
import flashlens.decode.reverse as reverse_mod
import flashlens.mapping as mapping_mod
from flashlens import pages

CACHE = Path(__file__).resolve().parent / ".cache"
TIMES: dict[str, list[float]] = collections.defaultdict(list)  # seconds of each call
SPANS: dict[str, list[float]] = collections.defaultdict(list)  # (start, end) of each call


def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            TIMES[label].append(end - start)
            SPANS[label] += [start, end]

    return wrapper


def instrument() -> None:
    D, R, W = engine_mod.Decoder, reverse_mod.ReverseIndex, writer_mod.AtlasWriter
    steps = [
        (D, "decode", "decode (one block, all steps)"),
        (D, "block_logits", "GEMM x @ W_U^T"),  # (int8: with quantising x)
        (D, "_candidates", "top/bottom candidates"),
        (D, "_exact_logits", "exact fp32 rescoring"),
        (R, "update", "reverse-index update"),
        (R, "_hits", "  of which: chunk filter + exact check"),
        (R, "_merge_candidates", "  of which: merge into the table"),
        (W, "write_layer", "write layer Parquet"),
        (W, "commit", "commit (reverse state)"),
        (W, "finish", "finish (reverse Parquet)"),
        (mapping_mod, "warm_up", "compile kernels (start-up)"),
        (mapping_mod, "tokens_table", "tokens table (thread)"),
        (mapping_mod, "_load", "read a layer (thread)"),
        (mapping_mod, "run_pilot", "precision pilot (start-up)"),
        (mapping_mod, "run_audit", "accuracy audit (end)"),
        (R, "rescore", "reverse entries made exact (end, per layer)"),
        (mapping_mod, "_pilot_rows", "pilot rows read (start-up)"),
        (mapping_mod.heap, "trim", "heap trims"),
        (mapping_mod.Atlas, "open", "open the finished atlas (end)"),
        (mapping_mod.ReverseIndex, "__init__", "reverse index allocated (start-up)"),
    ]
    for owner, name, label in steps:
        setattr(owner, name, timed(getattr(owner, name), label))
    init = D.__init__

    def traced_init(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        init(self, *args, **kwargs)
        TIMES["Decoder: LM-head read and prepared (thread)"].append(time.perf_counter() - start)
        if self._stats is not None:
            self._stats = timed(self._stats, "statistics kernel")

    D.__init__ = traced_init  # type: ignore[method-assign]


PROBES: list[float] = []  # FLOP/s of each probe product
PROBE_SECONDS: list[float] = []  # wall time of each probe, taken out of the map's
PROBE_INFO: dict[str, float] = {}


def probe_gemm(every: int, reps: int = 2) -> None:
    """Every `every` blocks, before the block, time `reps` products of the block's shape on the
    decoder's own head (the same memory, page backing and layout the map's GEMM reads) into a
    buffer of its own: the GEMM's rate at that moment, against which the map's is measured.
    This VM's GEMM rate drifts by tens of percent over minutes, so a peak measured before and
    after a long map says little about the rate while it ran."""
    D = engine_mod.Decoder
    decode = D.decode
    count = [0]
    out: dict[str, Any] = {}

    def probed(self: Any, W: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if count[0] % every == 0 and self.dtype in (torch.float32, torch.int8):
            start = time.perf_counter()
            B = W.shape[0]
            head8 = self.head8
            if "L" not in out:
                dtype = head8.out_dtype if head8 is not None else torch.float32
                out["L"] = pages.empty((B, self.d_vocab), dtype)
                out["x"] = torch.randn(B, self.d_model)
                if head8 is not None:
                    out["x"] = head8.quantize(out["x"])[0]
            flop = 2 * B * self.d_model * self.d_vocab
            PROBE_INFO["flop_per_neuron"] = flop / B
            for _ in range(reps):
                t = time.perf_counter()
                if head8 is not None:  # the int8 kernel's product alone, as the engine calls it
                    head8.mm(out["x"], out["L"])
                else:
                    torch.matmul(out["x"], self.W_UT_c, out=out["L"])
                PROBES.append(flop / (time.perf_counter() - t))
            PROBE_SECONDS.append(time.perf_counter() - start)
        count[0] += 1
        return decode(self, W, *args, **kwargs)

    D.decode = probed  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(CACHE / "llama31-8b-shapes-8L"))
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--block", type=int, default=None, help="neurons per block (default: map's)")
    ap.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="N",
        help="every N blocks, time 2 bare GEMMs on the map's own head (fp32, int8): the map's "
        "rate as a fraction of the GEMM's, measured through the same run",
    )
    args = ap.parse_args()
    instrument()
    if args.probe:
        probe_gemm(args.probe)
    out = Path(tempfile.mkdtemp(prefix="flashlens-profile-"))
    try:
        start = time.perf_counter()
        s = mapping_mod.map_model(
            args.checkpoint,
            out / "atlas",
            matrices="up",
            layers=args.layers,
            compile="on",
            block=args.block,
        )
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    blocks = SPANS["decode (one block, all steps)"]
    if blocks:  # the map's main thread before its first block and after its last
        TIMES["start-up: map start to the first block"] = [blocks[0] - start]
        TIMES["end: the last block to the map's return"] = [start + total - blocks[-1]]
    gemm = sum(TIMES["GEMM x @ W_U^T"])
    rows = []
    for k, ts in sorted(TIMES.items(), key=lambda kv: -sum(kv[1])):
        tenth = max(1, len(ts) // 10)  # the run's first and last tenth of calls
        rows.append(
            {
                "step": k,
                "seconds": round(sum(ts), 3),
                "calls": len(ts),
                "ms_per_call": round(1e3 * sum(ts) / len(ts), 2),
                "ms_first_tenth": round(1e3 * sum(ts[:tenth]) / tenth, 2),
                "ms_last_tenth": round(1e3 * sum(ts[-tenth:]) / tenth, 2),
                "of_gemm": round(sum(ts) / gemm, 3) if gemm else None,
            }
        )
    result: dict[str, Any] = {
        "total_s": round(total, 2),
        "neurons": s.neurons_mapped,
        "steps": rows,
    }
    if PROBES:
        mapped = total - sum(PROBE_SECONDS)  # the map's own wall time
        rate = s.neurons_mapped * PROBE_INFO["flop_per_neuron"] / mapped
        best, median = max(PROBES), statistics.median(PROBES)
        in_map = gemm and s.neurons_mapped * PROBE_INFO["flop_per_neuron"] / gemm
        result["probe"] = {
            "products": len(PROBES),
            "map_s_without_probes": round(mapped, 2),
            "map_flops": rate,
            "gemm_in_map_flops": in_map,
            "probe_best_flops": best,
            "probe_median_flops": median,
            "map_over_probe_best": rate / best,
            "map_over_probe_median": rate / median,
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"map_model: {s.neurons_mapped} neurons in {total:.1f} s")
    if PROBES:
        p = result["probe"]
        print(
            f"probes: {p['products']} bare GEMMs through the run, best "
            f"{p['probe_best_flops'] / 1e9:.0f}, median {p['probe_median_flops'] / 1e9:.0f} "
            f"GFLOP/s; the map without them {p['map_s_without_probes']:.1f} s = "
            f"{p['map_flops'] / 1e9:.0f} GFLOP/s end to end (its GEMM "
            f"{p['gemm_in_map_flops'] / 1e9:.0f}) = {p['map_over_probe_best']:.2f} of the "
            f"probes' best, {p['map_over_probe_median']:.2f} of their median"
        )
    print(
        f"{'step':40s} {'seconds':>8s} {'calls':>6s} {'ms/call':>9s} {'first 10%':>10s} "
        f"{'last 10%':>9s} {'of GEMM':>8s}"
    )
    for r in rows:
        print(
            f"{r['step']:40s} {r['seconds']:8.2f} {r['calls']:6d} {r['ms_per_call']:9.1f} "
            f"{r['ms_first_tenth']:10.1f} {r['ms_last_tenth']:9.1f} "
            f"{r['of_gemm'] if r['of_gemm'] is not None else '':>8}"
        )


if __name__ == "__main__":
    main()
