"""Errors a user can act on.

`FlashlensError` is raised for user mistakes and bad input (a missing folder, a truncated
checkpoint, an out-of-range neuron, ...). Its message says what was wrong and how to fix it;
the CLI prints it as one line with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlashlensError(Exception):
    """A problem with the user's input, explained in one line."""


class CheckpointError(FlashlensError):
    """A model checkpoint is missing, truncated or unreadable."""


class UnsupportedModelError(FlashlensError):
    """An architecture or config feature flashlens does not handle."""


class AtlasError(FlashlensError):
    """An atlas folder is missing, incomplete, corrupt or was made with other settings."""


class NeuronError(FlashlensError):
    """A neuron address is malformed or out of range."""
