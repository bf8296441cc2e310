from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .helpers import STORIES, shared_path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ahead-of-time kernel packages go to a folder of this session, never to ~/.cache."""
    folder = tmp_path_factory.mktemp("kernel-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHLENS_KERNEL_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def stories() -> Path:
    """The real trained tiny Llama in ../shared (fails under CI if missing)."""
    return shared_path(*STORIES.split("/"))


@pytest.fixture(scope="session")
def stories_atlas(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """An fp32 atlas of stories260K, all matrices and layers (shared by read-only tests)."""
    from flashlens import map_model

    out = tmp_path_factory.mktemp("atlas") / "stories"
    map_model(stories, out, compile="off")
    return out


@pytest.fixture(scope="session")
def stories_bf16(tmp_path_factory: pytest.TempPathFactory, stories: Path) -> Path:
    """stories260K with every tensor stored in bf16 (config and tokenizer unchanged)."""
    out = tmp_path_factory.mktemp("stories-bf16")
    for f in stories.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(stories / "model.safetensors")
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(bf16, out / "model.safetensors", metadata={"format": "pt"})
    return out
