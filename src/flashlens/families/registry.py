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
    supported = ", ".join(supported_architectures())
    if not archs:
        model_type = config.get("model_type")
        named = [a for a, f in sorted(_BY_ARCH.items()) if f.name == model_type]
        example = f', e.g. "architectures": ["{named[0]}"]' if len(named) == 1 else ""
        raise UnsupportedModelError(
            f'config.json has no "architectures" field (model_type={model_type!r}), so the '
            f"model class is unknown: add it to config.json{example}; flashlens supports: "
            f"{supported}"
        )
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(archs)}; flashlens supports: {supported}"
    )
