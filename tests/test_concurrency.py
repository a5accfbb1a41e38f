"""One loaded quantized model serving several threads at once computes what it computes for each
request alone, also while another thread evaluates it with the reference kernel."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import ampq
from ampq import kernels
from test_model_io import tiny_llama


def _generate(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)


def _evaluate(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), kernels.use("reference"):
        return model(ids).logits


def _check(model, prompts: list[torch.Tensor], rounds: int = 3) -> None:
    sequential = [_generate(model, p) for p in prompts]
    reference = _evaluate(model, prompts[0])
    with ThreadPoolExecutor(max_workers=len(prompts) + 1) as pool:
        for _ in range(rounds):
            futures = [pool.submit(_generate, model, p) for p in prompts]
            evaluation = pool.submit(_evaluate, model, prompts[0])
            for f, expected in zip(futures, sequential):
                assert torch.equal(f.result(), expected)
            assert torch.equal(evaluation.result(), reference)


def test_threads_share_one_tiny_model():
    model = ampq.quantize(tiny_llama(), {"*mlp*": "int8-ch", "*": "int4-g32"}, progress=False)
    g = torch.Generator().manual_seed(0)
    _check(model, [torch.randint(0, 256, (1, n), generator=g) for n in (3, 7, 11, 5)])


def test_kernel_mode_is_per_thread():
    seen = []
    with kernels.use("reference"):
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: seen.append(kernels._state.mode)).result()
        seen.append(kernels._state.mode)
    assert seen == [kernels._DEFAULT_MODE, "reference"]


@pytest.mark.slow
def test_threads_share_one_quantized_smollm2(smollm2):
    model, tok = smollm2
    model = ampq.quantize(__import__("copy").deepcopy(model), "int4-g64", progress=False)
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    _check(model, [tok(p, return_tensors="pt")["input_ids"] for p in prompts], rounds=2)
