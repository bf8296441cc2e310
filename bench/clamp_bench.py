"""Benchmark of `flashlens.clamp` overhead (issue 4). Not a test.

    .venv/bin/python bench/clamp_bench.py [--reps 15]

Builds once (cached under bench/.cache/clamp_model) a random Llama-shaped fp32 model big enough
for stable timings (d_model 512, d_mlp 1408, 8 layers, vocabulary 8192), then in one run times,
interleaved (plain and hooked alternate, order flipped every repetition, so both see the same
machine load):

  forward     batch 4 x 128 tokens, no KV cache
  generate    batch 4 x 32-token prompts (left-padded), 32 new tokens, greedy, KV cache

each plain (transformers alone) and under `clamp` of 16 neurons in all 8 layers (up, gate and
activation sites; positions "all" for the forward pass, "last" for generation). The overhead is
the median over repetitions of the paired ratio hooked / plain, minus 1. Prints a table and
writes the "## clamp overhead (issue 4)" section of bench/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from flashlens.intervene import Neuron, clamp  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "clamp_model"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## clamp overhead (issue 4)"
D_MODEL, D_MLP, N_LAYERS, D_VOCAB = 512, 1408, 8, 8192
NEURONS = [
    Neuron(layer, 37 * layer + k, m)
    for layer in range(N_LAYERS)
    for k, m in ((1, "up"), (2, "down"))
]
NEURONS[1::4] = [Neuron(n.layer, n.index, "gate") for n in NEURONS[1::4]]


def build_model() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (CACHE / "config.json").exists():
        return CACHE
    cfg = LlamaConfig(
        vocab_size=D_VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(CACHE)
    return CACHE


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(plain: Callable[[], Any], hooked: Callable[[], Any], reps: int) -> dict[str, float]:
    """Interleaved repetitions; medians of each and of the paired ratio."""
    plain(), hooked()  # warm-up
    tp, th, ratios = [], [], []
    for rep in range(reps):
        if rep % 2:
            h, p = timed(hooked), timed(plain)
        else:
            p, h = timed(plain), timed(hooked)
        tp.append(p)
        th.append(h)
        ratios.append(h / p)
    return {
        "plain_ms": 1e3 * statistics.median(tp),
        "hooked_ms": 1e3 * statistics.median(th),
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model(), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, D_VOCAB, (4, 128), generator=g)
    prompt = torch.randint(3, D_VOCAB, (4, 32), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding
    mask[3, :11] = 0
    values = [float(i % 5) for i in range(len(NEURONS))]

    @torch.no_grad()
    def forward() -> Any:
        return model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def generate() -> Any:
        return model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
            temperature=None,
            top_k=None,
            top_p=None,
        )

    def forward_hooked() -> Any:
        with clamp(model, NEURONS, value=values):
            return forward()

    def generate_hooked() -> Any:
        with clamp(model, NEURONS, value=values, positions="last"):
            return generate()

    rows = {
        "forward": compare(forward, forward_hooked, args.reps),
        "generate": compare(generate, generate_hooked, args.reps),
    }
    threads = torch.get_num_threads()
    n_hooks = len({(n.layer, n.default_site) for n in NEURONS})
    lines = [
        SECTION,
        "",
        "Date: 2026-11-21. Machine: 2-core x86-64 CPU (AVX512-BF16), 24 GiB, torch "
        f"{torch.__version__}, {threads} threads. "
        f"`python bench/clamp_bench.py --reps {args.reps}`.",
        "",
        f"Random Llama-shaped fp32 model: d_model {D_MODEL}, d_mlp {D_MLP}, {N_LAYERS} layers, "
        f"vocabulary {D_VOCAB}. Clamp: {len(NEURONS)} neurons in all {N_LAYERS} layers (up, gate "
        f"and activation sites; {n_hooks} hooks). Plain and hooked runs interleaved in one "
        "process; "
        "overhead = median over repetitions of the paired ratio hooked / plain, minus 1 "
        "(installing and removing the hooks included).",
        "",
        "| run | plain (median) | hooked (median) | overhead |",
        "|---|---|---|---|",
        f"| forward, batch 4 x 128 tokens, positions all | {rows['forward']['plain_ms']:.1f} ms "
        f"| {rows['forward']['hooked_ms']:.1f} ms | {rows['forward']['overhead_pct']:+.2f}% |",
        f"| generate, batch 4 x 32 + 32 new tokens, KV cache, positions last "
        f"| {rows['generate']['plain_ms']:.1f} ms | {rows['generate']['hooked_ms']:.1f} ms "
        f"| {rows['generate']['overhead_pct']:+.2f}% |",
        "",
        "Target: overhead < 5%: "
        + ("met." if max(r["overhead_pct"] for r in rows.values()) < 5 else "NOT met."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(text)


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md; leave the others as they are."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(new.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
