import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in default model (fetched once into the ampq cache) and its tokenizer."""
    import ampq

    return ampq.load_model("smollm2-135m")
