"""Steered generation: baseline and clamped continuations of the same prompts, same seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import FlashlensError
from .hooks import Mode, Positions, as_neurons, clamp
from .neuron import Neuron, Site
from .prompts import encode


@dataclass
class Continuations:
    """`samples` continuations of one prompt, without and with the clamp."""

    prompt: str
    baseline: list[str]
    clamped: list[str]


@dataclass
class Steering:
    clamps: list[str]  # "up:12:1234=10"
    mode: str
    positions: str
    max_new_tokens: int
    samples: int
    temperature: float  # 0: greedy
    seed: int
    chat: bool
    results: list[Continuations]
    concept: str | None = None
    baseline_share: float | None = None  # share of continuations that mention the concept
    clamped_share: float | None = None
    baseline_concept_tokens: float | None = None  # concept tokens per continuation, mean
    clamped_concept_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 40,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> torch.Tensor:
    """New token ids, (len(prompts) * samples, max_new_tokens), padded after EOS; the
    samples of a prompt are consecutive rows. KV-cached, batched with left padding."""
    device = next(model.parameters()).device
    batch = encode(tokenizer, prompts, device, chat=chat)
    ids = batch["input_ids"].repeat_interleave(samples, dim=0)
    mask = batch["attention_mask"].repeat_interleave(samples, dim=0)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    new = out[:, ids.shape[1] :]
    if new.shape[1] < max_new_tokens:  # every row stopped early
        pad = new.new_full((new.shape[0], max_new_tokens - new.shape[1]), tokenizer.pad_token_id)
        new = torch.cat([new, pad], dim=1)
    return new


def check_temperature(temperature: float | None) -> None:
    """Refuse a sampling temperature that is not 0 (greedy), a positive number or None."""
    if temperature is not None and not 0 <= temperature < math.inf:
        raise FlashlensError(
            f"--temperature must be 0 (greedy) or a positive number (got {temperature:g})"
        )


def steer(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    neurons: Sequence[Neuron | str],
    values: float | Sequence[float],
    mode: Mode = "set",
    positions: Positions = "all",
    site: Site | None = None,
    max_new_tokens: int = 40,
    samples: int = 1,
    temperature: float | None = None,
    seed: int = 0,
    chat: bool = False,
    concept: str | None = None,
    concept_ids: Sequence[int] = (),
) -> Steering:
    """Continue each prompt `samples` times without and with the clamp (same seed for both).

    temperature None: greedy for one sample, 1.0 when sampling several.
    concept: counts the continuations that mention it (case-insensitive) and, with
    concept_ids, the concept tokens they contain.
    """
    check_temperature(temperature)
    chosen = as_neurons(neurons)
    per_neuron = [float(values)] * len(chosen) if isinstance(values, (int, float)) else list(values)
    temp = (1.0 if samples > 1 else 0.0) if temperature is None else temperature
    kw = dict(
        max_new_tokens=max_new_tokens, samples=samples, temperature=temp, seed=seed, chat=chat
    )
    base_ids = generate_ids(model, tokenizer, prompts, **kw)  # type: ignore[arg-type]
    with clamp(model, chosen, value=per_neuron, mode=mode, positions=positions, site=site):
        clamped_ids = generate_ids(model, tokenizer, prompts, **kw)  # type: ignore[arg-type]
    base_txt = tokenizer.batch_decode(base_ids, skip_special_tokens=True)
    clamped_txt = tokenizer.batch_decode(clamped_ids, skip_special_tokens=True)
    results = [
        Continuations(
            p,
            base_txt[i * samples : (i + 1) * samples],
            clamped_txt[i * samples : (i + 1) * samples],
        )
        for i, p in enumerate(prompts)
    ]
    steering = Steering(
        [f"{n}={v:g}" for n, v in zip(chosen, per_neuron, strict=True)],
        mode,
        positions,
        max_new_tokens,
        samples,
        temp,
        seed,
        chat,
        results,
    )
    if concept:
        key = concept.strip().lower()
        steering.concept = key
        steering.baseline_share = mention_share(base_txt, key)
        steering.clamped_share = mention_share(clamped_txt, key)
        if concept_ids:
            steering.baseline_concept_tokens = concept_token_rate(base_ids, concept_ids)
            steering.clamped_concept_tokens = concept_token_rate(clamped_ids, concept_ids)
    return steering


def mention_share(texts: list[str], concept: str) -> float:
    """Share of texts that contain `concept` (case-insensitive substring)."""
    return sum(concept.lower() in t.lower() for t in texts) / max(len(texts), 1)


def concept_token_rate(ids: torch.Tensor, concept_ids: Sequence[int]) -> float:
    """Concept tokens per continuation, mean over rows of ids (rows, new_tokens)."""
    hits = torch.isin(ids, torch.tensor(list(concept_ids), device=ids.device))
    return float(hits.sum(-1).double().mean())
