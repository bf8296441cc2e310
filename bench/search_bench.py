"""Benchmark: `Atlas.search` on a Llama-3.1-8B-sized synthetic atlas (up matrix).

Builds once (cached under bench/.cache/) an atlas with the real schemas: 32 layers x 14,336
neurons (458,752), top-10 lists over the real 128,256-token Llama 3 vocabulary (token choice
Zipf-distributed, probabilities decaying like a real decode), and a reverse index of the top 32
neurons per token consistent with those lists. Opens it, then times search over a set of
concepts (median of repeats, after one warm-up query each).

    .venv/bin/python bench/search_bench.py            # prints figures, updates bench/RESULTS.md
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "search_atlas_v1"
RESULTS = ROOT / "RESULTS.md"
TOKENIZER = ROOT.parent.parent / "shared" / "tokenizers" / "llama3"
N_LAYERS, D_MLP, D_VOCAB, TOP_K, REVERSE_N = 32, 14_336, 128_256, 10, 32
CONCEPTS = [
    "dog",
    "California",
    "love",
    "the",
    "Paris",
    "water",
    "computer",
    "king",
    "music",
    "science",
    "Schwarzenegger",
    "blue",
]
REPEATS = 7
TARGET_MS = 200.0


def unique_rows(ids: np.ndarray, k: int) -> np.ndarray:
    """The first k distinct ids of each row, in order: (n, m) -> (n, k)."""
    order = np.argsort(ids, axis=1, kind="stable")
    srt = np.take_along_axis(ids, order, 1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, 1)
    pos = np.where(first, np.arange(ids.shape[1]), ids.shape[1])
    pick = np.argsort(pos, axis=1, kind="stable")[:, :k]
    assert np.take_along_axis(first, pick, 1).all(), "too few distinct ids: draw more"
    return np.take_along_axis(ids, pick, 1)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def build(out: Path) -> None:
    sys.path.insert(0, str(ROOT.parent / "src"))
    from flashlens.atlas.format import (
        LAYER_SCHEMA,
        REVERSE_SCHEMA,
        AtlasMeta,
        atomic_write,
        layer_file,
        write_json,
    )
    from flashlens.atlas.tokens import tokens_table

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    tokens = tokens_table(TOKENIZER, D_VOCAB)
    atomic_write(out / "tokens.parquet", lambda tmp: pq.write_table(tokens, tmp))
    # Zipf-like popularity: a neuron's top tokens are drawn by popularity (ids shuffled).
    popularity = 1.0 / np.arange(1, D_VOCAB + 1) ** 0.8
    popularity = popularity[rng.permutation(D_VOCAB)]
    popularity /= popularity.sum()
    all_tok, all_prob, all_ref = [], [], []
    for layer in range(N_LAYERS):
        n = D_MLP
        top_ids = unique_rows(rng.choice(D_VOCAB, size=(n, 3 * TOP_K), p=popularity), TOP_K)
        lse = rng.normal(12.0, 1.0, n).astype(np.float32)
        gap = np.cumsum(rng.exponential(0.7, (n, TOP_K)), axis=1)
        top1 = rng.uniform(-6.0, -0.05, n)[:, None]  # log p of the top token
        top_logp = (top1 - (gap - gap[:, :1])).astype(np.float32)  # decreasing
        top_logits = top_logp + lse[:, None]
        top_probs = np.exp(top_logp)
        bottom_ids = rng.integers(0, D_VOCAB, (n, TOP_K))
        bottom_logits = lse[:, None] - 25 - np.sort(rng.exponential(1.0, (n, TOP_K)), 1)[:, ::-1]

        def lists(a: np.ndarray, t: pa.DataType) -> pa.ListArray:
            flat = pa.array(np.ascontiguousarray(a).reshape(-1).astype(t.to_pandas_dtype()), t)
            return pa.ListArray.from_arrays(
                pa.array(np.arange(0, a.size + 1, TOP_K, dtype=np.int32)), flat
            )

        f32 = pa.float32()
        table = pa.table(
            {
                "layer": pa.array(np.full(n, layer, np.int16)),
                "matrix": pa.array(["up"] * n),
                "index": pa.array(np.arange(n, dtype=np.int32)),
                "top_ids": lists(top_ids, pa.int32()),
                "top_probs": lists(top_probs, f32),
                "top_logits": lists(top_logits, f32),
                "bottom_ids": lists(bottom_ids, pa.int32()),
                "bottom_logits": lists(bottom_logits.astype(np.float32), f32),
                "logsumexp": pa.array(lse),
                "entropy": pa.array(rng.gamma(4.0, 1.0, n).astype(np.float32)),
                "w_norm": pa.array(rng.uniform(0.5, 2.0, n).astype(np.float32)),
                "logit_mean": pa.array(rng.normal(0, 0.1, n).astype(np.float32)),
                "logit_std": pa.array(rng.uniform(0.5, 2.0, n).astype(np.float32)),
                "logit_skew": pa.array(rng.normal(0, 0.5, n).astype(np.float32)),
                "logit_kurtosis": pa.array(rng.gamma(1.5, 2.0, n).astype(np.float32)),
            },
            schema=LAYER_SCHEMA,
        )
        path = layer_file(out, "up", layer)
        atomic_write(path, functools.partial(_write_parquet, table))
        all_tok.append(top_ids.reshape(-1))
        all_prob.append(top_probs.reshape(-1))
        all_ref.append(np.repeat(np.arange(n) + layer * D_MLP, TOP_K))
        print(f"\rbuilding synthetic atlas: layer {layer + 1}/{N_LAYERS}", end="", file=sys.stderr)
    print(file=sys.stderr)
    # Reverse index: per token, its top-32 (neuron, prob) from the lists, topped up with
    # weaker random neurons (probabilities below the token's weakest listed one).
    tok, prob, ref = np.concatenate(all_tok), np.concatenate(all_prob), np.concatenate(all_ref)
    order = np.lexsort((-prob, tok))
    tok, prob, ref = tok[order], prob[order], ref[order]
    starts = np.searchsorted(tok, np.arange(D_VOCAB))
    rank = np.arange(tok.size) - starts[tok]
    keep = rank < REVERSE_N
    tok, prob, ref, rank = tok[keep], prob[keep], ref[keep], rank[keep]
    have = np.bincount(tok, minlength=D_VOCAB)
    fill_tok = np.repeat(np.arange(D_VOCAB), REVERSE_N - have)
    fill_rank = np.arange(fill_tok.size) - np.searchsorted(fill_tok, fill_tok) + have[fill_tok]
    floor = np.full(D_VOCAB, 1e-3)
    np.minimum.at(floor, tok, prob)
    fill_prob = floor[fill_tok] * np.exp(-(fill_rank - have[fill_tok] + 1) * 0.1)
    fill_ref = rng.integers(0, N_LAYERS * D_MLP, fill_tok.size)
    tok = np.concatenate([tok, fill_tok])
    order = np.lexsort((np.concatenate([rank, fill_rank]), tok))
    tok = tok[order]
    prob = np.concatenate([prob, fill_prob])[order].astype(np.float32)
    ref = np.concatenate([ref, fill_ref])[order]
    rank = np.concatenate([rank, fill_rank])[order]
    lse_all = 12.0
    reverse = pa.table(
        {
            "token_id": pa.array(tok.astype(np.int32)),
            "rank": pa.array(rank.astype(np.int16)),
            "layer": pa.array((ref // D_MLP).astype(np.int16)),
            "matrix": pa.array(["up"] * tok.size),
            "index": pa.array((ref % D_MLP).astype(np.int32)),
            "prob": pa.array(prob),
            "logit": pa.array((np.log(prob) + lse_all).astype(np.float32)),
        },
        schema=REVERSE_SCHEMA,
    )
    atomic_write(out / "reverse.parquet", lambda tmp: pq.write_table(reverse, tmp))
    meta = AtlasMeta(
        model="synthetic/llama31-8b-like",
        config_hash="synthetic",
        architecture="LlamaForCausalLM",
        family="llama",
        d_model=4096,
        d_mlp=D_MLP,
        n_layers=N_LAYERS,
        d_vocab=D_VOCAB,
        matrices=["up"],
        layers=list(range(N_LAYERS)),
        norm="model",
        top_k=TOP_K,
        reverse_n=REVERSE_N,
        weight_dtype="bfloat16",
        compute_dtype="bfloat16",
        flashlens_version="bench",
        created="2026-11-21T00:00:00+00:00",
        complete=True,
    )
    write_json(out / "atlas.json", meta.to_dict())


def main() -> None:
    sys.path.insert(0, str(ROOT.parent / "src"))
    from flashlens import Atlas

    if not (CACHE / "atlas.json").is_file():
        t = time.perf_counter()
        build(CACHE)
        print(f"built {CACHE} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    t = time.perf_counter()
    atlas = Atlas.open(CACHE)
    atlas.search("dog", limit=1)  # opens DuckDB, loads the vocabulary
    open_s = time.perf_counter() - t
    per: dict[str, float] = {}
    for concept in CONCEPTS:
        atlas.search(concept)  # warm-up
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            res = atlas.search(concept)
            times.append(time.perf_counter() - t)
        per[concept] = statistics.median(times) * 1e3
        print(
            f"  {concept:<16} {per[concept]:7.1f} ms  {len(res.variants)} variants, "
            f"{len(res.hits)} hits"
        )
    top1 = []
    for concept in CONCEPTS:
        t = time.perf_counter()
        atlas.search(concept, top1=True)
        top1.append((time.perf_counter() - t) * 1e3)
    median = statistics.median(per.values())
    print(
        f"open + first query: {open_s * 1e3:.0f} ms; median search {median:.1f} ms "
        f"(max {max(per.values()):.1f} ms), --top-1 median {statistics.median(top1):.1f} ms; "
        f"target < {TARGET_MS:.0f} ms: {'PASS' if median < TARGET_MS else 'FAIL'}"
    )
    write_results(median, max(per.values()), statistics.median(top1), open_s * 1e3, per)


def write_results(
    median: float, worst: float, top1: float, open_ms: float, per: dict[str, float]
) -> None:
    head = "## search (issue 3)"
    verdict = "met" if median < TARGET_MS else "NOT met"
    section = "\n".join(
        [
            head,
            "",
            f"Date: {datetime.date.today().isoformat()}. Machine: {os.cpu_count()}-core "
            f"{platform.machine()} CPU, 1-min load average {os.getloadavg()[0]:.1f} at the end "
            "of the run.",
            "",
            f"Synthetic atlas, up matrix: {N_LAYERS} layers x {D_MLP:,} neurons "
            f"({N_LAYERS * D_MLP:,}), top-{TOP_K} over the real {D_VOCAB:,}-token Llama 3 "
            f"vocabulary, reverse index of {REVERSE_N} neurons per token "
            f"({D_VOCAB * REVERSE_N:,} rows). `python bench/search_bench.py`.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| median `search` latency over {len(per)} concepts (atlas open) | {median:.1f} ms |",
            f"| slowest concept (median of {REPEATS}) | {worst:.1f} ms |",
            f"| median `search --top-1` | {top1:.1f} ms |",
            f"| open + first query (DuckDB, vocabulary) | {open_ms:.0f} ms |",
            f"| target | < {TARGET_MS:.0f} ms median: {verdict} |",
            "",
            "Per concept (ms): " + json.dumps({k: round(v, 1) for k, v in per.items()}),
            "",
            "",
        ]
    )
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
