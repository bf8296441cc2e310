"""Multimodal checkpoints (Gemma 3 4B-27B, Mistral Small 3.1, Qwen2.5-VL, Qwen3-VL): their
language model maps and clamps as a text model's does, whichever way the checkpoint spells its
tensors, with the settings config.json's text_config leaves out read as transformers reads
them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashlens import Atlas, map_model
from flashlens.cli import main
from flashlens.weights import ModelSource

from .helpers import MULTIMODAL, make_model, rewrite_weights
from .test_map_reference import check_exact

# how transformers 5 names the language model and head, against the original layout its
# save_pretrained writes (and the hub's files hold); Qwen3-VL's files use the module names
MODULE_NAMES = {
    "gemma3_multimodal": {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
    },
    "qwen2_vl": {"model.": "model.language_model."},
    "qwen3_vl": {},
    "qwen3_5_multimodal": {},
    "gemma4_multimodal": {},
}
MODULE_NAMES["mistral3"] = MODULE_NAMES["gemma3_multimodal"]


def _respell(model: Path, out: Path, spelling: dict[str, str]) -> Path:
    """A copy of `model` whose tensors carry transformers' module names."""

    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = {}
        for name, tensor in state.items():
            old = next((o for o in spelling if name.startswith(o)), None)
            renamed[name if old is None else spelling[old] + name.removeprefix(old)] = tensor
        assert renamed.keys() != state.keys()
        return renamed

    return rewrite_weights(model, out, rename)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_a_multimodal_checkpoint_maps_its_language_model_in_either_spelling(
    tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI maps the language model's neurons (not the vision tower's), exactly as the
    whole model's own forward decodes them; a checkpoint with transformers' module names
    maps to the same atlas; clamp runs the model from the command line."""
    model = make_model(tmp_path / "m", family, n_layers=2, d_mlp=24)
    state = ModelSource.open(model).checkpoint
    towers = ("vision_tower.", "visual.", "model.visual.", "model.vision_tower.")
    assert any(n.startswith(towers) for n in state)  # (a real vision tower beside it)
    widths = ModelSource.open(model).widths  # (Gemma 4's last layer twice as wide)
    assert main(["map", str(model), "-o", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["neurons_mapped"] == 3 * sum(widths)
    assert widths == ([24, 48] if family == "gemma4_multimodal" else [24, 24])
    a = Atlas.open(tmp_path / "a")
    assert a.meta.family == family and a.meta.d_vocab == 512 and a.meta.d_model == 32
    for matrix in ("up", "gate", "down"):
        for layer in (0, 1):
            check_exact(a, model, matrix, layer, "model")

    if MODULE_NAMES[family]:
        respelled = _respell(model, tmp_path / "respelled", MODULE_NAMES[family])
        map_model(respelled, tmp_path / "b", compile="off")
        b = Atlas.open(tmp_path / "b")
        for matrix in ("up", "gate", "down"):
            assert a.layer_table(matrix, 1).equals(b.layer_table(matrix, 1))
        assert a.meta.weights_fingerprint != b.meta.weights_fingerprint  # (other names)

    argv = ["clamp", str(model), "--neuron", "up:1:3", "--concept", "a", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert max(got["probs"]) != min(got["probs"])  # the clamp moved the concept


def test_text_config_keys_left_out_read_as_transformers_reads_them(tmp_path: Path) -> None:
    """Gemma 3's files leave keys out of text_config (vocab_size, rms_norm_eps): the map
    reads transformers' defaults for them, not the top level's or none."""
    model = make_model(tmp_path / "m", "gemma3_multimodal", n_layers=2, d_mlp=24)
    config = json.loads((model / "config.json").read_text())
    assert config["text_config"]["rms_norm_eps"] == 1e-5
    del config["text_config"]["rms_norm_eps"]  # Gemma3TextConfig's default: 1e-6
    config["rms_norm_eps"] = 0.5  # (not the language model's: ignored, as transformers does)
    (model / "config.json").write_text(json.dumps(config))
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.decoding is not None and atlas.meta.decoding["norm_eps"] == 1e-6
    # text_config sets a soft-cap (FAMILY_CONFIG) that Gemma3ForConditionalGeneration's
    # forward does not apply (Gemma3ForCausalLM's does): none, as the model runs
    assert atlas.meta.decoding["logit_softcap"] is None
    check_exact(atlas, model, "up", 1, "model")


def test_a_tied_config_whose_head_differs_runs_that_head(tmp_path: Path) -> None:
    """Mistral Small 3.1's config.json says nothing of tying, and Mistral3Config ties by
    default; its files hold a head of its own, which transformers 5 then runs untied. The map
    decodes through that head, and the weights fingerprint covers it."""
    model = make_model(tmp_path / "m", "mistral3", n_layers=2, d_mlp=24, tie=False)
    config = json.loads((model / "config.json").read_text())
    del config["tie_word_embeddings"]
    config["text_config"].pop("tie_word_embeddings", None)
    (model / "config.json").write_text(json.dumps(config))
    source = ModelSource.open(model)
    assert source.settings["tie_word_embeddings"] is True and not source.tied
    assert source.W_U_name == "language_model.lm_head.weight"
    fingerprint = source.fingerprint()
    source.close()
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.decoding is not None and atlas.meta.decoding["tied"] is False
    check_exact(atlas, model, "up", 1, "model")

    from safetensors.torch import load_file, save_file

    state = load_file(model / "model.safetensors")
    head = state["language_model.lm_head.weight"]
    state["language_model.lm_head.weight"] = head + torch.randn_like(head)
    save_file(state, model / "model.safetensors")
    assert ModelSource.open(model).fingerprint() != fingerprint


@pytest.mark.parametrize(
    ("text_config", "said"),
    [("mistral", "is not an object"), ({"model_type": "no_such_model"}, "transformers cannot")],
)
def test_a_damaged_text_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text_config: object, said: str
) -> None:
    model = make_model(tmp_path / "m", "mistral3", n_layers=1, d_mlp=24)
    config = json.loads((model / "config.json").read_text())
    config["text_config"] = text_config
    (model / "config.json").write_text(json.dumps(config))
    assert main(["map", str(model), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and said in err and "Traceback" not in err
    assert not (tmp_path / "a" / "atlas.json").exists()


def test_qwen2_5_vl_text_settings_at_the_top_level_read_as_text_config(tmp_path: Path) -> None:
    """Qwen2.5-VL's hub config.json holds the language model's settings at its top level,
    without a text_config; transformers reads them as the text model's, and so does map."""
    model = make_model(tmp_path / "m", "qwen2_vl", n_layers=2, d_mlp=24)
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    config = json.loads((model / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type")
    config.update(text)  # (vocab_size, hidden_size, rms_norm_eps, ... at the top level)
    (model / "config.json").write_text(json.dumps(config))
    source = ModelSource.open(model)
    assert (source.d_vocab, source.d_model, source.d_mlp) == (512, 32, 24)
    assert source.norm_eps == 1e-5  # (Qwen2.5-VL's default is 1e-6)
    map_model(model, tmp_path / "b", matrices="up", compile="off")
    a, b = Atlas.open(tmp_path / "a"), Atlas.open(tmp_path / "b")
    assert a.layer_table("up", 1).equals(b.layer_table("up", 1))


def test_gemma4_maps_its_wide_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Gemma 4's layers that reuse earlier layers' keys and values are twice as wide
    (use_double_wide_mlp): the atlas records each layer's width, `show` takes the wide
    layer's extra neurons and refuses them in a narrow one, and the natural activation ranges
    count the positions such a layer runs (only the last, under logits_to_keep=1). A mixture
    (enable_moe_block) with such wide layers is refused in one line."""
    from flashlens.intervene import Neuron, activation_ranges
    from flashlens.intervene.prompts import DEFAULT_PROMPTS, encode

    from .helpers import load_reference_model, tokenizer_of

    model = make_model(tmp_path / "m", "gemma4", n_layers=2, d_mlp=24)
    assert main(["map", str(model), "-o", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["neurons_mapped"] == 3 * (24 + 48)
    atlas = Atlas.open(tmp_path / "a")
    assert atlas.meta.widths == [24, 48] and atlas.meta.d_mlp == 48
    check_exact(atlas, model, "down", 1, "model")
    assert main(["show", str(tmp_path / "a"), "up:1:40"]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "a"), "up:0:40"]) == 2
    assert "layer 0 has 24 neurons" in capsys.readouterr().err

    lm, tok = load_reference_model(model), tokenizer_of(model)
    batch = encode(tok, DEFAULT_PROMPTS[:3], torch.device("cpu"))
    narrow, wide = Neuron(0, 3, "up"), Neuron(1, 40, "up")
    ranges = activation_ranges(lm, batch, [narrow, wide])
    real = int(batch["attention_mask"].sum())
    assert ranges[narrow].tokens == real and real > 3  # (every real position)
    assert ranges[wide].tokens == 3  # (the last position of each prompt)

    config = json.loads((model / "config.json").read_text())
    config.update(enable_moe_block=True, num_experts=4)  # (the mixtures' entry, then)
    (model / "config.json").write_text(json.dumps(config))
    assert main(["map", str(model), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "gemma4_moe config has use_double_wide_mlp=True" in err and "Traceback" not in err


def test_qwen3_vl_moe_experts_read_either_way_round(tmp_path: Path) -> None:
    """Qwen3-VL's mixtures: the hub's files hold each layer's experts transposed, (E, d_model,
    2 m) and (E, m, d_model), transformers 5's saves as its modules hold them: both map to the
    same atlas, exactly as the model decodes (transformers loads either)."""
    model = make_model(tmp_path / "m", "qwen3_vl_moe", n_layers=2, d_mlp=24)
    experts = ("experts.gate_up_proj", "experts.down_proj")

    def transpose(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stacked = [n for n in state if n.endswith(experts)]
        assert len(stacked) == 4 and state[stacked[0]].shape[1] != state[stacked[0]].shape[2]
        return {n: t.transpose(1, 2).contiguous() if n in stacked else t for n, t in state.items()}

    hub = rewrite_weights(model, tmp_path / "hub", transpose)
    for folder, out in ((model, "a"), (hub, "b")):
        map_model(folder, tmp_path / out, compile="off")
    a, b = Atlas.open(tmp_path / "a"), Atlas.open(tmp_path / "b")
    for matrix in ("up", "gate", "down"):
        assert a.layer_table(matrix, 1).equals(b.layer_table(matrix, 1))
        check_exact(b, hub, matrix, 1, "model")
