"""A model folder's config.json as transformers reads it, the transformers class it was saved
from, and the empty model they describe: what every loader (ampq checkpoints, other tools'
checkpoints, lazily loaded models) builds first."""

from __future__ import annotations

import torch
from torch import nn

from ampq.errors import AmpqError, first_line


def model_config(directory) -> object:
    """The folder's config.json as transformers reads it, without a quantization_config: ampq's
    loaders build the model and put the quantized layers in themselves."""
    # transformers is imported where it is used: ``import ampq`` (and the CLI's start) stays without it
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - whatever a config file makes transformers raise
        raise AmpqError(f"{directory}/config.json is not a usable model config ({first_line(e)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def transformers_class(name) -> type | None:
    """The transformers model class called ``name`` (a name read from a file), or None: only
    classes of transformers' own that build a model from a config are ever taken."""
    import transformers
    from transformers import PreTrainedModel

    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - a lazy import transformers cannot finish (a missing extra)
        return None
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) else None


def model_class(config, recorded: str | None = None) -> type:
    """The class to rebuild a model with: the one ``recorded`` when it was saved, else the first of
    config.json's ``architectures`` that transformers has (an encoder stays an encoder, a
    vision-language model keeps its vision tower), else a causal language model (config.json
    without ``architectures``, as GGUF conversions and hand-written configs may be)."""
    from transformers import AutoModelForCausalLM

    names = getattr(config, "architectures", None) or []
    if not isinstance(names, (list, tuple)):  # a hand-edited or damaged config.json
        raise AmpqError(f"config.json's architectures is {names!r}, not a list of class names; repair it "
                        "(e.g. [\"LlamaForCausalLM\"]) or remove the key")
    for name in [recorded, *names]:
        cls = transformers_class(name)
        if cls is not None:
            return cls
    return AutoModelForCausalLM


def empty_model(directory, config, dtype: torch.dtype, recorded: str | None = None) -> nn.Module:
    """The model ``config`` describes (built as :func:`model_class` says), with every weight on the
    meta device (no memory)."""
    from accelerate import init_empty_weights

    cls = model_class(config, recorded)
    try:
        with init_empty_weights():
            if hasattr(cls, "from_config"):  # the Auto classes
                return cls.from_config(config, dtype=dtype)
            return cls._from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise AmpqError(f"{directory}/config.json does not describe a model transformers can build as "
                        f"{cls.__name__} ({first_line(e)})") from None
