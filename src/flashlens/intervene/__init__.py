"""Interventions: clamp neurons while a transformers model runs, measure, steer generation.

    from flashlens import Neuron, clamp
    with clamp(model, [Neuron(12, 1234, "up")], value=10.0):
        model.generate(...)

transformers is imported only when a model is loaded (`load_model`).
"""

from .concept import concept_variants, model_concept
from .dose import ActivationRange, DoseResponse, activation_ranges, dose_response
from .generate import Steering, steer
from .hooks import clamp, record
from .loading import LoadedModel, load_model
from .neuron import Neuron
from .validate import ValidationReport, validate

__all__ = [
    "ActivationRange",
    "DoseResponse",
    "LoadedModel",
    "Neuron",
    "Steering",
    "ValidationReport",
    "activation_ranges",
    "clamp",
    "concept_variants",
    "dose_response",
    "load_model",
    "model_concept",
    "record",
    "steer",
    "validate",
]
