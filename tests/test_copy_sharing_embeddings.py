"""The copy `ampq quantize --eval` keeps of the original, and quantizes to compare schemes: the
embedding table is held once, and quantizing one copy changes nothing in another."""

import pytest
import torch

import ampq
from ampq.models import copy_sharing_embeddings, tied_embeddings
from test_model_io import IDS, logits, tiny_llama


@pytest.mark.parametrize("tie", [True, False])
def test_the_copy_holds_the_same_embedding_and_copies_of_the_rest(tie):
    model = tiny_llama(tie=tie)
    clone = copy_sharing_embeddings(model)
    assert clone.get_input_embeddings().weight is model.get_input_embeddings().weight
    assert tied_embeddings(clone) == tie
    if not tie:
        assert clone.get_output_embeddings().weight is not model.get_output_embeddings().weight
    others = [(a, b) for (n, a), (_, b) in zip(model.named_parameters(), clone.named_parameters())
              if "embed_tokens" not in n]
    assert others and all(a is not b and torch.equal(a, b) for a, b in others)


def test_quantizing_copies_leaves_the_original_as_it_was():
    original = tiny_llama(tie=True)
    before = logits(original)
    for algorithm, awq in (("rtn", False), ("gptq", False), ("rtn", True)):  # AWQ rescales norms in place
        quantized = ampq.quantize(copy_sharing_embeddings(original), "int4-g32", algorithm=algorithm, awq=awq,
                                  calibration=None if algorithm == "rtn" and not awq else IDS, progress=False)
        assert not torch.equal(logits(quantized), before)
    assert torch.equal(logits(original), before)
