"""Decoder-row constraint of a TopK SAE, in place on W_dec [S, m, d] and its gradient.

Before the optimiser step the gradient loses its component along each (unit) decoder row:
    g_i <- g_i - (g_i . u_i) u_i,   u_i = w_i / max(||w_i||, EPS)
and after the step each row is renormalised: w_i <- w_i / max(||w_i||, EPS).
Both are memory-bound; each kernel reads its rows once and writes them once, in one pass, with the row
held in registers (float32) between the reduction and the update.
"""

import torch

from ._triton import tl, triton

from .sparse_decoder import check_float_operands, check_int32_offsets, check_shape

# Same guard as torch.nn.functional.normalize: a zero row stays zero instead of becoming NaN.
EPS: tl.constexpr = tl.constexpr(1e-12)
# A program holds whole rows; widest supported row (register tile of one row per program).
MAX_D = 16384
# Rows per program are chosen so a program holds about this many elements.
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _row_tile(n_rows, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_R, BLOCK_D] tile of a contiguous [n_rows, d] matrix."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    return rows[:, None] * d + dims[None, :], (rows < n_rows)[:, None] & (dims < d)[None, :]


@triton.jit
def _unit_rows(w):
    """Rows of w [BLOCK_R, BLOCK_D] (float32, masked entries 0) scaled to unit L2 norm."""
    norm = tl.sqrt_rn(tl.sum(w * w, axis=1))
    return w / tl.maximum(norm, EPS)[:, None]


@triton.jit
def _remove_parallel_grad_kernel(w_ptr, grad_ptr, n_rows, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad[r] -= (grad[r] . u[r]) u[r] with u[r] = W[r] / ||W[r]||, for the rows r of W, grad [S*m, d].

    Grid: (cdiv(S*m, BLOCK_R),); BLOCK_D >= d, so each row is reduced and updated in registers.
    """
    offsets, mask = _row_tile(n_rows, d, BLOCK_R, BLOCK_D)
    unit = _unit_rows(tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad -= tl.sum(grad * unit, axis=1)[:, None] * unit
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_rows_kernel(w_ptr, n_rows, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """W[r] <- W[r] / ||W[r]|| for the rows r of W [S*m, d]. Grid: (cdiv(S*m, BLOCK_R),)."""
    offsets, mask = _row_tile(n_rows, d, BLOCK_R, BLOCK_D)
    unit = _unit_rows(tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    tl.store(w_ptr + offsets, unit.to(w_ptr.dtype.element_ty), mask=mask)


def _row_launch(op: str, **tensors: torch.Tensor) -> tuple[tuple[int], dict]:
    """Check [S, m, d] contiguous operands of one dtype; return the grid and the kernel's row arguments."""
    check_float_operands(op, **tensors)
    W_dec = next(iter(tensors.values()))
    if W_dec.dim() != 3:
        raise ValueError(f"{op}: W_dec must be [S, m, d], got shape {list(W_dec.shape)}")
    for name, tensor in tensors.items():
        check_shape(op, name, tensor, tuple(W_dec.shape))
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place)")
    n_seeds, m, d = W_dec.shape
    if d > MAX_D:
        raise ValueError(f"{op}: rows wider than {MAX_D} are not supported, got d = {d}")
    check_int32_offsets(op, W_dec=W_dec.numel())
    block_d = triton.next_power_of_2(d)
    block_r = max(1, ELEMENTS_PER_PROGRAM // block_d)
    n_rows = n_seeds * m
    return (triton.cdiv(n_rows, block_r),), dict(n_rows=n_rows, d=d, BLOCK_R=block_r, BLOCK_D=block_d)


def remove_parallel_grad_triton_(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """In place on grad [S, m, d]: remove each row's component along the unit row of W_dec [S, m, d]."""
    grid, row_args = _row_launch("remove_parallel_grad_", W_dec=W_dec, grad=grad)
    _remove_parallel_grad_kernel[grid](W_dec, grad, **row_args)


def normalize_rows_triton_(W_dec: torch.Tensor) -> None:
    """In place: scale each row of W_dec [S, m, d] to unit L2 norm."""
    grid, row_args = _row_launch("normalize_rows_", W_dec=W_dec)
    _normalize_rows_kernel[grid](W_dec, **row_args)


@torch.no_grad()
def remove_parallel_grad_reference_(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Plain-torch gradient projection, computed in float32 and written back into grad."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=-1, eps=EPS.value)
    g = grad.float()
    grad.copy_(g - (g * unit).sum(dim=-1, keepdim=True) * unit)


@torch.no_grad()
def normalize_rows_reference_(W_dec: torch.Tensor) -> None:
    """Plain-torch row renormalisation, computed in float32 and written back into W_dec."""
    W_dec.copy_(torch.nn.functional.normalize(W_dec.float(), dim=-1, eps=EPS.value))
