import os

import torch

# Without a GPU the kernels run under the Triton interpreter, which is read when @triton.jit wraps a
# function: it must be set before any test imports `kernels`.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
