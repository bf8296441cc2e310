"""The registry of architecture families: architecture name -> `Family` (or, where one
architecture has layouts that config.json tells apart, the entry whose `when` it matches)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedModelError
from .base import Family

_FAMILIES: dict[str, Family] = {}
_BY_ARCH: dict[str, list[Family]] = {}


def register(family: Family) -> Family:
    """Add a family; refuse a duplicate family name, or an architecture already registered
    without a `when` that tells the two entries apart."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    for arch in family.architectures:
        if any(f.when == family.when for f in _BY_ARCH.get(arch, [])):
            raise ValueError(f"architecture {arch!r} is already registered")
    _FAMILIES[family.name] = family
    for arch in family.architectures:
        # (the entries with a `when` first: the first that matches a config is its family)
        _BY_ARCH[arch] = sorted([*_BY_ARCH.get(arch, []), family], key=lambda f: not f.when)
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_FAMILIES.values())


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def family_for(config: Mapping[str, Any]) -> Family:
    """The family of a Hugging Face config dict, checked against what the family supports."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            family = next(f for f in _BY_ARCH[arch] if f.matches(config))
            family.check_config(config)
            return family
    supported = ", ".join(supported_architectures())
    if not archs:
        model_type = config.get("model_type")
        named = [a for a, fs in sorted(_BY_ARCH.items()) if fs[-1].name == model_type]
        example = f', e.g. "architectures": ["{named[0]}"]' if len(named) == 1 else ""
        raise UnsupportedModelError(
            f'config.json has no "architectures" field (model_type={model_type!r}), so the '
            f"model class is unknown: add it to config.json{example}; flashlens supports: "
            f"{supported}"
        )
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(archs)}; flashlens supports: {supported}"
    )
