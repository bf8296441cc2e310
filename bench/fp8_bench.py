"""`flashlens map` of a quantised checkpoint against its bf16 original (Llama-3.1-8B shapes). Not a
test.

    .venv/bin/python bench/fp8_bench.py [--layers 2] [--format fp8|w4a16]

Takes the synthetic bf16 checkpoint bench/map_bench.py builds (2 layers by default, cached under
bench/.cache/), writes an FP8 copy of it once (every decoder-layer matrix as float8 e4m3 with
one fp32 scale per 128 x 128 block in a `*_scale_inv` tensor, config.json's quantization_config
saying so, the embedding, norms and LM-head left in bf16, as DeepSeek-V3's and Qwen3's FP8
releases are laid out; with `--format w4a16`, compressed-tensors' pack-quantized layout instead:
int4 values packed in int32 words, one bf16 scale per group of 128 columns, as Red Hat AI's
W4A16 releases), then maps `--matrices up` of both as subprocesses, interleaved, twice each, in
the same run, and prints the best wall time and neurons/s, the highest peak RSS of each and
their ratios, the time to read one quantised layer dequantized against one bf16 layer, and how
far the quantised atlas's top tokens moved from the bf16 one's (rounding of the weights, not an
error of the map).
Figures are written to bench/.cache/fp8_bench.json (w4a16_bench.json).
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
GROUP = 128  # W4A16: columns per scale


def fp8_copy(src: Path, dst: Path) -> Path:
    """`src` with its decoder-layer matrices in FP8, 128 x 128 block scales (built once)."""

    def fp8(name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
        R, C = t.shape[-2:] if t.ndim >= 2 else (0, 0)
        if ".layers." not in name or t.ndim != 2 or R % BLOCK or C % BLOCK:
            return False
        blocks = t.float().view(R // BLOCK, BLOCK, C // BLOCK, BLOCK)
        s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = q.view(R, C), s
        return True

    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["lm_head"],
    }
    return _copy(src, dst, fp8, qc)


def _copy(src: Path, dst: Path, quantize: Any, qc: dict[str, Any]) -> Path:
    """A copy of checkpoint `src` at `dst` (built once) whose tensors `quantize(name, t, out)`
    writes into `out` in their quantised form (True) or leaves (False), config.json saying
    so with `qc`."""
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
                if not quantize(name, t, out):
                    out[name] = t
        save_file(out, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(dst)
    return dst


def w4a16_copy(src: Path, dst: Path) -> Path:
    """`src` with its decoder-layer matrices in compressed-tensors' W4A16 layout (built once):
    int4 values, one bf16 scale per GROUP columns of a row, packed by the library itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    def w4(name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
        R, C = t.shape[-2:] if t.ndim == 2 else (0, 1)
        if ".layers." not in name or t.ndim != 2 or C % GROUP:
            return False
        groups = t.float().view(R, C // GROUP, GROUP)
        s = (groups.abs().amax(2).clamp(min=1e-12) / 7.0).bfloat16()  # (R, C / GROUP)
        q = (groups / s.float()[..., None]).round().clamp(-8, 7).to(torch.int8).view(R, C)
        X = name
        out[X + "_packed"], out[X + "_shape"], out[X + "_scale"] = (
            pack_to_int32(q, 4),
            torch.tensor([R, C]),
            s,
        )
        return True

    group = {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": GROUP,
            "dynamic": False,
            "actorder": None,
        },
        "input_activations": None,
        "output_activations": None,
    }
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    return _copy(src, dst, w4, qc)


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
    ap.add_argument("--format", default="fp8", choices=("fp8", "w4a16"))
    args = ap.parse_args()
    sys.path.insert(0, str(map_bench.ROOT / "src"))
    cache = map_bench.CACHE
    cache.mkdir(parents=True, exist_ok=True)
    seed = 0 if args.layers == 2 else 1
    bf16 = map_bench.build_checkpoint(
        cache / f"llama31-8b-shapes-{args.layers}L", args.layers, seed=seed
    )
    t = time.perf_counter()
    fmt = args.format
    copy = fp8_copy if fmt == "fp8" else w4a16_copy
    quantised = copy(bf16, cache / f"llama31-8b-shapes-{args.layers}L-{fmt}")
    print(f"checkpoints ready ({time.perf_counter() - t:.0f} s)", flush=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "layers": args.layers}
    for label, ckpt in (("bf16", bf16), (fmt, quantised)):
        res[f"read_layer_s_{label}"] = layer_read_seconds(ckpt)
    # Interleaved, twice each (this VM's rate drifts by several per cent between minutes):
    # the best wall time and the highest peak RSS of each.
    for rep in range(2):
        for label, ckpt in (("bf16", bf16), (fmt, quantised)):
            m = map_bench.flashlens_map(ckpt, cache / f"atlas-{fmt}bench-{label}", "up", [])
            print(
                f"{label}, run {rep + 1}: {m['wall_s']:.1f} s, {m['neurons_per_second']:.0f} "
                f"neurons/s, {m['compute_dtype']}, peak RSS {m['rss_gib']:.2f} GiB",
                flush=True,
            )
            if label in res:
                m["wall_s"] = min(m["wall_s"], res[label]["wall_s"])
                m["rss_gib"] = max(m["rss_gib"], res[label]["rss_gib"])
            res[label] = m
    res[f"time_ratio_{fmt}_over_bf16"] = res[fmt]["wall_s"] / res["bf16"]["wall_s"]
    res[f"rss_ratio_{fmt}_over_bf16"] = res[fmt]["rss_gib"] / res["bf16"]["rss_gib"]
    res.update(top1_moved(cache / f"atlas-{fmt}bench-bf16", cache / f"atlas-{fmt}bench-{fmt}"))
    name = fmt.upper()
    print(
        f"read one up_proj layer: bf16 {res['read_layer_s_bf16']:.3f} s, {name} dequantized "
        f"{res[f'read_layer_s_{fmt}']:.3f} s\n"
        f"{name} / bf16: time {res[f'time_ratio_{fmt}_over_bf16']:.3f}, peak RSS "
        f"{res[f'rss_ratio_{fmt}_over_bf16']:.3f}\n"
        f"top-1 token moved by {name} rounding: {100 * res['top1_moved']:.2f}% of up neurons; "
        f"top-1 probability moved by {res['top1_prob_mean_abs_diff']:.2e} on average elsewhere"
    )
    (cache / f"{fmt}_bench.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
