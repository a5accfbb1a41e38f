import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Calibration passes in float32 whatever the processor, for the whole session (module fixtures
# quantize too): most tests compare the pipeline's arithmetic with a float32 reference bit for bit.
# tests/test_calibration_dtype.py covers the bf16 passes a processor with bf16 matrix instructions
# gets by default.
os.environ["AMPQ_CALIB_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in default model (fetched once into the ampq cache) and its tokenizer."""
    import ampq

    return ampq.load_model("smollm2-135m")
