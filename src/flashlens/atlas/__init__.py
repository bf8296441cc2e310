"""The atlas: on-disk format (atlas.json + Parquet), writer, reader and queries."""

from .atlas import Atlas, NeuronRecord, TokenScore, format_layers, parse_layers
from .format import AtlasMeta
from .validation import ValidationRecord

__all__ = [
    "Atlas",
    "AtlasMeta",
    "NeuronRecord",
    "TokenScore",
    "ValidationRecord",
    "format_layers",
    "parse_layers",
]
