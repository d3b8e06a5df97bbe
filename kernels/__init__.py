"""Triton kernels for TopK SAEs, each beside the plain-torch reference it is tested against.

Shapes: S seeds in an ensemble (S = 1 is one SAE), B rows, d input dimension, m latents, k kept latents.
The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set
before this package is imported). The choice between a kernel and its reference is made once, by the
caller, with `use_triton`; every operation below then takes that choice as its `triton` argument.
This package imports without Triton installed: `use_triton` is then always False.
"""

import os

import torch

from ._triton import AVAILABLE as TRITON_AVAILABLE
from .decoder_norm import (
    normalize_rows_reference_,
    normalize_rows_triton_,
    remove_parallel_grad_reference_,
    remove_parallel_grad_triton_,
)
from .sparse_decoder import SparseDecodeFunction, sparse_decode_reference
from .topk_encoder import MAX_K, TopKEncodeFunction, topk_encode_reference

__all__ = [
    "MAX_K",
    "TRITON_AVAILABLE",
    "use_triton",
    "topk_encode",
    "sparse_decode",
    "remove_parallel_grad_",
    "normalize_rows_",
    "topk_encode_reference",
    "sparse_decode_reference",
    "remove_parallel_grad_reference_",
    "normalize_rows_reference_",
]


def use_triton(device: torch.device | str, enabled: bool = True) -> bool:
    """True when the kernels can and should run on `device`: enabled (not `--no-kernels`), Triton
    installed, and the device is a GPU or the Triton interpreter is on."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return enabled and TRITON_AVAILABLE and (torch.device(device).type == "cuda" or interpreted)


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int, *, triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK encoder: the k largest of (x - b_dec) @ W_enc + b_enc per row, then ReLU.

    x [B, d] (shared by all seeds) or [S, B, d]; W_enc [S, d, m]; b_enc [S, m]; b_dec [S, d].
    Returns values [S, B, k] (dtype of W_enc) and indices [S, B, k] int64, ordered by pre-activation
    descending, ties to the smaller latent index. Differentiable w.r.t. W_enc, b_enc and b_dec (not x).
    """
    if triton:
        return TopKEncodeFunction.apply(x, W_enc, b_enc, b_dec, k)
    return topk_encode_reference(x, W_enc, b_enc, b_dec, k)


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *, triton: bool
) -> torch.Tensor:
    """x_hat [S, B, d] = b_dec + sum_j values[..., j] * W_dec[indices[..., j]].

    values, indices [S, B, k]; W_dec [S, m, d]; b_dec [S, d]. Differentiable w.r.t. values, W_dec, b_dec.
    """
    if triton:
        return SparseDecodeFunction.apply(values, indices, W_dec, b_dec)
    return sparse_decode_reference(values, indices, W_dec, b_dec)


def remove_parallel_grad_(W_dec: torch.Tensor, grad: torch.Tensor, *, triton: bool) -> None:
    """In place on grad [S, m, d]: grad_i -= (grad_i . w_i) w_i, w_i = row i of W_dec at unit length."""
    if triton:
        remove_parallel_grad_triton_(W_dec, grad)
    else:
        remove_parallel_grad_reference_(W_dec, grad)


def normalize_rows_(W_dec: torch.Tensor, *, triton: bool) -> None:
    """In place: divide each row of W_dec [S, m, d] by its L2 norm."""
    if triton:
        normalize_rows_triton_(W_dec)
    else:
        normalize_rows_reference_(W_dec)
