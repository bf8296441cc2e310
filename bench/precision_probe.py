"""How far a low-precision GEMM moves the logsumexp, on a real head and a synthetic one. Not a test.

    .venv/bin/python bench/precision_probe.py [--synthetic CHECKPOINT]

For every neuron of the real stories260K (../shared, weights rounded to bf16 as if stored so)
and 256 up neurons of the synthetic Llama-3.1-8B-shaped checkpoint that bench/map_bench.py
builds, the engine's low-precision recipe is emulated: logits from the GEMM, the top k+8 = 18
candidates rescored exactly, the logsumexp corrected with their exact mass. Printed: the
worst logsumexp error (= the relative error of every top-k probability) and how many neurons
miss issue 2's 1% tolerance, for
  bf16            the engine's GEMM (bf16 operands and output);
  bf16 + dither   a per-token offset added inside the GEMM (as a bias) and subtracted after,
                  so that near-identical head rows do not round alike;
  + mean shift    also the exact mean-direction part of the operand's rounding,
                  (x - bf16(x)) . mean(W_U), added to every logit;
  + twins exact   bf16, with the head's groups of near-identical rows that the map's pilot
                  finds (decode.pilot.twin_tokens, from 64 seeded neurons) rescored exactly,
                  as `map` does when its pilot fails;
  int8            per-row int8 operands (VNNI), same exact rescoring.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from flashlens.decode.norm import apply_final_norm
from flashlens.decode.pilot import PILOT, twin_tokens
from flashlens.families import Matrix
from flashlens.weights import ModelSource

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"
SYNTHETIC = ROOT / "bench" / ".cache" / "llama31-8b-shapes-2L"
N_CAND = 18


def neurons(
    path: Path, matrices: tuple[Matrix, ...], n: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(W_U (V, d) bf16, normed vectors x (n, d) fp32) per matrix and layer."""
    src = ModelSource.open(path)
    W_U, readout = src.W_U().bfloat16(), src.readout()
    readout = replace(readout, gain=readout.gain.bfloat16().float())
    for layer in range(src.n_layers):
        for m in matrices:
            w = src.neurons(m, layer)[:n].bfloat16().float()
            yield W_U, apply_final_norm(w, readout, "model")


def _q8(t: Tensor) -> tuple[Tensor, Tensor]:
    s = t.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(t / s).clamp(-127, 127).to(torch.int8), s


def recipes(W_U: Tensor, x: Tensor) -> dict[str, Tensor]:
    V = W_U.shape[0]
    g = torch.Generator().manual_seed(0)
    dither = (torch.randint(-64, 65, (V,), generator=g) * 2.0**-10).bfloat16()  # exact in bf16
    xb = x.bfloat16()
    shift = ((x.double() - xb.double()) @ W_U.double().mean(0))[:, None]
    dithered = torch.addmm(dither, xb, W_U.T).double() - dither.double()
    xq, sx = _q8(x)
    wq, sw = _q8(W_U.float())
    int8 = torch._int_mm(xq, wq.T.contiguous()).double() * sx.double() * sw.double().T
    return {
        "bf16": (xb @ W_U.T).double(),
        "bf16 + dither": dithered,
        "bf16 + dither + mean shift": dithered + shift,
        "int8": int8,
    }


def lse_error(L: Tensor, ref: Tensor, exact: Tensor | None = None) -> Tensor:
    """|logsumexp error| (n,) after the engine's exact rescoring of N_CAND candidates (and of
    the tokens `exact`, if given)."""
    lse = torch.logsumexp(L, 1)
    rescored = torch.zeros_like(L, dtype=torch.bool)
    rescored.scatter_(1, L.topk(min(N_CAND, L.shape[1]), 1).indices, True)
    if exact is not None:
        rescored[:, exact] = True
    delta = torch.exp(ref - lse[:, None]) - torch.exp(L - lse[:, None])
    delta = delta.where(rescored, torch.zeros_like(delta)).sum(1)
    return (lse + torch.log1p(delta.clamp_min(-0.999999)) - torch.logsumexp(ref, 1)).abs()


def twins_of(rows: Callable[[], Iterator[tuple[Tensor, Tensor]]]) -> Tensor:
    """The near-identical rows the pilot would find: twin_tokens over PILOT seeded neurons."""
    pairs = list(rows())
    W_U = pairs[0][0]
    x = torch.cat([x for _, x in pairs])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:PILOT]]
    return twin_tokens(W_U, W_U.float().mean(0), (x.double() @ W_U.double().T))


def probe(name: str, rows: Callable[[], Iterator[tuple[Tensor, Tensor]]]) -> None:
    worst: dict[str, float] = {}
    over: dict[str, int] = {}
    total = 0
    twins = twins_of(rows)
    for W_U, x in rows():
        ref = x.double() @ W_U.double().T
        total += x.shape[0]
        errors = {k: lse_error(L, ref) for k, L in recipes(W_U, x).items()}
        errors["bf16 + twins exact"] = lse_error((x.bfloat16() @ W_U.T).double(), ref, twins)
        errors["int8 + twins exact"] = lse_error(recipes(W_U, x)["int8"], ref, twins)
        for k, err in errors.items():
            worst[k] = max(worst.get(k, 0.0), float(err.max()))
            over[k] = over.get(k, 0) + int((err.expm1() > 0.01).sum())
    print(f"{name} ({total} neurons; the pilot's twin rows: {twins.numel()})")
    for k in worst:
        print(f"  {k:28s} worst probability error {worst[k]:.2e}   over 1%: {over[k]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=Path, default=SYNTHETIC)
    args = ap.parse_args()
    probe(
        "stories260K, real weights as bf16", lambda: neurons(STORIES, ("up", "gate", "down"), None)
    )
    if args.synthetic.exists():
        probe("synthetic Llama-3.1-8B shapes", lambda: neurons(args.synthetic, ("up",), 128))


if __name__ == "__main__":
    main()
