"""Steered generation: baseline and clamped continuations of the same prompts, same seeds."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import FlashlensError
from .dose import ActivationRange, activation_ranges
from .hooks import Mode, Positions, check_neurons, clamp, clamp_sites
from .neuron import Neuron, Site
from .prompts import encode, length_note


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
    site: str | None = None  # the site asked for; None: each neuron's default (by matrix)
    sites: dict[str, str] = field(default_factory=dict)  # where each neuron's clamp acted
    # each neuron's natural activation at its site on the prompts: what a value is measured by
    ranges: dict[str, ActivationRange] = field(default_factory=dict)
    concept: str | None = None
    # share of continuations that mention the concept as a whole word, case-insensitive
    baseline_share: float | None = None
    clamped_share: float | None = None
    baseline_concept_tokens: float | None = None  # concept tokens per continuation, mean
    clamped_concept_tokens: float | None = None
    notes: list[str] = field(default_factory=list)

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
    concept: counts the continuations that mention it (a whole word, case-insensitive) and,
    with concept_ids, the mean number of concept tokens per continuation.
    """
    check_temperature(temperature)
    chosen = check_neurons(model, neurons, site)
    per_neuron = [float(values)] * len(chosen) if isinstance(values, (int, float)) else list(values)
    temp = (1.0 if samples > 1 else 0.0) if temperature is None else temperature
    kw = dict(
        max_new_tokens=max_new_tokens, samples=samples, temperature=temp, seed=seed, chat=chat
    )
    batch = encode(tokenizer, prompts, next(model.parameters()).device, chat=chat)
    ranges = activation_ranges(model, batch, chosen, site)
    base_ids = generate_ids(model, tokenizer, prompts, **kw)  # type: ignore[arg-type]
    with clamp(model, chosen, value=per_neuron, mode=mode, positions=positions, site=site):
        clamped_ids = generate_ids(model, tokenizer, prompts, **kw)  # type: ignore[arg-type]
    base_txt = continuations(tokenizer, batch, base_ids)
    clamped_txt = continuations(tokenizer, batch, clamped_ids)
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
        site,
        dict(clamp_sites(chosen, site)),
        {str(n): r for n, r in ranges.items()},
    )
    note = length_note(model, batch, max_new_tokens)
    steering.notes += [note] if note else []
    if concept:
        key = concept.strip().lower()
        steering.concept = key
        steering.baseline_share = mention_share(base_txt, key)
        steering.clamped_share = mention_share(clamped_txt, key)
        if concept_ids:
            steering.baseline_concept_tokens = concept_token_rate(base_ids, concept_ids)
            steering.clamped_concept_tokens = concept_token_rate(clamped_ids, concept_ids)
    return steering


def continuations(tokenizer: Any, batch: dict[str, torch.Tensor], new: torch.Tensor) -> list[str]:
    """The text of each row of `new` (len(prompts) * samples, new_tokens) as it reads after its
    prompt: prompt + continuation decoded, less the decoded prompt. Decoding the new tokens
    alone drops a word-start space (SentencePiece: ' loved' -> 'loved')."""
    real = batch["attention_mask"].bool()  # (prompts, seq): left padding excluded
    prompt_ids = [row[keep].tolist() for row, keep in zip(batch["input_ids"], real, strict=True)]
    samples = new.shape[0] // len(prompt_ids)
    out = []
    for row, ids in enumerate(new.tolist()):
        prompt = prompt_ids[row // samples]
        head = tokenizer.decode(prompt, skip_special_tokens=True)
        whole = tokenizer.decode(prompt + ids, skip_special_tokens=True)
        out.append(
            whole[len(head) :]
            if whole.startswith(head)
            else tokenizer.decode(ids, skip_special_tokens=True)
        )
    return out


def mentions(text: str, concept: str) -> bool:
    """Whether `text` mentions `concept` as a whole word, case-insensitive ('he' is not in
    'there'; a concept that starts or ends with a non-word character matches there too)."""
    pattern = rf"(?<!\w){re.escape(concept.strip())}(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def mention_share(texts: list[str], concept: str) -> float:
    """Share of texts that mention `concept` (a whole word, case-insensitive)."""
    return sum(mentions(t, concept) for t in texts) / max(len(texts), 1)


def concept_token_rate(ids: torch.Tensor, concept_ids: Sequence[int]) -> float:
    """Concept tokens per continuation, mean over rows of ids (rows, new_tokens)."""
    hits = torch.isin(ids, torch.tensor(list(concept_ids), device=ids.device))
    return float(hits.sum(-1).double().mean())
