"""Reading checkpoints without building the model: hub id or folder -> lazy tensors."""

from .checkpoint import Checkpoint
from .resolve import resolve_model
from .source import ModelSource, config_hash

__all__ = ["Checkpoint", "ModelSource", "config_hash", "resolve_model"]
