"""A model folder's config.json as transformers reads it, and the empty model it describes: what
every loader (ampq checkpoints, other tools' checkpoints, lazily loaded models) builds first."""

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


def empty_model(directory, config, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes, with every weight on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise AmpqError(f"{directory}/config.json does not describe a model transformers can build "
                        f"({first_line(e)})") from None
