"""Sparse decoder: x_hat = b_dec + sum_j values[..., j] * W_dec[indices[..., j]], never densifying the codes.

Shapes: S seeds, B rows, k kept latents per row, m latents, d input dimension.
values [S, B, k], indices [S, B, k] int64, W_dec [S, m, d], b_dec [S, d] -> x_hat [S, B, d].

Backward:
    d values[s, b, j] = <g[s, b], W_dec[s, idx[s, b, j]]>           (`_gathered_dot_kernel`)
    d W_dec[s, i]     = sum over (b, j) with idx[s, b, j] = i of values[s, b, j] * g[s, b]
    d b_dec[s]        = sum_b g[s, b]
The scatter into d W_dec is a segmented reduction (`segment_sum_by_latent`): the (b, j) entries are sorted
stably by latent and each program owns whole latents, so no float atomics are used and every run gives
the same bits. The TopK encoder's d W_enc is the same scatter with other rows and coefficients, so this
module also holds that reduction and the operand checks that all kernel launchers share.
"""

from typing import NamedTuple

import torch

from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

# A program of the segmented reduction owns BLOCK_LATENTS whole latents and reads their entries
# BLOCK_ENTRIES at a time; tl.dot needs every dimension to be at least 16.
BLOCK_LATENTS = 32
BLOCK_ENTRIES = 32
# Rows and dimensions per program of the two gather kernels (decode, and its d values).
GATHER_BLOCK_B = 32
GATHER_BLOCK_D = 128


