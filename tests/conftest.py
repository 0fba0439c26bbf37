import os

import pytest
import torch

# without a GPU, the Triton kernels run in Triton's interpreter; the variable must be
# set before the kernels are imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use small tensors: one thread is as fast, and far faster while other work shares the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
