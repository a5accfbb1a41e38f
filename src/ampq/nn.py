"""QuantLinear: a linear layer whose weight is stored packed in one of ampq's formats."""

from __future__ import annotations

import torch
from torch import nn

from ampq.formats import Format, get_format
from ampq.kernels import KernelCache, linear


class QuantLinear(nn.Module):
    """Holds the stored tensors of one format (packed codes, scales, ...) as buffers named by
    their role, so a state dict key reads ``model.layers.0.mlp.up_proj.codes``."""

    is_quantized_linear = True  # what reports and savers count as one layer (see quantized_linears)

    def __init__(self, in_features: int, out_features: int, format_name: str,
                 stored: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 algorithm: str = "rtn", activation: str | None = None,
                 input_scale: torch.Tensor | None = None, compute_dtype: str | None = None,
                 input_perm: torch.Tensor | None = None):
        super().__init__()
        self.kernel_cache = KernelCache()
        self.in_features, self.out_features = in_features, out_features
        self.format_name, self.algorithm = format_name, algorithm
        # how inputs are treated before the matmul (None: as they come; see ampq.kernels.activation)
        self.activation = activation
        # the dtype the matmul runs in (bitsandbytes' compute_dtype); None: the input's dtype
        self.compute_dtype = compute_dtype
        self.stored_names = tuple(stored)
        for key, tensor in stored.items():
            self.register_buffer(key, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        # AWQ's per-input-channel scale where it could not be folded into the layer before:
        # y = W' (x / input_scale), W' = W * input_scale
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale)
        else:
            self.input_scale = None
        # GPTQ act-order checkpoints (desc_act, g_idx): groups are of the inputs in this order, so the
        # codes are stored with columns permuted, W' = W[:, input_perm], and y = W' x[input_perm]
        if input_perm is not None:
            if activation is not None:
                raise ValueError("an input permutation with quantized activations is not supported")
            if input_perm.device.type != "meta" and sorted(input_perm.tolist()) != list(range(in_features)):
                raise ValueError(f"input_perm is not a permutation of {in_features} inputs")
            self.register_buffer("input_perm", input_perm.to(torch.int32))
        else:
            self.input_perm = None

    @property
    def format(self) -> Format:
        return get_format(self.format_name)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stored(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self.stored_names}

    def nbytes(self) -> int:
        """Bytes of the quantized weight as stored (bias excluded: it stays in 16/32 bits)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight W, (out, in), in the inputs' own order."""
        w = self.format.dequantize(self.stored(), self.shape).to(dtype)
        if self.input_perm is not None:
            unpermuted = torch.empty_like(w)
            unpermuted[:, self.input_perm.long()] = w
            w = unpermuted
        return w

    @classmethod
    def from_linear(cls, linear: nn.Linear, format_name: str, codes: torch.Tensor, params,
                    algorithm: str = "rtn", activation: str | None = None,
                    compute_dtype: str | None = None) -> "QuantLinear":
        fmt = get_format(format_name)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        input_scale = getattr(linear, "input_scale", None)
        return cls(linear.in_features, linear.out_features, format_name,
                   fmt.pack(codes, params), bias, algorithm, activation, input_scale, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)

    def _apply(self, fn, recurse=True):
        # every .to(), .cuda(), .half() ...: what the kernels derived from the stored tensors was
        # made where and as they were, and would be stale or on the wrong device
        self.kernel_cache = KernelCache()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        act += f", compute_dtype={self.compute_dtype}" if self.compute_dtype else ""
        act += ", input_perm=True" if self.input_perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_name}, algorithm={self.algorithm}, bias={self.bias is not None}{act}")


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized linear by name, QuantLinear or :class:`ampq.nested.NestedLinear`, without
    the QuantLinears a NestedLinear or a :class:`ampq.quant_experts.QuantExperts` holds inside."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if getattr(child, "is_quantized_linear", False):
                found[name] = child
            elif not getattr(child, "is_quantized_experts", False):
                walk(child, name)

    if getattr(model, "is_quantized_linear", False):
        return {"": model}
    walk(model, "")
    return found
