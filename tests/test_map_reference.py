"""Every decoded neuron equals softmax(lm_head(final_norm(w))) from the model's own modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashlens import Atlas, map_model

from .helpers import (
    AMX_ONLY,
    FAMILIES,
    U7_ONLY,
    make_model,
    matrices_of,
    reference_logits,
    use_int8_kernel,
)

MATRICES = ("up", "gate", "down")


def layer_rows(atlas: Atlas, matrix: str, layer: int) -> dict[str, torch.Tensor]:
    t = atlas.layer_table(matrix, layer).to_pydict()
    return {k: torch.tensor(v) for k, v in t.items() if k != "matrix"}


def check_exact(atlas: Atlas, model: Path, matrix: str, layer: int, norm: str) -> None:
    """fp32 path: every stored number matches the reference (1e-5 relative)."""
    L = reference_logits(model, matrix, layer, norm).double()  # (d_mlp, V)
    rows = layer_rows(atlas, matrix, layer)
    k = atlas.meta.top_k
    lse = torch.logsumexp(L, 1)
    p = torch.softmax(L, 1)
    top = L.topk(k, 1)
    bot = L.topk(k, 1, largest=False)
    tol = 1e-5  # rtol and atol
    assert torch.equal(rows["index"], torch.arange(L.shape[0], dtype=torch.int32))
    torch.testing.assert_close(rows["top_logits"].double(), top.values, rtol=tol, atol=tol)
    torch.testing.assert_close(
        rows["top_probs"].double(), p.gather(1, top.indices), rtol=tol, atol=tol
    )
    torch.testing.assert_close(rows["bottom_logits"].double(), bot.values, rtol=tol, atol=tol)
    # ids: equal wherever the reference has no exact tie at that rank
    ids = rows["top_ids"].long()
    torch.testing.assert_close(L.gather(1, ids), top.values, rtol=tol, atol=tol)
    torch.testing.assert_close(
        L.gather(1, rows["bottom_ids"].long()), bot.values, rtol=tol, atol=tol
    )
    torch.testing.assert_close(rows["logsumexp"].double(), lse, rtol=tol, atol=tol)
    entropy = -(p * torch.log_softmax(L, 1)).sum(1)
    torch.testing.assert_close(rows["entropy"].double(), entropy, rtol=tol, atol=tol)
    mu, sd = L.mean(1), L.std(1, correction=0)
    z = (L - mu[:, None]) / sd[:, None]
    torch.testing.assert_close(rows["logit_mean"].double(), mu, rtol=tol, atol=tol)
    torch.testing.assert_close(rows["logit_std"].double(), sd, rtol=tol, atol=tol)
    torch.testing.assert_close(rows["logit_skew"].double(), (z**3).mean(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        rows["logit_kurtosis"].double(), (z**4).mean(1) - 3, rtol=1e-4, atol=1e-4
    )


def check_tolerance(atlas: Atlas, model: Path, matrix: str, layer: int, norm: str) -> None:
    """Low-precision path, against the fp32 reference, with the README's stated tolerances."""
    L = reference_logits(model, matrix, layer, norm).double()
    rows = layer_rows(atlas, matrix, layer)
    k = atlas.meta.top_k
    top = L.topk(k, 1)
    p = torch.softmax(L, 1)
    near_tie = (top.values[:, 0] - top.values[:, 1]) < 1e-3
    same = rows["top_ids"][:, 0].long() == top.indices[:, 0]
    assert bool((same | near_tie).all()), "top-1 differs where the fp32 top-2 are not tied"
    torch.testing.assert_close(rows["top_logits"].double(), top.values, rtol=1e-3, atol=1e-4)
    ids = rows["top_ids"].long()
    torch.testing.assert_close(rows["top_probs"].double(), p.gather(1, ids), rtol=1e-2, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_every_family_matrix_and_norm_mode_fp32(tmp_path: Path, family: str, tie: bool) -> None:
    model = make_model(tmp_path / "m", family, tie=tie, n_layers=2)
    for norm in ("model", "gain", "none"):
        out = tmp_path / f"atlas-{norm}"
        map_model(model, out, norm=norm, compile="off")
        atlas = Atlas.open(out)
        assert atlas.meta.compute_dtype == "float32" and atlas.meta.family == family
        assert tuple(atlas.meta.matrices) == matrices_of(family)
        for matrix in matrices_of(family):
            for layer in (0, 1):
                check_exact(atlas, model, matrix, layer, norm)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharded_checkpoint(tmp_path: Path, family: str) -> None:
    model = make_model(tmp_path / "m", family, shard_size="40KB", n_layers=3)
    assert (model / "model.safetensors.index.json").is_file()
    assert len(list(model.glob("*.safetensors"))) > 2
    map_model(model, tmp_path / "a", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    for matrix in MATRICES:
        check_exact(atlas, model, matrix, 2, "model")


def test_pytorch_bin_fallback(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    check_exact(Atlas.open(tmp_path / "a"), model, "up", 1, "model")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_low_precision_path(tmp_path: Path, family: str) -> None:
    model = make_model(
        tmp_path / "m", family, dtype=torch.bfloat16, d_vocab=512, d_model=64, d_mlp=64, n_layers=2
    )
    for dtype, expect in (("bfloat16", "bfloat16"), ("int8", "int8"), ("float32", "float32")):
        out = tmp_path / f"a-{dtype}"
        map_model(model, out, dtype=dtype, compile="off")
        atlas = Atlas.open(out)
        assert atlas.meta.weight_dtype == "bfloat16" and atlas.meta.compute_dtype == expect
        for matrix in matrices_of(family):
            if dtype == "float32":  # bf16 weights upcast exactly: the fp32 path is exact
                check_exact(atlas, model, matrix, 1, "model")
            else:
                check_tolerance(atlas, model, matrix, 1, "model")
        if dtype != "float32":  # its entries made exact at the end (Decoder.exact_pairs)
            check_reverse_tolerance(atlas, model, list(matrices_of(family)), [0, 1])


def test_a_layer_s_weights_are_freed_once_it_is_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a layer maps, no earlier layer's weights are alive: only it, and the next one
    being read. (The first layer's read, started beside the LM-head's, held its weights to the
    end of the map: 0.1 GiB more of peak memory at Llama-3.1-8B shapes.)"""
    import weakref

    from flashlens import mapping
    from flashlens.decode.engine import Decoder

    model = make_model(tmp_path / "m", d_vocab=512, d_model=64, d_mlp=64, n_layers=4)
    reads: list[weakref.ref[torch.Tensor]] = []
    load, decode = mapping._load, Decoder.decode_padded

    def spy_load(*args: object) -> torch.Tensor:
        W = load(*args)  # type: ignore[arg-type]
        reads.append(weakref.ref(W))
        return W

    alive: list[list[int]] = []  # per block: the layers read before its own still alive

    def spy_decode(self: Decoder, W: torch.Tensor, *args: object, **kwargs: object) -> object:
        mine = next(i for i, r in enumerate(reads) if r() is W._base)  # (W: a block's rows)
        alive.append([i for i, r in enumerate(reads[:mine]) if r() is not None])
        return decode(self, W, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mapping, "_load", spy_load)
    monkeypatch.setattr(Decoder, "decode_padded", spy_decode)
    monkeypatch.setenv("FLASHLENS_COMMIT_SECONDS", "0")  # a snapshot after every layer
    map_model(model, tmp_path / "a", matrices="up", block=64, compile="off", audit=0)
    assert len(reads) == 4 and alive == [[], [], [], []]


def test_an_fp32_map_of_a_bf16_head_reads_it_once_into_fp32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dtype float32 over a bf16 checkpoint (auto's choice on CPUs without fast bf16 or int8
    products): the LM-head is read from the file once, straight into fp32, never copied whole
    in bf16 first (1 GiB at Llama-3.1-8B shapes beside its 2 GiB fp32 copy, at map's peak).
    The bf16 map reads it in bf16. Both atlases are right."""
    from flashlens.weights import Checkpoint, ModelSource

    model = make_model(
        tmp_path / "m", dtype=torch.bfloat16, d_vocab=512, d_model=64, d_mlp=64, n_layers=2
    )
    source = ModelSource.open(model)
    head = source.W_U_name
    source.close()
    reads: list[torch.dtype | None] = []
    get = Checkpoint.get

    def spy(self: Checkpoint, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name == head:
            reads.append(dtype)
        return get(self, name, dtype)

    monkeypatch.setattr(Checkpoint, "get", spy)
    map_model(model, tmp_path / "fp32", matrices="up", dtype="float32", compile="off")
    assert reads == [torch.float32]
    check_exact(Atlas.open(tmp_path / "fp32"), model, "up", 1, "model")
    reads.clear()
    map_model(model, tmp_path / "bf16", matrices="up", dtype="bfloat16", compile="off")
    assert reads == [torch.bfloat16]
    check_tolerance(Atlas.open(tmp_path / "bf16"), model, "up", 1, "model")


@pytest.mark.parametrize(
    ("dtype", "d_model", "expect", "kernel"),
    [
        ("bfloat16", 128, "bfloat16", "int_mm"),
        ("int8", 1024, "int8", "int_mm"),
        pytest.param("int8", 1024, "int8", "u7", marks=U7_ONLY),
        pytest.param("int8", 1024, "int8", "amx", marks=AMX_ONLY),
        ("auto", 128, "bfloat16", "int_mm"),
    ],
)
def test_low_precision_at_realistic_vocabulary(
    tmp_path: Path,
    dtype: str,
    d_model: int,
    expect: str,
    kernel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 or int8 compute on a wide, realistic-size vocabulary still meets the tolerances.

    int8 rounds each operand to 1/127 of its row's largest entry: with d_model = 128 the
    logits move enough (probabilities up to 1.4% off over 128,256 tokens) that auto's pilot
    steps down to bf16; with 1024 (and real 4096-wide models) int8 is well within them. So is
    the "u7" kernel (AVX2 CPUs), whose activations take 7 bits, with its 16 spare reverse
    entries per token (with 8, a stored neuron was 0.11 nats short of its token's top N)."""
    from flashlens.decode import policy

    use_int8_kernel(monkeypatch, kernel)

    monkeypatch.setattr(policy, "LOW_PRECISION_FLOPS", 0.0)
    monkeypatch.setattr(policy, "cpu_has_fast_int8", lambda: True)
    monkeypatch.setattr(policy, "cpu_has_fast_bf16", lambda: True)
    model = make_model(
        tmp_path / "m",
        d_vocab=128256,
        d_model=d_model,
        d_mlp=64,
        n_layers=1,
        dtype=torch.bfloat16,
        tokenizer="tokenizers/llama3",
    )
    s = map_model(model, tmp_path / "a", matrices="up,down", dtype=dtype, compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.compute_dtype == expect and s.pilot is not None
    if dtype == "auto":  # int8 tried first, and stepped down from
        assert (s.pilot["dtype"], s.pilot["decision"]) == ("int8", "bfloat16")
        assert s.pilot["max_rel_prob"] > 0.005 and s.pilot["then"]["decision"] == "gemm"
    for matrix in ("up", "down"):
        check_tolerance(atlas, model, matrix, 0, "model")
    check_reverse_tolerance(atlas, model, ["up", "down"], [0])


def test_compiled_map_equals_eager_map(tmp_path: Path) -> None:
    """`map --compile on` (kernels compiled on placeholders while the head loads, on threads)
    writes the atlas the eager engine writes, within the stated tolerances: several blocks, a
    padded last block, the reverse index across them."""
    from flashlens.decode.kernels import compiled_block_stats

    if compiled_block_stats("cpu") is None:
        pytest.skip("no C compiler for inductor")
    model = make_model(
        tmp_path / "m", dtype=torch.bfloat16, d_vocab=512, d_model=64, d_mlp=80, n_layers=2
    )
    for mode in ("on", "off"):
        s = map_model(
            model, tmp_path / mode, matrices="up,down", block=32, compile=mode, dtype="bfloat16"
        )
        assert s.compiled == (mode == "on") and s.compute_dtype == "bfloat16"
    fast, slow = Atlas.open(tmp_path / "on"), Atlas.open(tmp_path / "off")
    for matrix in ("up", "down"):
        for layer in (0, 1):
            check_tolerance(fast, model, matrix, layer, "model")
            a, b = layer_rows(fast, matrix, layer), layer_rows(slow, matrix, layer)
            assert a["top_ids"].tolist() == b["top_ids"].tolist()
            torch.testing.assert_close(a["top_logits"], b["top_logits"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a["logsumexp"], b["logsumexp"], rtol=1e-4, atol=1e-4)
    check_reverse_tolerance(fast, model, ["up", "down"], [0, 1])


def check_reverse_tolerance(
    atlas: Atlas, model: Path, matrices: list[str], layers: list[int]
) -> None:
    """Low-precision reverse index (README): each stored log-probability within 1% (0.01 nat)
    of the fp32 reference, and each stored neuron in its token's brute-force top N up to ties
    within twice that: the best N are chosen by the stored values, so two of them, each off by
    up to 0.01 nat, can trade places across a gap of up to 0.02 (GLM-4.5's tiny model in int8
    stored a neuron 0.0104 nat short, from errors of 0.004 and 0.006). The map keeps spare
    entries per token and makes them exact at the end; without that, int8 at d_model 1024
    stored log-probabilities up to 0.66 nat off and neurons up to 0.74 nat short of the top N,
    bf16 0.18 nat."""
    import pyarrow.parquet as pq

    L = torch.cat([reference_logits(model, m, layer) for m in matrices for layer in layers])
    logP = torch.log_softmax(L.double(), dim=1)
    refs = [
        (layer, m, i) for m in matrices for layer in layers for i in range(atlas.meta.width(layer))
    ]
    row_of = {r: i for i, r in enumerate(refs)}
    nth = logP.topk(atlas.meta.reverse_n, dim=0).values[-1]  # (V,) brute-force N-th best
    rev = pq.read_table(atlas.reverse_path).to_pydict()
    rows = torch.tensor(
        [row_of[r] for r in zip(rev["layer"], rev["matrix"], rev["index"], strict=True)]
    )
    tok = torch.tensor(rev["token_id"])
    want = logP[rows, tok]
    tol = 0.01  # nats
    near_tie = 2 * tol
    got = torch.tensor(rev["prob"], dtype=torch.float64).log()
    err = (got - want).abs()
    assert bool((err <= tol).all()), f"worst error {float(err.max()):.4f} nats"
    short = float((nth[tok] - want).max())
    assert short <= near_tie, f"a stored neuron is {short:.3f} nats short of its token's top-N"
    assert len(rev["token_id"]) == atlas.meta.reverse_n * atlas.meta.d_vocab


def test_layers_and_matrices_subset(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", n_layers=4)
    map_model(model, tmp_path / "a", matrices="down", layers="1,3", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.layers == [1, 3] and atlas.meta.matrices == ["down"]
    check_exact(atlas, model, "down", 3, "model")
    assert not (tmp_path / "a" / "up").exists()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_softcap_key_left_out_of_config_is_transformers_default(
    tmp_path: Path, family: str
) -> None:
    """Without final_logit_softcapping in config.json, transformers caps Gemma 2's logits at
    its default (30.0) and Gemma 3's not at all: the atlas decodes as the model does."""
    import json

    model = make_model(tmp_path / "m", family, n_layers=1)
    config = json.loads((model / "config.json").read_text())
    config.pop("final_logit_softcapping", None)
    (model / "config.json").write_text(json.dumps(config))
    map_model(model, tmp_path / "a", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    for matrix in MATRICES:
        check_exact(atlas, model, matrix, 0, "model")


def test_the_atlas_records_how_the_head_was_applied(tmp_path: Path) -> None:
    """atlas.json says which soft-cap, norm eps and head tying the map resolved. A rerun of an
    atlas made before that was recorded, whose cap comes from the family's default (Gemma 2
    without the key), is refused: earlier versions mapped it uncapped. The key given in
    config.json, an old atlas resumes as before."""
    import json

    from flashlens.errors import AtlasError

    model = make_model(tmp_path / "m", "gemma2", n_layers=2)
    config = json.loads((model / "config.json").read_text())
    config.pop("final_logit_softcapping", None)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "a"
    map_model(model, out, compile="off", layers="0")
    meta_path = out / "atlas.json"
    meta = json.loads(meta_path.read_text())
    eps = config["rms_norm_eps"]
    tied = config.get("tie_word_embeddings", True)
    assert meta["decoding"] == {"norm_eps": eps, "logit_softcap": 30.0, "tied": tied}
    assert Atlas.open(out).meta.decoding == meta["decoding"]

    # another resolved cap with the same config (a later version's default): refused, named
    meta_path.write_text(json.dumps(meta | {"decoding": meta["decoding"] | {"logit_softcap": 50}}))
    with pytest.raises(AtlasError, match="decoding"):
        map_model(model, out, compile="off", layers="0")

    # an atlas from before `decoding`: refused, with the way out, and nothing removed
    del meta["decoding"]
    meta_path.write_text(json.dumps(meta))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(AtlasError, match=r"soft-cap.*--overwrite"):
        map_model(model, out, compile="off", layers="0")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    map_model(model, out, compile="off", layers="0", overwrite=True)
    assert Atlas.open(out).meta.decoding == {"norm_eps": eps, "logit_softcap": 30.0, "tied": tied}

    # the cap written in config.json: earlier versions read it, so an old atlas is kept
    config["final_logit_softcapping"] = 30.0
    (model / "config.json").write_text(json.dumps(config))
    out2 = tmp_path / "b"
    map_model(model, out2, compile="off", layers="0")
    meta = json.loads((out2 / "atlas.json").read_text())
    del meta["decoding"]
    (out2 / "atlas.json").write_text(json.dumps(meta))
    summary = map_model(model, out2, compile="off", layers="0")
    assert summary.neurons_mapped == 0 and summary.neurons_skipped > 0  # (complete: reused)
