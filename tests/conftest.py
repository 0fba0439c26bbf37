import os
import sys

import torch

# the reference lives in the repo, not in the installed package
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# without a GPU, the Triton kernels run in Triton's interpreter; the variable must be
# set before the kernels are imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
