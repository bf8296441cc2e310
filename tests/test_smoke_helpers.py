from pathlib import Path

import torch

from flashlens import Atlas, map_model

from .helpers import make_model, reference_probs


def test_tiny_llama_top1_matches_reference(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    map_model(model, tmp_path / "a", compile="off")
    atlas = Atlas.open(tmp_path / "a")
    ref = reference_probs(model, "up", 1)
    for i in range(ref.shape[0]):
        rec = atlas.neuron(1, i, "up")
        assert rec.top[0].token_id == int(ref[i].argmax())
        assert torch.isclose(torch.tensor(rec.top[0].prob, dtype=torch.float64), ref[i].max(), rtol=1e-4)
