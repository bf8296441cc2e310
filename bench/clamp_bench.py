"""Benchmark of `flashlens.clamp` overhead (issue 4). Not a test.

    .venv/bin/python bench/clamp_bench.py [--reps 21]

Builds once (cached under bench/.cache/clamp_model) a random Llama-shaped fp32 model big enough
for stable timings (d_model 512, d_mlp 1408, 8 layers, vocabulary 8192), and a Mixtral-shaped
one with the same active width (bench/.cache/clamp_moe: 8 experts of 704 units, 2 per token),
then in one run times, on each,

  forward     batch 4 x 64 tokens, no KV cache
  generate    batch 4 x 32-token prompts (left-padded), 16 new tokens, greedy, KV cache

each plain (transformers alone) and under `clamp` of 16 neurons in all 8 layers (up, gate and
activation sites; positions "all" for the forward pass, "last" for generation; in the mixture,
the same units of expert layer % 8, whose clamps correct the experts' output). Plain and hooked
runs are interleaved (order flipped every repetition, so both see the same machine load). Time
is this process's CPU time with one torch thread: on a shared machine it is the figure other
users disturb least (the wall-clock figure is printed beside it). The overhead is the median
over repetitions of the paired ratio hooked / plain, minus 1. Prints a table and writes the
"## clamp overhead (issue 4)" section of bench/RESULTS.md (other sections untouched).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from flashlens.families import Matrix  # noqa: E402
from flashlens.intervene import Neuron, clamp  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "clamp_model"
MOE_CACHE = ROOT / "bench" / ".cache" / "clamp_moe"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## clamp overhead (issue 4)"
D_MODEL, D_MLP, N_LAYERS, D_VOCAB = 512, 1408, 8, 8192
BATCH, SEQ, PROMPT, NEW = 4, 64, 32, 16
N_EXPERTS, TOP_K = 8, 2
D_EXPERT = D_MLP // TOP_K  # the same active width per token as the dense model
# two neurons per layer: up + gate in even layers, up + down (activation site) in odd ones
NEURONS: list[Neuron] = []
for layer in range(N_LAYERS):
    second: Matrix = "gate" if layer % 2 == 0 else "down"
    NEURONS += [Neuron(layer, 37 * layer + 1, "up"), Neuron(layer, 37 * layer + 2, second)]


# the mixture's: each neuron's unit in expert layer % 8 (units 37 * layer + 1 and + 2 < 704)
MOE_NEURONS = [
    Neuron(n.layer, (n.layer % N_EXPERTS) * D_EXPERT + n.index, n.matrix) for n in NEURONS
]


def build_moe() -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    if (MOE_CACHE / "config.json").exists():
        return MOE_CACHE
    cfg = MixtralConfig(
        vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=D_EXPERT,
        num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K, num_hidden_layers=N_LAYERS,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        architectures=["MixtralForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(MOE_CACHE)
    return MOE_CACHE


def build_model() -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (CACHE / "config.json").exists():
        return CACHE
    cfg = LlamaConfig(
        vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(CACHE)
    return CACHE


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(plain: Callable[[], Any], hooked: Callable[[], Any], reps: int) -> dict[str, float]:
    """Interleaved repetitions: medians of each and of the paired ratios."""
    plain(), hooked()  # warm-up
    p_cpu, h_cpu, ratio_cpu, ratio_wall = [], [], [], []
    for rep in range(reps):
        if rep % 2:
            h, p = timed(hooked), timed(plain)
        else:
            p, h = timed(plain), timed(hooked)
        p_cpu.append(p[0])
        h_cpu.append(h[0])
        ratio_cpu.append(h[0] / p[0])
        ratio_wall.append(h[1] / p[1])
    return {
        "plain_ms": 1e3 * statistics.median(p_cpu),
        "hooked_ms": 1e3 * statistics.median(h_cpu),
        "overhead_pct": 100 * (statistics.median(ratio_cpu) - 1),
        "wall_overhead_pct": 100 * (statistics.median(ratio_wall) - 1),
    }


def runs(
    model: Any,
    neurons: list[Neuron],
    values: list[float],
    ids: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[Callable[[], Any], ...]:
    """forward, generate, and each under the clamp of `neurons`."""

    @torch.no_grad()
    def forward() -> Any:
        return model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def generate() -> Any:
        return model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, temperature=None, top_k=None, top_p=None,
        )  # fmt: skip

    def forward_hooked() -> Any:
        with clamp(model, neurons, value=values):
            return forward()

    def generate_hooked() -> Any:
        with clamp(model, neurons, value=values, positions="last"):
            return generate()

    return forward, generate, forward_hooked, generate_hooked


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, D_VOCAB, (BATCH, SEQ), generator=g)
    prompt = torch.randint(3, D_VOCAB, (BATCH, PROMPT), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding
    mask[3, :11] = 0
    values = [float(i % 5) for i in range(len(NEURONS))]
    rows: dict[str, dict[str, float]] = {}
    for label, path, neurons in (
        ("", build_model(), NEURONS),
        ("Mixtral-shaped: ", build_moe(), MOE_NEURONS),
    ):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        forward, generate, forward_hooked, generate_hooked = runs(
            model, neurons, values, ids, prompt, mask
        )
        rows[f"{label}forward, batch {BATCH} x {SEQ} tokens, positions all"] = compare(
            forward, forward_hooked, args.reps
        )
        name = f"{label}generate, batch {BATCH} x {PROMPT} + {NEW} new tokens, KV cache, last"
        rows[name] = compare(generate, generate_hooked, args.reps)
    n_hooks = len({(n.layer, n.default_site) for n in NEURONS})
    load = os.getloadavg()[0]
    met = max(r["overhead_pct"] for r in rows.values()) < 5
    lines = [
        SECTION,
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()}-core "
        f"{platform.machine()} CPU, torch "
        f"{torch.__version__}, 1 torch thread; shared machine (load average {load:.1f} at the "
        f"end of the run). `python bench/clamp_bench.py --reps {args.reps}`.",
        "",
        f"Random Llama-shaped fp32 model: d_model {D_MODEL}, d_mlp {D_MLP}, {N_LAYERS} layers, "
        f"vocabulary {D_VOCAB}. Clamp: {len(NEURONS)} neurons in all {N_LAYERS} layers (up, gate "
        f"and activation sites; {n_hooks} hooks). The Mixtral-shaped model has the same sizes "
        f"with {N_EXPERTS} experts of {D_EXPERT} units, {TOP_K} per token (the same active "
        "width); its clamp is the same units in expert layer % 8 (one hook per layer, which "
        "corrects the experts' output on the tokens routed to that expert). Plain and hooked "
        "runs interleaved in one process; times are CPU time of the process (medians); "
        "overhead = median over repetitions of the paired ratio hooked / plain, minus 1, "
        "installing and removing the hooks included. The wall-clock overhead is shown too; "
        "other users' load makes it noisy.",
        "",
        "| run | plain | hooked | overhead (CPU) | overhead (wall) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r['plain_ms']:.1f} ms | {r['hooked_ms']:.1f} ms "
            f"| {r['overhead_pct']:+.2f}% | {r['wall_overhead_pct']:+.2f}% |"
            for name, r in rows.items()
        ),
        "",
        f"Target: overhead < 5%: {'met' if met else 'NOT met'}.",
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
