"""The real trained model in ../shared: atlas and reverse index against brute force."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from flashlens import Atlas

from .helpers import reference_probs
from .test_map_reference import check_exact

MATRICES = ("up", "gate", "down")


def test_stories_atlas_matches_reference(stories_atlas: Path, stories: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    m = atlas.meta
    assert (m.n_layers, m.d_mlp, m.d_vocab, m.d_model) == (5, 172, 512, 64)
    assert m.architecture == "LlamaForCausalLM" and m.complete
    for matrix in MATRICES:
        for layer in range(m.n_layers):
            check_exact(atlas, stories, matrix, layer, "model")


def test_reverse_index_matches_brute_force(stories_atlas: Path, stories: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    m = atlas.meta
    # Brute force: (neurons, V) probabilities over every layer and matrix.
    probs, refs = [], []
    for matrix in MATRICES:
        for layer in range(m.n_layers):
            probs.append(reference_probs(stories, matrix, layer))
            refs += [(layer, matrix, i) for i in range(m.d_mlp)]
    P = torch.cat(probs)  # (3 * 5 * 172, 512)
    top = P.topk(m.reverse_n, dim=0)  # (N, V)
    rev = pq.read_table(stories_atlas / "reverse.parquet").to_pydict()
    assert len(rev["token_id"]) == m.reverse_n * m.d_vocab
    got: dict[int, list[tuple[int, int, str, int, float]]] = {}  # rank, layer, matrix, index, p
    for t, r, layer, matrix, idx, p in zip(
        rev["token_id"],
        rev["rank"],
        rev["layer"],
        rev["matrix"],
        rev["index"],
        rev["prob"],
        strict=True,
    ):
        got.setdefault(t, []).append((r, layer, matrix, idx, p))
    for v in range(m.d_vocab):
        entries = sorted(got[v])
        assert [e[0] for e in entries] == list(range(m.reverse_n))
        want_p = top.values[:, v]
        torch.testing.assert_close(
            torch.tensor([e[4] for e in entries], dtype=torch.float64), want_p, rtol=1e-4, atol=1e-9
        )
        # the neurons: identical except where brute-force probabilities tie
        for rank, (_, layer, matrix, idx, _) in enumerate(entries):
            want = refs[int(top.indices[rank, v])]
            if (layer, matrix, idx) != want:
                row = refs.index((layer, matrix, idx))
                assert abs(float(P[row, v]) - float(want_p[rank])) < 1e-6 * float(want_p[rank])


def test_show_record(stories_atlas: Path, stories: Path) -> None:
    atlas = Atlas.open(stories_atlas)
    rec = atlas.neuron(3, 17, "gate")
    p = reference_probs(stories, "gate", 3)[17]
    assert [t.token_id for t in rec.top] == p.topk(10).indices.tolist()
    assert rec.top[0].text == atlas.texts[rec.top[0].token_id]
    assert abs(sum(t.prob for t in rec.top) - float(p.topk(10).values.sum())) < 1e-5
