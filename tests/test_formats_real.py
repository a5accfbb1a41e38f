"""Every standard format on real weights of the built-in model: round to nearest really picks the
nearest value the format can represent (the format's own error bound), and storage loses nothing."""

import pytest
import torch

from ampq.formats import STANDARD_FORMATS, get_format
from ampq.formats.microscaled import E2M1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_weights(smollm2):
    model, _ = smollm2
    layers = model.model.layers
    return [layers[0].self_attn.q_proj.weight[:48].detach().float().clone(),
            layers[17].mlp.down_proj.weight[:32].detach().float().clone()]


@pytest.mark.parametrize("name", STANDARD_FORMATS)
def test_nearest_representable_value_on_real_weights(real_weights, name):
    fmt = get_format(name)
    for w in real_weights:
        codes, params = fmt.quantize_codes(w)
        values = fmt.expand(params.values, w.shape)
        # the grid used to choose codes (double quantization chooses against the unrounded absmax)
        grid_values = dict(values)
        if "encode_absmax" in values:
            grid_values["absmax"] = values["encode_absmax"]
        decode = fmt.decode
        if name == "nvfp4":  # codes are chosen on E2M1 * scale; the decoded weight is then rounded to bf16
            decode = lambda c, v: E2M1.decode(c) * v["scale"]  # noqa: E731
        candidates = torch.stack([decode(torch.full_like(codes, c), grid_values) for c in range(1 << fmt.bits)])
        best = (candidates - w).abs().nan_to_num(float("inf")).amin(0)
        chosen = (decode(codes, grid_values) - w).abs()
        assert bool((chosen <= best * (1 + 1e-5) + 1e-9).all()), float((chosen - best).max())
        # and what is stored decodes to the same weights
        stored = fmt.quantize(w)
        assert torch.equal(fmt.dequantize(stored, w.shape), fmt.dequantize_codes(codes, params.values))
        assert sum(t.numel() * t.element_size() for t in stored.values()) == fmt.nbytes(w.shape)
