"""The decode engine: neuron blocks x LM-head -> top-k, bottom-k, logsumexp, entropy, moments.

For a block of neuron vectors W (B, d_model):
    x = final_norm(W)                              (B, d_model) fp32
    L = x @ W_U^T                                  (B, d_vocab) in the compute dtype
    lse, entropy, moments, chunk max/min           one fused pass over L (kernels.block_stats)
    top/bottom-k candidates                        from the best chunks, then rescored exactly
                                                   in fp32 against the gathered W_U rows
The full neurons x vocabulary matrix is never held: only one block of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kernels import CHUNK, block_stats, compiled_block_stats
from .norm import NormMode, apply_final_norm
from .reverse import ReverseIndex


@dataclass
class BlockResult:
    """Per-neuron results of one block, on the CPU. B = neurons in the block."""

    top_ids: Tensor  # (B, k) int32, best first
    top_logits: Tensor  # (B, k) fp32, exact
    top_probs: Tensor  # (B, k) fp32
    bottom_ids: Tensor  # (B, k) int32, most suppressed first
    bottom_logits: Tensor  # (B, k) fp32, exact
    logsumexp: Tensor  # (B,)
    entropy: Tensor  # (B,) nats
    w_norm: Tensor  # (B,) L2 norm of the raw weight vector
    logit_mean: Tensor  # (B,) moments of the logits over the vocabulary
    logit_std: Tensor
    logit_skew: Tensor
    logit_kurtosis: Tensor  # excess kurtosis


class Decoder:
    """Holds the LM-head on the device and decodes blocks of neuron vectors."""

    def __init__(
        self,
        W_U: Tensor,  # (d_vocab, d_model), stored dtype
        norm_gain: Tensor,  # (d_model,)
        norm_eps: float,
        norm: NormMode,
        top_k: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        softcap: float | None = None,
        compile: bool = False,
    ) -> None:
        self.device = device
        self.dtype = compute_dtype
        self.norm, self.eps, self.top_k, self.softcap = norm, norm_eps, top_k, softcap
        self.gain = norm_gain.to(device, torch.float32)
        self.W_U = W_U.to(device)  # stored dtype: exact rows for rescoring
        self.W_U_c = self.W_U.to(compute_dtype)  # the GEMM operand (same tensor if same dtype)
        self.d_vocab, self.d_model = W_U.shape
        self.mean_u = self.W_U.float().mean(0)  # (d_model,): mean logit = x . mean_u
        self.exact = compute_dtype == torch.float32 and W_U.dtype == torch.float32
        # Candidates rescored in fp32: generous when the GEMM is low precision.
        self.n_cand = min(self.d_vocab, top_k if self.exact else 2 * top_k + 8)
        self._stats = compiled_block_stats(device.type) if compile else None
        n_full = self.d_vocab // CHUNK * CHUNK
        self._tail = torch.arange(n_full, self.d_vocab, device=device)  # tokens past full chunks

    def logits(self, x: Tensor) -> Tensor:
        """(B, d_model) fp32 normed vectors -> (B, d_vocab) logits in the compute dtype."""
        L = x.to(self.dtype) @ self.W_U_c.T
        if self.softcap:
            L = torch.tanh(L.float() / self.softcap) * self.softcap
        return L

    def decode(
        self, W: Tensor, refs: Tensor | None = None, reverse: ReverseIndex | None = None
    ) -> BlockResult:
        """Decode neuron vectors W (B, d_model); offer them to `reverse` under ids `refs`."""
        W = W.to(self.device)
        x = apply_final_norm(W, self.gain, self.eps, self.norm)  # (B, d_model) fp32
        L = self.logits(x)
        mu = x @ self.mean_u  # (B,)
        if self.softcap:
            mu = L.float().mean(1)
        threshold = reverse.threshold if reverse is not None else self._no_threshold()
        fn = self._stats if self._stats is not None else block_stats
        st = fn(L, mu, threshold)
        lse = st.lse
        top_ids, top_logits, top_approx = self._extreme(x, L, st.chunk_max, largest=True)
        bot_ids, bot_logits, _ = self._extreme(x, L, st.chunk_min, largest=False)
        if not self.exact:
            # Replace the approximate mass of the rescored candidates by their exact mass.
            delta = torch.exp(top_logits - lse[:, None]) - torch.exp(top_approx - lse[:, None])
            lse = lse + torch.log1p(delta.sum(1).clamp_min(-0.999999))
        if reverse is not None and refs is not None:
            mask = None if reverse.filling else st.reverse_mask
            reverse.update(L, lse, refs.to(self.device), mask)
        k = self.top_k
        var = st.m2.clamp_min(1e-30)
        return BlockResult(
            top_ids=top_ids[:, :k].int().cpu(),
            top_logits=top_logits[:, :k].cpu(),
            top_probs=torch.exp(top_logits[:, :k] - lse[:, None]).cpu(),
            bottom_ids=bot_ids[:, :k].int().cpu(),
            bottom_logits=bot_logits[:, :k].cpu(),
            logsumexp=lse.cpu(),
            entropy=st.entropy.cpu(),
            w_norm=W.float().norm(dim=1).cpu(),
            logit_mean=mu.cpu(),
            logit_std=var.sqrt().cpu(),
            logit_skew=(st.m3 / var**1.5).cpu(),
            logit_kurtosis=(st.m4 / var**2 - 3.0).cpu(),
        )

    def _extreme(
        self, x: Tensor, L: Tensor, chunk_best: Tensor, largest: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top (or bottom) candidates: ids, exact fp32 logits, approximate logits; best first."""
        n = self.n_cand
        B = L.shape[0]
        n_chunks = chunk_best.shape[1]
        k_chunks = min(n, n_chunks)
        cols = []
        if k_chunks:
            best_chunks = chunk_best.topk(k_chunks, dim=1, largest=largest).indices  # (B, kc)
            offs = torch.arange(CHUNK, device=L.device)
            cols.append((best_chunks[:, :, None] * CHUNK + offs).reshape(B, -1))
        if self._tail.numel():
            cols.append(self._tail.expand(B, -1))
        cand = torch.cat(cols, dim=1)  # (B, c) token ids that must hold the extremes
        approx = L.gather(1, cand).float()
        pick = approx.topk(min(n, cand.shape[1]), dim=1, largest=largest).indices
        ids = cand.gather(1, pick)  # (B, n)
        approx = approx.gather(1, pick)
        exact = self._exact_logits(x, ids)
        order = exact.argsort(dim=1, descending=largest)
        return ids.gather(1, order), exact.gather(1, order), approx.gather(1, order)

    def _exact_logits(self, x: Tensor, ids: Tensor) -> Tensor:
        """fp32 logits of tokens ids (B, n) for vectors x (B, d_model)."""
        U = self.W_U[ids].float()  # (B, n, d_model)
        L = torch.einsum("bnd,bd->bn", U, x)
        if self.softcap:
            L = torch.tanh(L / self.softcap) * self.softcap
        return L

    def _no_threshold(self) -> Tensor:
        if not hasattr(self, "_inf"):
            self._inf = torch.full((self.d_vocab,), float("inf"), device=self.device)
        return self._inf
