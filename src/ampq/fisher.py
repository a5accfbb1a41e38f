"""Fisher weights: how much the model's output distribution moves per unit of squared error at each
output channel of each linear.

With labels sampled from the model's own next-token distribution (not the text's), the mean of
g g^T over samples is the Fisher information, which is the Hessian of KL(original || perturbed) at
the original. Keeping its diagonal and treating gradients and inputs as independent gives, for a
weight error dW of one linear with input Hessian H = 2 X^T X / n,

    KL ~ 1/2 E_t[e_t^T F e_t] ~ 1/4 sum_i f_i (dW H dW^T)_ii,   f_i = E_t[g_ti^2],

an estimate in nats per token, the same unit in every layer (the plain Hessian estimate is in each
layer's own output units, which differ from layer to layer).

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

from ampq.errors import AmpqError
from ampq.experts import is_experts
from ampq.models import replace_module
from ampq.quant_experts import QuantExperts


def output_fisher(model: nn.Module, tokens: torch.Tensor, names: list[str], *, batch_size: int = 1,
                  seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """f_i = mean over tokens of the squared gradient of the sampled-label loss at output channel i
    of each linear in ``names`` (or expert projection: one row per expert), from one forward and
    backward pass per batch of ``tokens``."""
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise AmpqError("the Fisher estimate needs at least one window of tokens")
    device = next(model.parameters()).device
    experts, originals = _observed_experts(model, names)
    linears = [n for n in names if n not in experts]
    sums = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64, device=device) for n in linears}
    for name, (owner, projection) in experts.items():
        module = model.get_submodule(owner)
        sums[name] = torch.zeros(module.num_experts, module.shapes[projection][0], dtype=torch.float64, device=device)
    count = 0

    def observe(owner):
        def on_output(projection, e, y):
            def on_grad(g, s=sums[f"{owner}.{projection}"][e]):
                s.add_(g.double().pow(2).sum(0))

            if y.requires_grad:
                y.register_hook(on_grad)
        return on_output

    for owner in {o for o, _ in experts.values()}:
        model.get_submodule(owner).output_observer = observe(owner)

    def hook(name):
        def on_grad(g):
            sums[name].add_(g.reshape(-1, g.shape[-1]).double().pow(2).sum(0))

        def on_output(module, args, out):
            out.register_hook(on_grad)
        return on_output

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in linears]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients at the outputs only; no parameter gradients
    generator = torch.Generator(device=device).manual_seed(seed)
    embed = model.get_input_embeddings()
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="fisher", unit="batch", disable=not progress):
            ids = tokens[start:start + batch_size].to(device)
            with torch.no_grad():
                x = embed(ids)
            x.requires_grad_(True)
            with torch.enable_grad():
                out = model(inputs_embeds=x, use_cache=False)
                loss = _sampled_loss(out, generator)
                loss.backward()
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        for owner, _ in experts.values():
            model.get_submodule(owner).output_observer = None
        for owner, original in originals.items():
            replace_module(model, owner, original)
    return {n: (s / count).float() for n, s in sums.items()}


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
    return 0.25 * float((rowwise.double() * fisher.double()).sum())
