"""Interventions: clamp neurons while a transformers model runs, measure, steer generation.

from flashlens import Neuron, clamp
with clamp(model, [Neuron(12, 1234, "up")], value=10.0):
    model.generate(...)
"""

from .concept import concept_variants, model_concept
from .dose import ActivationRange, DoseResponse, activation_ranges, dose_response
from .hooks import clamp, record
from .neuron import Neuron

__all__ = [
    "ActivationRange",
    "DoseResponse",
    "Neuron",
    "activation_ranges",
    "clamp",
    "concept_variants",
    "dose_response",
    "model_concept",
    "record",
]
