"""flashlens: explain every MLP neuron of a language model through its own LM-head.

import flashlens
flashlens.map_model("meta-llama/Llama-3.1-8B", "atlas/llama31-8b")
atlas = flashlens.Atlas.open("atlas/llama31-8b")
atlas.neuron(12, 1234, matrix="up").top
"""

from __future__ import annotations

__version__ = "0.1.0"

from .atlas import Atlas as Atlas
from .atlas import NeuronRecord as NeuronRecord
from .errors import FlashlensError as FlashlensError
from .mapping import map_model as map_model

__all__ = ["Atlas", "FlashlensError", "NeuronRecord", "__version__", "map_model"]
