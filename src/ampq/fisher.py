"""Fisher weights: how much the model's output distribution moves per unit of squared error at each
output channel of each linear.

With labels sampled from the model's own next-token distribution (not the text's), the mean of
g g^T over samples is the Fisher information, which is the Hessian of KL(original || perturbed) at
the original. Keeping its diagonal and treating gradients and inputs as independent gives, for a
weight error dW of one linear with input Hessian H = 2 X^T X / n,

    KL ~ 1/2 E_t[e_t^T F e_t] ~ 1/4 sum_i f_i (dW H dW^T)_ii,   f_i = E_t[g_ti^2],

an estimate in nats per token, the same unit in every layer (the plain Hessian estimate is in each
layer's own output units, which differ from layer to layer).

The passes go block by block, so the model never has to be on the device whole: a forward pass
keeps each block's inputs, the output head's gradient comes from the model with its blocks stood
in for, and a backward pass runs each block again, last to first, with gradients (the same
arithmetic as one backward pass through the whole model). Window ``w``'s labels are drawn with seed
``seed + w``, so the windows can be spread over ranks (:mod:`ampq.ranks`) and summed in order.

An expert's projection gets its own f per expert, (experts, out): its squared gradients summed over
the tokens routed to it and divided by all tokens, which pairs with its Hessian over those tokens
alone to give its share of the KL per token of the whole text.

An encoder has no next-token distribution; its output is the last hidden state h. The loss r . h
with r drawn from N(0, I) has E[g g^T] = J^T J (J: the Jacobian of h at a linear's output), the
Gauss-Newton Hessian of |dh|^2 / 2, so the same formula estimates half the squared change of the
final hidden state per token: again one unit in every layer, which is what the allocation needs.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.calibrate import Calibration
from ampq.errors import AmpqError
from ampq.experts import is_experts
from ampq.models import replace_module
from ampq.placement import Placement
from ampq.quant_experts import QuantExperts


def output_fisher(model: nn.Module, tokens: torch.Tensor, names: list[str], *, batch_size: int = 1,
                  seed: int = 0, progress: bool = True, placement: Placement | None = None) -> dict[str, torch.Tensor]:
    """f_i = mean over tokens of the squared gradient of the sampled-label loss at output channel i
    of each linear in ``names`` (all in decoder blocks; or expert projection: one row per expert),
    from one forward and backward pass per batch of ``tokens``."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise AmpqError("the Fisher estimate needs at least one window of tokens")
    with torch.no_grad():
        cal = Calibration(model, tokens, batch_size, placement=placement)
    experts, originals = _observed_experts(model, names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients at the outputs only; no parameter gradients
    try:
        kwargs = [_detached(kw) for kw in cal.kwargs]
        saved, tuple_out = _forward(cal, kwargs, progress)
        grads = _head_gradients(model, cal, tokens, batch_size, seed, tuple_out)
        sums = _backward(model, cal, saved, kwargs, grads, names, experts, progress)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for owner, original in originals.items():
            replace_module(model, owner, original)
    return {n: (s / tokens.numel()).float() for n, s in sums.items()}


def _detached(obj):
    """The calibration's keyword arguments (position embeddings, masks) as ordinary tensors that
    autograd may keep (they were made in inference mode)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _forward(cal: Calibration, kwargs, progress: bool):
    """Each block's inputs (this rank's batches), block by block; the last block's outputs stay in
    ``cal.inputs``. Also whether blocks return tuples."""
    saved, tuple_out = [], False
    for prefix, block in tqdm(cal.on_device(), total=len(cal.blocks), desc="fisher (forward)", unit="block",
                              disable=not progress):
        store = cal.placement.activation_store()
        for j in range(len(cal.inputs)):
            x = cal.inputs[j]
            store.append(x)
            with cal.fast():
                out = block(x, **kwargs[j])
            tuple_out = isinstance(out, tuple)
            cal.inputs[j] = (out[0] if tuple_out else out).to(x.dtype)
        saved.append(store)
    return saved, tuple_out


class _StandIn(nn.Module):
    """In a decoder block's place: passes its input through, the last one returns ``given``."""

    def __init__(self, given: torch.Tensor | None, tuple_out: bool):
        super().__init__()
        self.given, self.tuple_out = given, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.given is None else self.given
        return (out,) if self.tuple_out else out


def _head_gradients(model, cal: Calibration, tokens, batch_size: int, seed: int, tuple_out: bool) -> list:
    """For each of this rank's batches, the gradient of the sampled-label loss at the last block's
    output: the model runs with stand-ins for its blocks, its other parts on the device."""
    placement = cal.placement
    grads = []
    blocks = cal.blocks
    try:
        for j, b in enumerate(cal.batches):
            given = cal.inputs[j].detach().clone().requires_grad_(True)
            for k, (prefix, _) in enumerate(blocks):
                replace_module(model, prefix, _StandIn(given if k == len(blocks) - 1 else None, tuple_out))
            ids = tokens[b * batch_size:(b + 1) * batch_size]
            # in the model's own dtype whatever the blocks ran in: the labels are sampled from these logits
            with placement.onload(model), torch.enable_grad():
                out = model(ids.to(placement.device), use_cache=False)
                generator = torch.Generator(device=placement.device).manual_seed(seed + b)
                _sampled_loss(out, generator).backward()
            grads.append(given.grad)
            del out
    finally:
        for prefix, block in blocks:
            replace_module(model, prefix, block)
    return grads


