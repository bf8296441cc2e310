"""Prompts in, token batches out: the built-in neutral set, files, chat templates, padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FlashlensError

# Neutral openings whose next token could be almost anything: a concept's baseline probability
# is low on them, so a clamp that raises it shows.
DEFAULT_PROMPTS = [
    "My favourite animal is",
    "Once upon a time, there was a",
    "She opened the box and found a",
    "The best thing about the weekend is",
    "Yesterday I saw a",
    "Here is a short story about",
    "The word I am thinking of is",
    "He looked out of the window and saw",
]


def read_prompts(path: Path | None) -> list[str]:
    """One prompt per non-empty line of `path`; the built-in set when None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise FlashlensError(f"cannot read prompts from {path} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise FlashlensError(
            f"cannot read prompts from {path}: it must be UTF-8 text (byte {err.start} is "
            f"0x{err.object[err.start]:02x}); save it as UTF-8, one prompt per line"
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise FlashlensError(f"{path} has no prompts: write one prompt per line")
    return prompts


def apply_chat(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlashlensError(
            "--chat: this model's tokenizer has no chat template "
            "(neither tokenizer_config.json nor a chat_template.jinja or .json file holds "
            "one); drop --chat or use "
            "an instruction-tuned model"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def encode(
    tokenizer: Any, prompts: list[str], device: torch.device, chat: bool = False
) -> dict[str, torch.Tensor]:
    """A left-padded batch: input_ids, attention_mask (batch, seq) and the matching
    position_ids (real tokens count from 0 whatever the padding)."""
    if chat:
        texts = apply_chat(tokenizer, prompts)
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    if bool((mask.sum(-1) == 0).any()):
        raise FlashlensError("an empty prompt: every prompt needs at least one token")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


@torch.no_grad()
def next_token_probs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """softmax of the logits at each prompt's next position, (batch, d_vocab), fp32."""
    logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]  # (batch, d_vocab)
    return torch.softmax(logits.float(), dim=-1)


def length_note(model: Any, batch: dict[str, torch.Tensor], new_tokens: int = 0) -> str | None:
    """A warning when the longest prompt (plus `new_tokens` generated) runs past the model's
    max_position_embeddings, where its outputs are no longer reliable; else None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = int(batch["attention_mask"].sum(-1).max())
    if not isinstance(limit, int) or longest + new_tokens <= limit:
        return None
    extra = f" + {new_tokens} new" if new_tokens else ""
    return (
        f"the longest prompt has {longest} tokens{extra}, past the model's "
        f"max_position_embeddings ({limit}): results there are unreliable; shorten it"
    )