def check_float_operands(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device and one dtype that the kernels support."""
    first_name, first = next(iter(tensors.items()))
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {first_name} has dtype {first.dtype}; the kernels support float32 and bfloat16")
    for name, tensor in tensors.items():
        if tensor.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {tensor.dtype} but {first_name} has {first.dtype}")
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}")


def check_shape(op: str, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError unless tensor has exactly the expected shape."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {list(expected)}, got {list(tensor.shape)}")


def check_indices(op: str, indices: torch.Tensor, expected: tuple[int, ...], device: torch.device) -> None:
    """Raise ValueError unless indices is an int64 tensor of the expected shape on the given device."""
    check_shape(op, "indices", indices, expected)
    if indices.dtype != torch.int64:
        raise ValueError(f"{op}: indices must be int64, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{op}: indices is on {indices.device} but the weights are on {device}")


def check_int32_offsets(op: str, **numels: int) -> None:
    """The kernels compute offsets in int32: raise ValueError for any operand of 2**31 or more elements."""
    for name, numel in numels.items():
        if numel >= 2**31:
            raise ValueError(f"{op}: {name} would have {numel} elements; the kernels need fewer than 2**31")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32 operands, following torch's float32 matmul setting (TF32 only
    where torch would use it); bfloat16 operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def block_size(n: int, cap: int) -> int:
    """Smallest power of two covering n, between 16 (tl.dot's minimum) and cap."""
    return min(max(triton.next_power_of_2(n), 16), cap)


class LatentRouting(NamedTuple):
    """The flattened (row, slot) entries of indices [S, B, k], sorted stably by latent, per seed.

    entry_order [S, B*k]: entry numbers (b * k + j) in sorted order; sorted_latents [S, B*k]: their latents;
    segment_start [S, m + 1]: latent i owns the sorted positions segment_start[i] : segment_start[i + 1].
    """

    entry_order: torch.Tensor
    sorted_latents: torch.Tensor
    segment_start: torch.Tensor


def route_by_latent(indices: torch.Tensor, m: int) -> LatentRouting:
    """Group the entries of indices [S, B, k] by latent; a stable sort makes the grouping deterministic."""
    flat = indices.reshape(indices.shape[0], -1)
    sorted_latents, entry_order = torch.sort(flat, dim=1, stable=True)
    latent_ids = torch.arange(m + 1, device=indices.device).expand(flat.shape[0], m + 1).contiguous()
    segment_start = torch.searchsorted(sorted_latents, latent_ids)
    return LatentRouting(entry_order, sorted_latents, segment_start)


@triton.jit
def _segment_sum_kernel(
    rows_ptr, coef_ptr, entry_order_ptr, sorted_latents_ptr, segment_start_ptr, out_ptr, coef_sum_ptr,
    n_rows, k, d, m,
    out_stride_seed, out_stride_latent, out_stride_dim,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_COEF_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[s, i, :] = sum over entries e = b * k + j with indices[s, b, j] = i of coef[s, e] * rows[s, b, :].

    rows [S, B, d], coef [S, B*k]; out is [S, m, d] addressed through its strides (the encoder passes a
    transposed view). Grid: (cdiv(m, BLOCK_L), cdiv(d, BLOCK_D), S). The program owning latents
    [l0, l0 + BLOCK_L) reads their entries, which are contiguous in sorted order, and scatters them with a
    one-hot tl.dot: [BLOCK_L, BLOCK_E] weights @ [BLOCK_E, BLOCK_D] gathered rows. The entries are visited
    in a fixed order, so the sum is the same bits every run. With STORE_COEF_SUM, coef_sum[s, i] = sum of
    coef over latent i's entries (the encoder's d b_enc).
    """
    latent_block = tl.program_id(0)
    dim_block = tl.program_id(1)
    seed = tl.program_id(2)
    n_entries = n_rows * k

    latents = latent_block * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    segment_start = segment_start_ptr + seed * (m + 1)
    begin = tl.load(segment_start + latent_block * BLOCK_L)
    end = tl.load(segment_start + tl.minimum(latent_block * BLOCK_L + BLOCK_L, m))

    total = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    coef_sum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for first in range(begin, end, BLOCK_E):
        positions = first + tl.arange(0, BLOCK_E)
        entry_ok = positions < end
        entries = tl.load(entry_order_ptr + seed * n_entries + positions, mask=entry_ok, other=0)
        entry_latents = tl.load(sorted_latents_ptr + seed * n_entries + positions, mask=entry_ok, other=-1)
        coef = tl.load(coef_ptr + seed * n_entries + entries, mask=entry_ok, other=0.0).to(tl.float32)
        weights = tl.where(latents[:, None] == entry_latents[None, :], coef[None, :], 0.0)
        row_offsets = (seed * n_rows + entries // k)[:, None] * d + dims[None, :]
        rows = tl.load(rows_ptr + row_offsets, mask=entry_ok[:, None] & dim_ok[None, :], other=0.0)
        total = tl.dot(weights.to(rows.dtype), rows, total, input_precision=DOT_PRECISION)
        if STORE_COEF_SUM:
            coef_sum += tl.sum(weights, axis=1)

    latent_ok = latents < m
    out = out_ptr + seed * out_stride_seed + latents[:, None] * out_stride_latent + dims[None, :] * out_stride_dim
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=latent_ok[:, None] & dim_ok[None, :])
    if STORE_COEF_SUM:
        if dim_block == 0:
            tl.store(coef_sum_ptr + seed * m + latents, coef_sum, mask=latent_ok)


def segment_sum_by_latent(
    rows: torch.Tensor,
    coef: torch.Tensor,
    routing: LatentRouting,
    out: torch.Tensor,
    coef_sum: torch.Tensor | None = None,
) -> None:
    """Write out[s, i] = sum over entries (b, j) routed to latent i of coef[s, b, j] * rows[s, b].

    rows [S, B, d] and coef [S, B, k] contiguous; out [S, m, d] of any strides (a transposed view is fine);
    coef_sum, if given, is a float32 [S, m] that receives the per-latent sums of coef.
    """
    n_seeds, n_rows, d = rows.shape
    m = out.shape[1]
    k = coef.shape[2]
    block_d = block_size(d, 64)
    grid = (triton.cdiv(m, BLOCK_LATENTS), triton.cdiv(d, block_d), n_seeds)
    _segment_sum_kernel[grid](
        rows, coef, routing.entry_order, routing.sorted_latents, routing.segment_start, out,
        coef_sum if coef_sum is not None else out,
        n_rows, k, d, m,
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_L=BLOCK_LATENTS, BLOCK_E=BLOCK_ENTRIES, BLOCK_D=block_d,
        STORE_COEF_SUM=coef_sum is not None, DOT_PRECISION=dot_precision(rows.dtype), num_warps=8,
    )


@triton.jit
def _sparse_decode_kernel(
    values_ptr, indices_ptr, w_dec_ptr, b_dec_ptr, out_ptr,
    n_rows, k, d, m,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[s, b, :] = b_dec[s] + sum_j values[s, b, j] * W_dec[s, indices[s, b, j], :].

    values, indices [S, B, k]; W_dec [S, m, d]; b_dec [S, d]; out [S, B, d].
    Grid: (cdiv(B, BLOCK_B), cdiv(d, BLOCK_D), S); each program gathers k rows of W_dec per output row
    and accumulates them in float32 in slot order.
    """
    row_block = tl.program_id(0)
    dim_block = tl.program_id(1)
    seed = tl.program_id(2)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = dim_block * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < d
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    codes = (seed * n_rows + rows) * k

    total = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for slot in range(k):
        latent = tl.load(indices_ptr + codes + slot, mask=row_ok, other=0)
        value = tl.load(values_ptr + codes + slot, mask=row_ok, other=0.0).to(tl.float32)
        w_rows = tl.load(w_dec_ptr + (seed * m + latent)[:, None] * d + dims[None, :], mask=tile_ok, other=0.0)
        total += value[:, None] * w_rows.to(tl.float32)
    total += tl.load(b_dec_ptr + seed * d + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (seed * n_rows + rows)[:, None] * d + dims[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gathered_dot_kernel(
    grad_out_ptr, indices_ptr, w_dec_ptr, grad_values_ptr,
    n_rows, k, d, m,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_values[s, b, j] = <grad_out[s, b, :], W_dec[s, indices[s, b, j], :]>, accumulated in float32.

    grad_out [S, B, d]; indices, grad_values [S, B, k]; W_dec [S, m, d]. Grid: (cdiv(B, BLOCK_B), S).
    """
    row_block = tl.program_id(0)
    seed = tl.program_id(1)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    codes = (seed * n_rows + rows) * k
    grad_rows = grad_out_ptr + (seed * n_rows + rows)[:, None] * d

    for slot in range(k):
        latent = tl.load(indices_ptr + codes + slot, mask=row_ok, other=0)
        w_rows = w_dec_ptr + (seed * m + latent)[:, None] * d
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for dim_start in range(0, d, BLOCK_D):
            dims = dim_start + tl.arange(0, BLOCK_D)
            tile_ok = row_ok[:, None] & (dims < d)[None, :]
            grad = tl.load(grad_rows + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            dot += tl.sum(grad * w, axis=1)
        tl.store(grad_values_ptr + codes + slot, dot.to(grad_values_ptr.dtype.element_ty), mask=row_ok)


def _check_decode_operands(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> None:
    op = "sparse_decode"
    if W_dec.dim() != 3:
        raise ValueError(f"{op}: W_dec must be [S, m, d], got shape {list(W_dec.shape)}")
    n_seeds, _, d = W_dec.shape
    check_float_operands(op, W_dec=W_dec, values=values, b_dec=b_dec)
    if values.dim() != 3 or values.shape[0] != n_seeds:
        raise ValueError(f"{op}: values must be [S={n_seeds}, B, k], got shape {list(values.shape)}")
    check_indices(op, indices, tuple(values.shape), W_dec.device)
    check_shape(op, "b_dec", b_dec, (n_seeds, d))
    check_int32_offsets(op, W_dec=W_dec.numel(), values=values.numel(), x_hat=values.shape[0] * values.shape[1] * d)


def sparse_decode_forward(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """Launch the gather-decoder: values, indices [S, B, k], W_dec [S, m, d], b_dec [S, d] -> [S, B, d]."""
    _check_decode_operands(values, indices, W_dec, b_dec)
    values, indices, W_dec, b_dec = (t.contiguous() for t in (values, indices, W_dec, b_dec))
    n_seeds, n_rows, k = values.shape
    m, d = W_dec.shape[1:]
    x_hat = torch.empty((n_seeds, n_rows, d), device=W_dec.device, dtype=W_dec.dtype)
    block_d = block_size(d, GATHER_BLOCK_D)
    grid = (triton.cdiv(n_rows, GATHER_BLOCK_B), triton.cdiv(d, block_d), n_seeds)
    _sparse_decode_kernel[grid](
        values, indices, W_dec, b_dec, x_hat, n_rows, k, d, m, BLOCK_B=GATHER_BLOCK_B, BLOCK_D=block_d, num_warps=8
    )
    return x_hat


def sparse_decode_backward(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (values, W_dec, b_dec) of sparse_decode for the upstream gradient grad_out [S, B, d]."""
    needs_values, needs_w_dec, needs_b_dec = needs_grad
    grad_out = grad_out.contiguous()
    n_seeds, n_rows, k = values.shape
    m, d = W_dec.shape[1:]
    grad_values = grad_w_dec = grad_b_dec = None
    if needs_values:
        grad_values = torch.empty_like(values)
        _gathered_dot_kernel[(triton.cdiv(n_rows, GATHER_BLOCK_B), n_seeds)](
            grad_out, indices, W_dec, grad_values, n_rows, k, d, m,
            BLOCK_B=GATHER_BLOCK_B, BLOCK_D=block_size(d, GATHER_BLOCK_D), num_warps=8,
        )
    if needs_w_dec:
        grad_w_dec = torch.empty_like(W_dec)
        segment_sum_by_latent(grad_out, values, route_by_latent(indices, m), grad_w_dec)
    if needs_b_dec:
        # one sum per seed, so that no seed's bits depend on how many seeds share the call
        grad_b_dec = torch.stack([g.sum(dim=0, dtype=torch.float32) for g in grad_out]).to(W_dec.dtype)
    return grad_values, grad_w_dec, grad_b_dec


class SparseDecodeFunction(torch.autograd.Function):
    """Autograd wrapper: apply(values, indices, W_dec, b_dec) -> x_hat [S, B, d]."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        x_hat = sparse_decode_forward(values, indices, W_dec, b_dec)
        ctx.save_for_backward(values.contiguous(), indices.contiguous(), W_dec.contiguous())
        return x_hat

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_values, grad_w_dec, grad_b_dec = sparse_decode_backward(
            grad_out, values, indices, W_dec, (needs[0], needs[2], needs[3])
        )
        return grad_values, None, grad_w_dec, grad_b_dec


def sparse_decode_reference(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """Plain-torch sparse decode (gathers [S, B, k, d]); accumulates in float32 like the kernel."""
    seeds = torch.arange(W_dec.shape[0], device=W_dec.device)[:, None, None]
    gathered = W_dec[seeds, indices].float()
    x_hat = b_dec.float()[:, None, :] + torch.einsum("sbk,sbkd->sbd", values.float(), gathered)
    return x_hat.to(W_dec.dtype)