def _backward(model, cal: Calibration, saved, kwargs, grads, names: list[str], experts: dict,
              progress: bool) -> dict[str, torch.Tensor]:
    """Each block again, last to first, with gradients: the squared output gradients of its
    linears (and of each expert's projections), summed over batches in batch order (over all ranks)."""
    ranks = cal.ranks
    sums: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(cal.blocks) - 1, -1, -1), desc="fisher (backward)", unit="block", disable=not progress):
        prefix, block = cal.blocks[i]
        mine = {n.removeprefix(f"{prefix}."): n for n in names if n.startswith(f"{prefix}.") and n not in experts}
        owners = {o for n, (o, _) in experts.items() if n.startswith(f"{prefix}.")}
        with cal.placement.onload(block):
            totals = {n: torch.zeros(block.get_submodule(sub).out_features, dtype=torch.float64, device=cal.device)
                      for sub, n in mine.items()}
            for n, (owner, projection) in experts.items():
                if owner in owners:
                    module = model.get_submodule(owner)
                    totals[n] = torch.zeros(module.num_experts, module.shapes[projection][0], dtype=torch.float64,
                                            device=cal.device)
            partial: dict[str, torch.Tensor] = {}

            def observe(owner):
                def on_output(projection, e, y):
                    name = f"{owner}.{projection}"

                    def on_grad(g):
                        if name not in partial:
                            partial[name] = torch.zeros_like(totals[name])
                        partial[name][e] += g.double().pow(2).sum(0)

                    if y.requires_grad and name in totals:
                        y.register_hook(on_grad)
                return on_output

            for owner in owners:
                model.get_submodule(owner).output_observer = observe(owner)

            def hook(name):
                def on_grad(g):
                    partial[name] = partial.get(name, 0) + g.reshape(-1, g.shape[-1]).double().pow(2).sum(0)

                def on_output(module, args, out):
                    if out.requires_grad:
                        out.register_hook(on_grad)
                return on_output

            handles = [block.get_submodule(sub).register_forward_hook(hook(n)) for sub, n in mine.items()]
            try:
                for k in range(ranks.rounds(cal.count)):
                    partial.clear()
                    if k < len(grads):
                        x = saved[i][k].detach().clone().requires_grad_(True)
                        with torch.enable_grad(), cal.fast():
                            out = block(x, **kwargs[k])
                            out = out[0] if isinstance(out, tuple) else out
                            out.backward(grads[k].to(out.dtype))
                        grads[k] = x.grad
                    for n, t in totals.items():
                        ranks.fold([t], [partial[n]] if n in partial else None)
            finally:
                for h in handles:
                    h.remove()
                for owner in owners:
                    model.get_submodule(owner).output_observer = None
        saved[i].close()
        sums.update(totals)
    missing = [n for n in names if n not in sums]
    if missing:
        raise AmpqError(f"the Fisher estimate covers the linears of decoder blocks only, not {missing[0]}")
    return {n: sums[n] for n in names}


def _sampled_loss(out, generator: torch.Generator) -> torch.Tensor:
    """The loss whose squared gradients estimate the Fisher weights: the cross-entropy of labels
    sampled from the model's own next-token distribution, or, for an encoder (no logits), a random
    projection of its last hidden state."""
    logits = getattr(out, "logits", None)
    if logits is None:
        hidden = out.last_hidden_state.float()
        return (hidden * torch.randn(hidden.shape, generator=generator, device=hidden.device)).sum()
    logits = logits.float().reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def _observed_experts(model: nn.Module, names: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, nn.Module]]:
    """The expert projections among ``names`` -> (experts module, projection), and the experts
    modules wrapped for the pass in a float :class:`QuantExperts` (it computes the same and shows
    each expert's outputs), to be put back when it ends."""
    found, originals = {}, {}
    for name in names:
        owner, _, projection = name.rpartition(".")
        module = model.get_submodule(owner)
        if not is_experts(module):
            continue
        if not isinstance(module, QuantExperts):
            originals[owner] = module
            replace_module(model, owner, QuantExperts(module))
        found[name] = (owner, projection)
    return found, originals


def fisher_damage(rowwise: torch.Tensor, fisher: torch.Tensor) -> float:
    """The KL estimate from (dW H dW^T)_ii per output row and the layer's Fisher weights."""
    return 0.25 * float((rowwise.double() * fisher.to(rowwise.device).double()).sum())
