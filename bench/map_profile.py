"""Where `flashlens map` spends its time, step by step (issue 6's profile). Not a test.

    .venv/bin/python bench/map_profile.py [CHECKPOINT] [--layers 0-3] [--json]

Runs `map_model` (matrices up, compile on) on a checkpoint (default: the 8-layer synthetic
Llama-3.1-8B-shaped one that bench/map_bench.py builds) with timers around the engine's steps,
and prints the seconds spent in each, per call (overall, and over the run's first and last
tenth of calls: the reverse index gets cheaper as its table fills) and as a fraction of the
GEMM. The timers wrap methods from outside; the engine is unchanged. CPU only (no device
synchronisation).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flashlens.atlas.writer as writer_mod
import flashlens.decode.engine as engine_mod
import flashlens.decode.reverse as reverse_mod
import flashlens.mapping as mapping_mod

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=str(CACHE / "llama31-8b-shapes-8L"))
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    instrument()
    out = Path(tempfile.mkdtemp(prefix="flashlens-profile-"))
    try:
        start = time.perf_counter()
        s = mapping_mod.map_model(
            args.checkpoint, out / "atlas", matrices="up", layers=args.layers, compile="on"
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
    result = {"total_s": round(total, 2), "neurons": s.neurons_mapped, "steps": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"map_model: {s.neurons_mapped} neurons in {total:.1f} s")
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
