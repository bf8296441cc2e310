"""The registry of architecture families: architecture name -> `Family`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedModelError
from .base import Family

_FAMILIES: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; refuse a duplicate family name or architecture."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    for arch in family.architectures:
        if arch in _BY_ARCH:
            raise ValueError(f"architecture {arch!r} is already registered")
    _FAMILIES[family.name] = family
    for arch in family.architectures:
        _BY_ARCH[arch] = family
    return family


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def family_for(config: Mapping[str, Any]) -> Family:
    """The family of a Hugging Face config dict, checked against what the family supports."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            family = _BY_ARCH[arch]
            family.check_config(config)
            return family
    named = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {named}; flashlens supports: "
        f"{', '.join(supported_architectures())}"
    )
