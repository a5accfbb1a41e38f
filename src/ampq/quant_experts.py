"""QuantExperts: a mixture-of-experts module whose 3D expert weights are stored in ampq's formats,
one :class:`~ampq.nn.QuantLinear` per expert and projection, so every format, algorithm and kernel
of a linear serves an expert as it is. It takes the place of transformers' experts module with the
same call (hidden states, top-k indices, top-k weights) and the same result, so the block's router
code is untouched; only the experts each token was routed to run.

A projection is either quantized (a ModuleList of QuantLinear, state dict keys
``mlp.experts.gate_up_proj.3.codes``) or kept as the 3D parameter it was; biases (gpt-oss) stay
3D parameters under their own names, in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ampq.experts import expert_shape, projections, routes_tokens, transposed
from ampq.nn import QuantLinear

# attributes of the experts module its gating reads (gpt-oss's alpha and limit, act_fn, ...) are
# copied; these are torch's own or would point back at the replaced module
_NOT_COPIED = {"training", "forward"}


class QuantExperts(nn.Module):
    is_quantized_experts = True  # what reports and savers count (see quantized_experts)

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.names = projections(experts)
        self.shapes = {p: expert_shape(experts, p) for p in self.names}
        self.num_experts = experts._parameters[self.names[0]].shape[0]
        self.transposed, self.routed = transposed(experts), routes_tokens(experts)
        self.source_class = type(experts).__name__
        for key, value in vars(experts).items():
            if not key.startswith("_") and key not in _NOT_COPIED and not hasattr(self, key):
                setattr(self, key, value)
        # gpt-oss gates with its own clamped SwiGLU over interleaved halves; the others split in two
        self._gate: Callable | None = getattr(type(experts), "_apply_gate", None)
        for key, p in experts._parameters.items():
            if p is not None:
                self.register_parameter(key, p)
        for key, b in experts._buffers.items():
            if b is not None:
                self.register_buffer(key, b, persistent=key not in experts._non_persistent_buffers_set)
        for key, m in experts.named_children():
            self.add_module(key, m)
        # observer(projection, expert, inputs): calibration's view of what each expert is given;
        # output_observer(projection, expert, outputs): the Fisher estimate's view of what it gives
        self.observer: Callable[[str, int, torch.Tensor], None] | None = None
        self.output_observer: Callable[[str, int, torch.Tensor], None] | None = None

    # ---- the stored weights ----------------------------------------------------------------
    def quantized(self, name: str) -> nn.ModuleList | None:
        layers = self._modules.get(name)
        return layers if isinstance(layers, nn.ModuleList) else None

    def set_quantized(self, name: str, layers: list[QuantLinear]) -> None:
        if len(layers) != self.num_experts or any(tuple(m.shape) != self.shapes[name] for m in layers):
            raise ValueError(f"{name} needs {self.num_experts} experts of {self.shapes[name]}")
        self._parameters.pop(name, None)
        self.add_module(name, nn.ModuleList(layers))

    def set_float(self, name: str, weight: torch.Tensor) -> None:
        """Keep projection ``name`` as the 3D parameter ``weight`` ([experts, out, in])."""
        self._modules.pop(name, None)
        w = weight.transpose(1, 2) if self.transposed else weight
        self.register_parameter(name, nn.Parameter(w.contiguous(), requires_grad=False))

    def expert_weight(self, name: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``e``'s projection ``name`` as an (out, in) matrix."""
        layers = self.quantized(name)
        if layers is not None:
            return layers[e].dequantize(dtype)
        w = self._parameters[name][e]
        return (w.t() if self.transposed else w).to(dtype)

    def nbytes(self, name: str) -> int:
        return sum(m.nbytes() for m in self.quantized(name))

    # ---- running ----------------------------------------------------------------------------
    def _project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(name, e, x)
        layers = self.quantized(name)
        if layers is not None:
            y = layers[e](x)
        else:
            w = self._parameters[name][e]
            y = x @ w if self.transposed else nn.functional.linear(x, w)
        bias = self._parameters.get(f"{name}_bias")
        y = y + bias[e] if bias is not None else y
        if self.output_observer is not None:
            self.output_observer(name, e, y)
        return y

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_proj" in self.names:
            h = self._project("gate_up_proj", e, x)
            if self._gate is not None:
                h = self._gate(self, h)
            else:
                gate, up = h.chunk(2, dim=-1)
                h = up * self.act_fn(gate)
        else:
            h = self.act_fn(self._project("up_proj", e, x))
        return self._project("down_proj", e, h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if not self.routed:
            return self._dense(hidden_states)
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # the routed slots grouped by expert (token order kept within each), so that each expert runs
        # once on all its tokens, gathered in one step and added back in one; an index past the last
        # expert (expert parallelism's sentinel) sorts last and is left out
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)[: self.num_experts].tolist()
        routed = sum(counts)
        order = order[:routed]
        tokens = order // k
        x = hidden_states[tokens]
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outputs.append(self._expert(e, x[start:start + n]))
            start += n
        if outputs:
            y = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama-4: each expert is given every token, scaled by its routing score (zero where the
        token was not routed to it); those rows give zero and are not computed."""
        x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        out = x.new_zeros(x.shape[0], x.shape[1], self.shapes["down_proj"][0])
        bias = self._has_bias()  # with a bias a zero row does not give zero
        for e in range(self.num_experts):
            rows = (x[e].abs().amax(-1) != 0) | bias
            if bool(rows.any()):
                out[e, rows] = self._expert(e, x[e, rows]).to(out.dtype)
        return out.view(-1, out.shape[-1])

    def _has_bias(self) -> bool:
        return any(f"{p}_bias" in self._parameters for p in self.names)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{p}={self.quantized(p)[0].format_name if self.quantized(p) else 'float'}"
                          for p in self.names)
        return f"{self.source_class}, experts={self.num_experts}, {kinds}"


def quantized_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """Every QuantExperts module of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "is_quantized_experts", False)}


def quantized_projections(model: nn.Module) -> dict[str, tuple[QuantExperts, str]]:
    """Every quantized expert projection by its name (``model.layers.0.mlp.experts.down_proj``):
    the experts module that holds it and the projection's own name."""
    return {f"{name}.{p}" if name else p: (m, p) for name, m in quantized_experts(model).items()
            for p in m.names if m.quantized(p) is not None}
