"""Loading a model to run it: transformers model + tokenizer, device and dtype chosen."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..decode.policy import fallback_dtype, resolve_device, resolve_dtype
from ..errors import CheckpointError, FlashlensError
from ..weights import ModelSource

# The dtypes transformers runs a model in (flashlens map's int8 is its own kernel, not these).
RUN_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready to run: the transformers module, its tokenizer and where it came from."""

    name: str  # what the user passed: hub id or path
    folder: Path
    config: dict[str, Any]  # config.json as stored
    config_hash: str
    d_vocab: int  # the language model's vocabulary (its LM-head's rows)
    model: Any  # a transformers *ForCausalLM (or *ForConditionalGeneration), eval mode
    tokenizer: Any  # a transformers tokenizer, left padding, with a pad token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_model(model: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a local folder or a hub id with transformers.

    device auto: CUDA when available, else CPU. dtype auto: the stored dtype where the hardware
    is fast at it (bf16/fp16 on CUDA, bf16 on CPUs with AVX512-BF16/AMX), else fp32.
    """
    from transformers.utils import logging as hf_logging

    check_dtype(dtype)
    source = ModelSource.open(model)  # resolves, checks the family and the checkpoint
    try:
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, source.run_dtype, dev)
        quantized = source.quantization is not None
    finally:
        source.close()
    if torch_dtype == torch.int8:  # auto on a CPU with fast int8: map's kernel, not a run dtype
        torch_dtype = fallback_dtype(torch_dtype, dev)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # flashlens draws its own; one line on errors
    try:
        with warnings.catch_warnings():  # (transformers warns that it merges our dequantize
            # setting into the checkpoint's own quantization_config, as intended)
            warnings.filterwarnings("ignore", "You passed `quantization_config`")
            module: Any = _auto_class(source.folder).from_pretrained(
                source.folder,
                dtype=torch_dtype,
                device_map=str(dev) if dev.type != "cpu" else None,
                **_dequantized(source.config) if quantized else {},
            )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"transformers cannot load {model} ({err})") from None
    finally:
        if bars:  # as the caller had them (a Python session keeps its own setting)
            hf_logging.enable_progress_bar()
    if dev.type == "cpu":
        module = module.to(dev)
    module.eval()
    return LoadedModel(
        str(model),
        source.folder,
        source.config,
        source.config_hash,
        source.d_vocab,
        module,
        load_tokenizer(source.folder, source.d_vocab),
    )


def _dequantized(config: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's arguments that load a quantised checkpoint (FP8, compressed-tensors,
    MXFP4) dequantized into the model's dtype, on any device (transformers otherwise keeps
    quantised layers on GPUs that run them): the model that runs is then the one `map`
    decoded, with plain modules for the clamps' hooks."""
    qc = config["quantization_config"]
    method = qc.get("quant_method")
    skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers")
    try:
        from transformers.utils import quantization_config as configs

        if method == "compressed-tensors":  # (its `ignore` list stays the checkpoint's)
            import compressed_tensors  # noqa: F401  (transformers needs it to dequantize)

            quant: Any = configs.CompressedTensorsConfig(dequantize=True)
        else:
            kind = configs.Mxfp4Config if method == "mxfp4" else configs.FineGrainedFP8Config
            quant = kind(dequantize=True, modules_to_not_convert=skip)
    except (ImportError, TypeError, AttributeError):  # (older versions: no such class, or no
        # dequantize; compressed-tensors not installed)
        ct = method == "compressed-tensors"
        package = "transformers compressed-tensors" if ct else "transformers"
        raise FlashlensError(
            f"running a {method} checkpoint needs a transformers that dequantizes it on load: "
            f"pip install -U {package}"
        ) from None
    return {"quantization_config": quant}


def _auto_class(folder: Path) -> Any:
    """The transformers auto class that builds the folder's model: AutoModelForCausalLM, or
    for a model transformers files as image-text-to-text (Gemma 3 4B-27B, Mistral 3, Mistral
    4, Qwen2.5-VL), AutoModelForImageTextToText, which runs text alone too."""
    import transformers

    kind = type(transformers.AutoConfig.from_pretrained(folder))
    text_only = kind in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    if not text_only and kind in transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def check_dtype(dtype: str) -> None:
    """Refuse a --dtype transformers cannot run a model in (checked before loading it)."""
    if dtype not in RUN_DTYPES:
        raise FlashlensError(
            f"--dtype {dtype!r} cannot run a model: choose {', '.join(RUN_DTYPES[:-1])} "
            f"or {RUN_DTYPES[-1]}"
        )


def load_tokenizer(folder: Path, d_vocab: int | None = None) -> Any:
    """The folder's tokenizer, padding on the left (so the last position is real in a batch),
    with a pad token inside the model's vocabulary of `d_vocab` ids where given (a tokenizer
    class that adds its own pad token past the embedding's rows pads with eos instead)."""
    from transformers import AutoTokenizer

    if not any(folder.glob("tokenizer*")):
        raise CheckpointError(
            f"no tokenizer in {folder}; copy the model's tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer in {folder} ({err})") from None
    tokenizer.padding_side = "left"
    if d_vocab is not None and (tokenizer.pad_token_id or 0) >= d_vocab:
        tokenizer.pad_token = None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise FlashlensError(
            f"the tokenizer in {folder} has no pad, eos or unk token to pad batches with"
        )
    return tokenizer
