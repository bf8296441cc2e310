"""`Neuron`: a typed address of one MLP neuron, and where a clamp acts on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from ..checks import is_integer
from ..errors import NeuronError
from ..families import MATRICES, Matrix

# Where a clamp acts, per layer:
#   up   - the up_proj output (d_mlp,)          pre-activation of the linear branch
#   gate - the gate_proj output (d_mlp,)        pre-activation of the gate, before act_fn
#   act  - the input of down_proj (d_mlp,)      the neuron's activation act_fn(gate) * up
Site = Literal["up", "gate", "act"]
SITES: tuple[Site, ...] = ("up", "gate", "act")
_NUMBER = re.compile(r"-?[0-9]+")

# How a clamp changes the activation h: set (h = v), add (h + v), scale (h * v)
Mode = Literal["set", "add", "scale"]

SITE_TENSORS: dict[Site, str] = {
    "up": "up_proj output",
    "gate": "gate_proj output",
    "act": "down_proj input",
}

# By default a clamp acts where the matrix a neuron was decoded from reads or writes.
DEFAULT_SITE: dict[Matrix, Site] = {"up": "up", "gate": "gate", "down": "act"}


@dataclass(frozen=True, order=True)
class Neuron:
    """One MLP neuron: `Neuron(12, 1234, "up")` is row 1234 of layer 12's W_up."""

    layer: int
    index: int
    matrix: Matrix = "up"

    def __post_init__(self) -> None:
        if not (is_integer(self.layer) and is_integer(self.index)):
            raise NeuronError(
                f"bad neuron {self.layer!r}:{self.index!r}: layer and index must be integers"
            )
        if self.matrix not in MATRICES:
            raise NeuronError(
                f"bad matrix {self.matrix!r} for neuron {self.layer}:{self.index}: "
                f"use {', '.join(MATRICES)}"
            )
        if self.layer < 0 or self.index < 0:
            raise NeuronError(
                f"bad neuron {self.layer}:{self.index}: layer and index are non-negative"
            )

    @classmethod
    def parse(cls, spec: str, matrix: str | None = None) -> Neuron:
        """'up:12:1234' or '12:1234' (then `matrix`, default up) -> Neuron. A spec that names
        its matrix and a `matrix` that names another one are refused, not silently resolved."""
        if not isinstance(spec, str):
            raise NeuronError(f"bad neuron {spec!r}: write it as a string, e.g. '12:1234'")
        if matrix is not None and matrix not in MATRICES:  # the matrix given, not the neuron
            raise NeuronError(f"unknown matrix {matrix!r}: choose {', '.join(MATRICES)}")
        parts = spec.strip().split(":")
        if len(parts) == 3:
            named, *parts = parts
            if matrix is not None and named != matrix:
                raise NeuronError(
                    f"neuron {spec!r} names matrix {named!r} but the matrix given is "
                    f"{matrix!r}: drop one of them"
                )
            matrix = named
        matrix = "up" if matrix is None else matrix
        numbers = [p.strip() for p in parts]
        # ASCII digits only, as layer specs and the viewer read them (int() also takes '+3',
        # '1_0' and other scripts' digits); a sign is read so that '-3' is named as negative
        if len(numbers) != 2 or not all(_NUMBER.fullmatch(p) for p in numbers):
            raise NeuronError(
                f"bad neuron {spec!r}: write LAYER:INDEX or MATRIX:LAYER:INDEX, "
                "e.g. 12:1234 or up:12:1234"
            )
        layer, index = (int(p) for p in numbers)
        if matrix not in MATRICES:
            raise NeuronError(
                f"bad neuron {spec!r}: matrix {matrix!r} is not one of {', '.join(MATRICES)}"
            )
        return cls(layer, index, cast(Matrix, matrix))

    @classmethod
    def parse_list(cls, spec: str, matrix: str | None = None) -> list[Neuron]:
        """'12:1234,up:3:7' -> [Neuron(12, 1234, matrix), Neuron(3, 7, 'up')]."""
        neurons = [cls.parse(p, matrix) for p in spec.split(",") if p.strip()]
        if not neurons:
            raise NeuronError(f"no neurons in {spec!r}: write e.g. 12:1234,up:3:7")
        return neurons

    @property
    def default_site(self) -> Site:
        return DEFAULT_SITE[self.matrix]

    def __str__(self) -> str:
        return f"{self.matrix}:{self.layer}:{self.index}"
