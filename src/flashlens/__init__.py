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
from .atlas import TokenScore as TokenScore
from .atlas.concepts import TokenVariant as TokenVariant
from .atlas.prob import TokenProb as TokenProb
from .atlas.query import SearchHit as SearchHit
from .atlas.query import SearchResult as SearchResult
from .atlas.stats import AtlasStats as AtlasStats
from .comparison import Comparison as Comparison
from .comparison import compare as compare
from .errors import FlashlensError as FlashlensError
from .intervene import Neuron as Neuron
from .intervene import clamp as clamp
from .intervene import load_model as load_model
from .mapping import map_model as map_model

__all__ = [
    "Atlas",
    "AtlasStats",
    "Comparison",
    "FlashlensError",
    "Neuron",
    "NeuronRecord",
    "SearchHit",
    "SearchResult",
    "TokenProb",
    "TokenScore",
    "TokenVariant",
    "__version__",
    "clamp",
    "compare",
    "load_model",
    "map_model",
]
