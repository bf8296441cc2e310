"""`flashlens map` of an FP8 checkpoint against its bf16 original (Llama-3.1-8B shapes). Not a test.

    .venv/bin/python bench/fp8_bench.py [--layers 2]

Takes the synthetic bf16 checkpoint bench/map_bench.py builds (2 layers by default, cached under
bench/.cache/), writes an FP8 copy of it once (every decoder-layer matrix as float8 e4m3 with
one fp32 scale per 128 x 128 block in a `*_scale_inv` tensor, config.json's quantization_config
saying so, the embedding, norms and LM-head left in bf16, as DeepSeek-V3's and Qwen3's FP8
releases are laid out), then maps `--matrices up` of both as subprocesses, interleaved, twice
each, in the same run, and prints the best wall time and neurons/s, the highest peak RSS of each
and their ratios, the time to read one FP8 layer dequantized against one bf16 layer, and how
far the FP8 atlas's top tokens moved from the bf16 one's (FP8 rounding of the weights, not an
error of the map).
Figures are written to bench/.cache/fp8_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import map_bench  # (the checkpoints and the measured subprocess)

BLOCK = 128
FP8_MAX = 448.0


def fp8_copy(src: Path, dst: Path) -> Path:
    """`src` with its decoder-layer matrices in FP8, 128 x 128 block scales (built once)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "model.safetensors.index.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, tmp / f.name)
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(src / shard), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                t = fh.get_tensor(name)
                R, C = t.shape[-2:] if t.ndim >= 2 else (0, 0)
                if ".layers." in name and t.ndim == 2 and R % BLOCK == 0 == C % BLOCK:
                    blocks = t.float().view(R // BLOCK, BLOCK, C // BLOCK, BLOCK)
                    s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
                    q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn)
                    out[name], out[name + "_scale_inv"] = q.view(R, C), s
                    del blocks
                else:
                    out[name] = t
        save_file(out, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["lm_head"],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(dst)
    return dst


def layer_read_seconds(ckpt: Path, reps: int = 3) -> float:
    """Best time to read layer 0's up_proj as the map reads it (dequantized, for FP8)."""
    from flashlens.weights import ModelSource

    best = float("inf")
    with ModelSource.open(ckpt) as source:
        for _ in range(reps):
            t = time.perf_counter()
            source.neurons("up", 0)
            best = min(best, time.perf_counter() - t)
    return best


def top1_moved(a: Path, b: Path) -> dict[str, float]:
    """Share of up neurons whose top-1 token differs between atlases a and b, and the mean
    absolute difference of their top-1 probabilities where it does not."""
    import numpy as np

    from flashlens import Atlas

    A, B = Atlas.open(a), Atlas.open(b)
    moved, diffs, n = 0, [], 0
    for layer in A.meta.layers:
        ta, tb = A.layer_table("up", layer), B.layer_table("up", layer)
        ia = np.array([row[0] for row in ta["top_ids"].to_pylist()])
        ib = np.array([row[0] for row in tb["top_ids"].to_pylist()])
        pa = np.array([row[0] for row in ta["top_probs"].to_pylist()])
        pb = np.array([row[0] for row in tb["top_probs"].to_pylist()])
        same = ia == ib
        moved += int((~same).sum())
        diffs.append(np.abs(pa - pb)[same])
        n += len(ia)
    return {"top1_moved": moved / n, "top1_prob_mean_abs_diff": float(np.concatenate(diffs).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, choices=(2, 8))
    args = ap.parse_args()
    sys.path.insert(0, str(map_bench.ROOT / "src"))
    cache = map_bench.CACHE
    cache.mkdir(parents=True, exist_ok=True)
    seed = 0 if args.layers == 2 else 1
    bf16 = map_bench.build_checkpoint(
        cache / f"llama31-8b-shapes-{args.layers}L", args.layers, seed=seed
    )
    t = time.perf_counter()
    fp8 = fp8_copy(bf16, cache / f"llama31-8b-shapes-{args.layers}L-fp8")
    print(f"checkpoints ready ({time.perf_counter() - t:.0f} s)", flush=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "layers": args.layers}
    for label, ckpt in (("bf16", bf16), ("fp8", fp8)):
        res[f"read_layer_s_{label}"] = layer_read_seconds(ckpt)
    # Interleaved, twice each (this VM's rate drifts by several per cent between minutes):
    # the best wall time and the highest peak RSS of each.
    for rep in range(2):
        for label, ckpt in (("bf16", bf16), ("fp8", fp8)):
            m = map_bench.flashlens_map(ckpt, cache / f"atlas-fp8bench-{label}", "up", [])
            print(
                f"{label}, run {rep + 1}: {m['wall_s']:.1f} s, {m['neurons_per_second']:.0f} "
                f"neurons/s, {m['compute_dtype']}, peak RSS {m['rss_gib']:.2f} GiB",
                flush=True,
            )
            if label in res:
                m["wall_s"] = min(m["wall_s"], res[label]["wall_s"])
                m["rss_gib"] = max(m["rss_gib"], res[label]["rss_gib"])
            res[label] = m
    res["time_ratio_fp8_over_bf16"] = res["fp8"]["wall_s"] / res["bf16"]["wall_s"]
    res["rss_ratio_fp8_over_bf16"] = res["fp8"]["rss_gib"] / res["bf16"]["rss_gib"]
    res.update(top1_moved(cache / "atlas-fp8bench-bf16", cache / "atlas-fp8bench-fp8"))
    print(
        f"read one up_proj layer: bf16 {res['read_layer_s_bf16']:.3f} s, FP8 dequantized "
        f"{res['read_layer_s_fp8']:.3f} s\n"
        f"FP8 / bf16: time {res['time_ratio_fp8_over_bf16']:.3f}, peak RSS "
        f"{res['rss_ratio_fp8_over_bf16']:.3f}\n"
        f"top-1 token moved by FP8 rounding: {100 * res['top1_moved']:.2f}% of up neurons; "
        f"top-1 probability moved by {res['top1_prob_mean_abs_diff']:.2e} on average elsewhere"
    )
    (cache / "fp8_bench.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
