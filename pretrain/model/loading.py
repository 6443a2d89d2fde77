"""Tokenizer, model config and the block size, from the Hub or a local folder, with failures that name the flag.

It owns how names given on the command line become objects; it must not touch the Accelerator or the data.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.base.arguments import DEFAULT_CACHE_ROOT, DEMO_MODEL, DataArguments, ModelArguments, is_demo
from pretrain.base.errors import UsageError, cannot_load, first_line
from pretrain.base.flag_values import parse_config_overrides
from pretrain.data.demo_corpus import ensure_demo_assets


def from_hub(flag: str, name: str, loader, **kwargs):
    """A Hub or local load whose failure names the flag instead of a traceback."""
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(cannot_load(flag, name, error)) from None


def load_config(model_args: ModelArguments):
    """The config of --model_name_or_path or --config_name; None for the demo, whose config follows its tokenizer."""
    from transformers import AutoConfig

    if not (model_args.model_name_or_path or model_args.config_name):
        return None
    flag = "--model_name_or_path" if model_args.model_name_or_path else "--config_name"
    return from_hub(flag, model_args.model_name_or_path or model_args.config_name, AutoConfig.from_pretrained,
                    trust_remote_code=model_args.trust_remote_code)


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments, config=None):
    """The tokenizer, as the class that the model's type selects: the class `AutoTokenizer` gives whoever loads the
    saved model, so the tokenizer saved beside it is the one it was trained with (a Qwen2 model reloads its tokenizer
    as Qwen2Tokenizer, which adds an NFC normalizer that a tokenizer.json alone may not have)."""
    from transformers import AutoTokenizer

    if is_demo(model_args, data_args):
        corpus, tokenizer_dir = ensure_demo_assets(DEFAULT_CACHE_ROOT / "demo")
        data_args.train_files = [str(corpus)]
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    flag, name = next(((f, n) for f, n in (("--tokenizer_name", model_args.tokenizer_name),
                                           ("--model_name_or_path", model_args.model_name_or_path),
                                           ("--config_name", model_args.config_name)) if n), (None, None))
    if flag is None:
        raise UsageError("your own data needs a tokenizer: pass --tokenizer_name (a Hub name or a folder, e.g. "
                         "Qwen/Qwen2.5-1.5B), or --model_name_or_path / --config_name, whose tokenizer is used")
    return from_hub(flag, name, AutoTokenizer.from_pretrained, config=config,
                    trust_remote_code=model_args.trust_remote_code)


def build_config(model_args: ModelArguments, tokenizer, config=None):
    """The loaded config (or the demo's, sized to its tokenizer) with --config_overrides applied and checked."""
    from transformers import Qwen2Config

    if config is None:
        config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id, **DEMO_MODEL)
    if model_args.config_overrides:
        config = apply_overrides(config, parse_config_overrides(model_args.config_overrides),
                                 model_args.config_overrides)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    source = "--config_overrides" if model_args.config_overrides else "the model config"
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise UsageError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                         f"({kv_heads})")
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and heads > 0 and isinstance(hidden, int) and not getattr(config, "head_dim", None) \
            and (hidden % heads or hidden // heads % 2):
        raise UsageError(f"{source}: hidden_size ({hidden}) must be num_attention_heads ({heads}) times an even "
                         f"head size (rotary embeddings rotate pairs); e.g. hidden_size={heads * 32}")
    return config


def apply_overrides(config, overrides: dict[str, Any], text: str):
    """The config rebuilt with `overrides` by its class, as its own __init__ builds it: the per-layer lists that it
    derives from the other fields (Qwen2's layer_types from num_hidden_layers, sliding_window, max_window_layers)
    are derived afresh, and its validators run. A list set by hand in the config is kept, and refused in one line if
    it no longer fits."""
    for key in overrides:
        if not hasattr(config, key):
            raise UsageError(f"--config_overrides: {type(config).__name__} has no '{key}'")
    values = config.to_dict()
    per_layer = [name for name, value in values.items() if isinstance(value, list) and name not in overrides
                 and len(value) == values.get("num_hidden_layers")]
    derived = [name for name in per_layer if rebuilt_without(config, values, name) == values[name]]
    values = {key: value for key, value in {**values, **overrides}.items() if key not in derived}
    try:
        return type(config).from_dict(values)
    except Exception as error:  # transformers' typed configs raise their own validation errors
        cause = ' '.join(str(error.__cause__ or error).split())
        by_hand = [name for name in per_layer if name not in derived]
        advice = f"; the config sets {', '.join(by_hand)} by hand: change it in a copy of its config.json" \
            if by_hand else ""
        raise UsageError(f"--config_overrides {text}: {cause}{advice}") from None


def rebuilt_without(config, values: dict[str, Any], name: str) -> Any:
    """What the config's class computes for the field `name` when it is left out."""
    return getattr(type(config).from_dict({key: value for key, value in values.items() if key != name}), name)


def resolve_block_size(data_args: DataArguments, config) -> int:
    """--block_size, defaulting to the model's context (at most 2048), and never beyond it."""
    limit = getattr(config, "max_position_embeddings", None)
    if data_args.block_size is None:
        data_args.block_size = min(2048, limit or 2048)
    if limit is not None and data_args.block_size > limit:
        raise UsageError(f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings ({limit}); "
                         f"lower it")
    return data_args.block_size


def model_error(error: Exception, model_args: ModelArguments) -> UsageError:
    """Name the flag behind a failed model build: the attention kernel, the weights, or the config."""
    message = first_line(error)
    if model_args.attn_implementation and ("attn" in message.lower() or "attention" in message.lower()):
        return UsageError(f"--attn_implementation {model_args.attn_implementation}: {message}; use sdpa or eager, "
                          f"or install that kernel's package")
    if model_args.model_name_or_path:
        return UsageError(cannot_load("--model_name_or_path", model_args.model_name_or_path, error))
    return UsageError(f"the model cannot be built from its config ({message}); check --config_name and "
                      f"--config_overrides")


def load_weights(model_args: ModelArguments, config, tokenizer, seed: int):
    """The causal LM: --model_name_or_path's weights, or a fresh initialisation from `config` seeded by `seed`."""
    from transformers import AutoModelForCausalLM

    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"--tokenizer_name: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; use the model's tokenizer or raise vocab_size in --config_overrides")
    dtype = model_args.torch_dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    try:
        if model_args.model_name_or_path:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                        dtype=dtype or "float32", **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        return model.to(dtype) if dtype not in (None, "auto") else model
    except (OSError, ValueError, ImportError) as error:
        raise model_error(error, model_args) from None
