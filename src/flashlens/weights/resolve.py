"""Turn the MODEL argument (a local folder or a Hugging Face id) into a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import is_hub_id, require_path
from ..errors import CheckpointError

# What `map` needs from the hub: never optimizer states, ONNX exports, GGUF, ...
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "chat_template.json",  # (newer repos keep the chat template beside tokenizer_config.json)
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
]
HUB_FALLBACK_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A local folder as is, or a hub id downloaded (config, tokenizer, safetensors only)."""
    path = Path(require_path(model, "model (a folder or a Hugging Face id)")).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"no config.json in {path}; pass a Hugging Face model folder")
        return path
    text = str(model)
    if not is_hub_id(text):
        raise CheckpointError(
            f"model folder {text} does not exist (nor is it a Hugging Face id like org/name)"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = [f.rfilename for f in HfApi().model_info(repo_id).siblings or []]
        patterns = list(HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in files):
            patterns += HUB_FALLBACK_PATTERNS
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # offline, DNS, HTTP 401/404, ...: the hub's errors vary by version
        # The cache may still hold a complete snapshot.
        try:
            return Path(
                snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
            )
        except Exception:
            pass
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}); "
            "download it where the hub can be reached (e.g. `hf download "
            f"{repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass that folder instead"
        ) from None
