"""Fused TopK encoder: the k largest of (x - b_dec) @ W_enc + b_enc per row, ReLU'd, with their indices.

Shapes: S seeds, B rows, d input dimension, m latents, k kept latents per row.
x [B, d] (shared by all seeds) or [S, B, d]; W_enc [S, d, m]; b_enc [S, m]; b_dec [S, d]
-> values [S, B, k] (dtype of W_enc), indices [S, B, k] int64, ordered by pre-activation descending,
ties to the smaller latent index.

The dense [S, B, m] pre-activation never reaches global memory:
1. `_topk_candidates_kernel` (grid: row blocks x latent splits x seeds) computes [BLOCK_B, BLOCK_M]
   pre-activation tiles with tl.dot and merges each into a running top-K_PAD per row (K_PAD = k rounded up
   to a power of two). It writes only those K_PAD candidates per row and split. Splitting the latents
   gives enough programs to fill the GPU when B is small.
2. `_topk_merge_kernel` merges the splits' candidates and writes them in descending order.

Each pre-activation and its latent are packed into one int64 key whose signed order is the wanted order
(value, then the smaller latent), so every comparison is a single integer max/min and the result is exact.
Selection uses only max/min/where reductions, which the Triton interpreter runs vectorised; the same
code runs on the GPU. A tile is merged by extracting, largest first, only its keys that beat the row's
current K_PAD-th best: after the first tiles few keys survive, so most tiles cost one comparison.

Backward (dz = d values where the value is positive, else 0) never forms a dense [S, B, m] gradient:
    d W_enc[s, :, i] = sum over (b, j) with idx[s, b, j] = i of dz[s, b, j] * (x[b] - b_dec[s])
    d b_enc[s, i]    = the same sum of dz
    d b_dec[s]       = -sum_{b, j} dz[s, b, j] * W_enc[s, :, idx[s, b, j]] = -W_enc[s] @ d b_enc[s]
The scatter is sparse_decoder's deterministic segmented reduction (no float atomics). x gets no gradient.
"""

import torch

from ._triton import tl, triton

from .sparse_decoder import (
    block_size,
    check_float_operands,
    check_int32_offsets,
    check_shape,
    dot_precision,
    route_by_latent,
    segment_sum_by_latent,
)

MAX_K = 256
# Below every packed key; marks empty top-k slots and masked-out tile entries.
LOWEST_KEY: tl.constexpr = tl.constexpr(-(2**63))
# Aim for about this many programs in the candidate kernel (a few per SM on an H200's 132 SMs) ...
TARGET_PROGRAMS = 512
# ... but give each latent split at least this many tiles, so its first, full top-k extraction is amortised.
MIN_TILES_PER_SPLIT = 4


@triton.jit
def _flip_negative_floats(bits):
    """Map int32 float bits to an int32 with the same order as the floats (negatives: flip magnitude bits).

    The map is its own inverse, so it also turns the ordered int back into float bits."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack_keys(pre, latents):
    """int64 keys: ordered float bits in the high half, 0x7FFFFFFF - latent in the low half.

    A larger key means a larger pre-activation, or an equal one at a smaller latent index."""
    # torch ranks -0.0 and +0.0 as equal, so they must get the same key
    pre = tl.where(pre == 0.0, 0.0, pre)
    ordered = _flip_negative_floats(pre.to(tl.int32, bitcast=True))
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - latents).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    """Inverse of _pack_keys: (float32 pre-activations, int64 latents)."""
    ordered = (keys >> 32).to(tl.int32)
    pre = _flip_negative_floats(ordered).to(tl.float32, bitcast=True)
    return pre, 0x7FFFFFFF - (keys & 0x7FFFFFFF)


@triton.jit
def _merge_into_topk(top_keys, keys, K_PAD: tl.constexpr):
    """Merge a tile of keys [BLOCK_B, N] into each row's best keys so far, top_keys [BLOCK_B, K_PAD].

    top_keys is unordered, with LOWEST_KEY in empty slots. Each round inserts every row's largest
    remaining key that beats the row's weakest kept key, in place of that weakest key, so the rounds
    needed equal the survivors of the busiest row; keys that cannot beat the threshold are never touched
    again. Keys within a row are distinct (they contain the latent), so the result is exact.
    """
    slots = tl.arange(0, K_PAD)
    threshold, weakest_slot = tl.min(top_keys, axis=1, return_indices=True)
    candidates = tl.where(keys > threshold[:, None], keys, LOWEST_KEY)
    best = tl.max(candidates, axis=1)
    while tl.max(best, axis=0) > LOWEST_KEY:
        insert = (slots[None, :] == weakest_slot[:, None]) & (best > threshold)[:, None]
        top_keys = tl.where(insert, best[:, None], top_keys)
        threshold, weakest_slot = tl.min(top_keys, axis=1, return_indices=True)
        # keys of a row are distinct and extracted largest first, so the rest are all below `best`
        still_in = (candidates > threshold[:, None]) & (candidates < best[:, None])
        candidates = tl.where(still_in, candidates, LOWEST_KEY)
        best = tl.max(candidates, axis=1)
    return top_keys


@triton.jit
def _topk_candidates_kernel(
    x_ptr, w_enc_ptr, b_enc_ptr, b_dec_ptr, candidates_ptr,
    n_rows, d, m, latents_per_split, n_splits, x_seed_stride,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """candidates[s, b, split, :] = keys of the K_PAD largest pre-activations of row b among the latents
    [split * latents_per_split, (split + 1) * latents_per_split), pre = (x[b] - b_dec[s]) @ W_enc[s] + b_enc[s].

    x [B, d] (x_seed_stride = 0) or [S, B, d]; W_enc [S, d, m]; b_enc [S, m]; b_dec [S, d];
    candidates [S, B, n_splits, K_PAD] int64. Grid: (cdiv(B, BLOCK_B), n_splits, S). Products accumulate
    in float32; for bfloat16 inputs x - b_dec is rounded to bfloat16 before the tensor-core product.
    """
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    seed = tl.program_id(2)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    x_rows = x_ptr + seed * x_seed_stride + rows[:, None] * d
    w_enc = w_enc_ptr + seed * d * m
    first_latent = split * latents_per_split
    end_latent = tl.minimum(first_latent + latents_per_split, m)

    top_keys = tl.full((BLOCK_B, K_PAD), LOWEST_KEY, dtype=tl.int64)
    for tile_start in range(first_latent, end_latent, BLOCK_M):
        latents = tile_start + tl.arange(0, BLOCK_M)
        latent_ok = latents < end_latent
        pre = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for dim_start in range(0, d, BLOCK_D):
            dims = dim_start + tl.arange(0, BLOCK_D)
            dim_ok = dims < d
            x = tl.load(x_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            b_dec = tl.load(b_dec_ptr + seed * d + dims, mask=dim_ok, other=0.0)
            centred = (x.to(tl.float32) - b_dec.to(tl.float32)[None, :]).to(w_enc_ptr.dtype.element_ty)
            w = tl.load(w_enc + dims[:, None] * m + latents[None, :], mask=dim_ok[:, None] & latent_ok[None, :], other=0.0)
            pre = tl.dot(centred, w, pre, input_precision=DOT_PRECISION)
        pre += tl.load(b_enc_ptr + seed * m + latents, mask=latent_ok, other=0.0).to(tl.float32)[None, :]
        keys = tl.where(row_ok[:, None] & latent_ok[None, :], _pack_keys(pre, latents), LOWEST_KEY)
        top_keys = _merge_into_topk(top_keys, keys, K_PAD)

    out = candidates_ptr + ((seed * n_rows + rows[:, None]) * n_splits + split) * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(out, top_keys, mask=row_ok[:, None])


@triton.jit
def _topk_merge_kernel(
    candidates_ptr, values_ptr, indices_ptr,
    n_rows, k, n_splits,
    BLOCK_B: tl.constexpr, K_PAD: tl.constexpr,
):
    """Top k of each row's n_splits * K_PAD candidate keys, written in descending order.

    candidates [S, B, n_splits, K_PAD] int64 -> values [S, B, k] = ReLU(pre-activation), indices [S, B, k].
    Grid: (cdiv(B, BLOCK_B), S).
    """
    row_block = tl.program_id(0)
    seed = tl.program_id(1)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < n_rows
    row_candidates = candidates_ptr + ((seed * n_rows + rows[:, None]) * n_splits) * K_PAD + tl.arange(0, K_PAD)[None, :]

    # the first split's candidates are already a valid top-K_PAD to merge the others into
    top_keys = tl.load(row_candidates, mask=row_ok[:, None], other=LOWEST_KEY)
    for split in range(1, n_splits):
        keys = tl.load(row_candidates + split * K_PAD, mask=row_ok[:, None], other=LOWEST_KEY)
        top_keys = _merge_into_topk(top_keys, keys, K_PAD)

    # order by repeated extraction of the maximum: tl.sort is a per-element loop under the interpreter
    outputs = (seed * n_rows + rows) * k
    for slot in range(k):
        best = tl.max(top_keys, axis=1)
        top_keys = tl.where(top_keys == best[:, None], LOWEST_KEY, top_keys)
        pre, latent = _unpack_keys(best)
        tl.store(values_ptr + outputs + slot, tl.maximum(pre, 0.0).to(values_ptr.dtype.element_ty), mask=row_ok)
        tl.store(indices_ptr + outputs + slot, latent, mask=row_ok)


def _check_encode_operands(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int) -> None:
    op = "topk_encode"
    if W_enc.dim() != 3:
        raise ValueError(f"{op}: W_enc must be [S, d, m], got shape {list(W_enc.shape)}")
    n_seeds, d, m = W_enc.shape
    check_float_operands(op, W_enc=W_enc, x=x, b_enc=b_enc, b_dec=b_dec)
    if x.dim() not in (2, 3) or x.shape[-1] != d or (x.dim() == 3 and x.shape[0] != n_seeds):
        raise ValueError(f"{op}: x must be [B, d={d}] or [S={n_seeds}, B, d={d}], got shape {list(x.shape)}")
    check_shape(op, "b_enc", b_enc, (n_seeds, m))
    check_shape(op, "b_dec", b_dec, (n_seeds, d))
    if not 1 <= k <= min(m, MAX_K):
        raise ValueError(f"{op}: k must satisfy 1 <= k <= min(m, {MAX_K}) = {min(m, MAX_K)}, got {k}")
    n_rows = x.shape[-2]
    # the backward's x - b_dec is [S, B, d] even when x is shared
    check_int32_offsets(op, W_enc=W_enc.numel(), centred_x=n_seeds * n_rows * d,
                        candidates=n_seeds * n_rows * triton.next_power_of_2(k))


def _candidate_tiles(k_pad: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_D) for the candidate kernel; fewer rows per program when K_PAD is wide."""
    return (64 if k_pad <= 64 else 32), 64, 64


def topk_encode_forward(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused encoder; returns (values [S, B, k] ReLU'd, indices [S, B, k] int64)."""
    _check_encode_operands(x, W_enc, b_enc, b_dec, k)
    x, W_enc, b_enc, b_dec = (t.contiguous() for t in (x, W_enc, b_enc, b_dec))
    n_seeds, d, m = W_enc.shape
    n_rows = x.shape[-2]
    k_pad = triton.next_power_of_2(k)
    block_b, block_m, block_d = _candidate_tiles(k_pad)
    block_d = block_size(d, block_d)

    row_blocks = triton.cdiv(n_rows, block_b)
    latent_tiles = triton.cdiv(m, block_m)
    wanted_splits = triton.cdiv(TARGET_PROGRAMS, row_blocks * n_seeds)
    tiles_per_split = triton.cdiv(latent_tiles, max(1, min(wanted_splits, latent_tiles // MIN_TILES_PER_SPLIT)))
    n_splits = triton.cdiv(latent_tiles, tiles_per_split)

    candidates = torch.empty((n_seeds, n_rows, n_splits, k_pad), device=W_enc.device, dtype=torch.int64)
    _topk_candidates_kernel[(row_blocks, n_splits, n_seeds)](
        x, W_enc, b_enc, b_dec, candidates,
        n_rows, d, m, tiles_per_split * block_m, n_splits, n_rows * d if x.dim() == 3 else 0,
        BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d, K_PAD=k_pad, DOT_PRECISION=dot_precision(W_enc.dtype),
        num_warps=8,
    )
    values = torch.empty((n_seeds, n_rows, k), device=W_enc.device, dtype=W_enc.dtype)
    indices = torch.empty((n_seeds, n_rows, k), device=W_enc.device, dtype=torch.int64)
    # about 1024 keys per program: wider K_PAD, fewer rows (a [32, 256] int64 tile spills registers)
    merge_block_b = max(1, 1024 // k_pad)
    _topk_merge_kernel[(triton.cdiv(n_rows, merge_block_b), n_seeds)](
        candidates, values, indices, n_rows, k, n_splits, BLOCK_B=merge_block_b, K_PAD=k_pad
    )
    return values, indices


def topk_encode_backward(
    grad_values: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor,
    values: torch.Tensor, indices: torch.Tensor, needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sparse gradients (W_enc, b_enc, b_dec) from d values [S, B, k]; never forms an [S, B, m] tensor."""
    needs_w_enc, needs_b_enc, needs_b_dec = needs_grad
    m = W_enc.shape[2]
    dz = torch.where(values > 0, grad_values, 0).contiguous()
    centred = (x - b_dec[:, None, :]).contiguous()
    grad_w_enc = torch.empty_like(W_enc)
    grad_b_enc = torch.empty(b_dec.shape[0], m, device=W_enc.device, dtype=torch.float32)
    # d W_enc is [S, d, m]; its transposed view is the [S, m, d] layout the segmented reduction writes
    segment_sum_by_latent(centred, dz, route_by_latent(indices, m), grad_w_enc.transpose(1, 2), grad_b_enc)
    grad_b_dec = None
    if needs_b_dec:
        # one product per seed, so that no seed's bits depend on how many seeds share the call
        grad_b_dec = -torch.stack([W.float() @ g for W, g in zip(W_enc, grad_b_enc)]).to(b_dec.dtype)
    return (
        grad_w_enc if needs_w_enc else None,
        grad_b_enc.to(W_enc.dtype) if needs_b_enc else None,
        grad_b_dec,
    )


class TopKEncodeFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x, W_enc, b_enc, b_dec, k) -> (values, indices); saves no [S, B, m] tensor."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k):
        values, indices = topk_encode_forward(x, W_enc, b_enc, b_dec, k)
        ctx.save_for_backward(x, W_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        x, W_enc, b_dec, values, indices = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = topk_encode_backward(grad_values, x, W_enc, b_dec, values, indices, (needs[1], needs[2], needs[3]))
        return None, *grads, None


def topk_encode_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch TopK encoder: dense pre-activation in float32, then a stable descending sort.

    The stable sort puts equal pre-activations in latent order, which is the kernel's tie rule."""
    centred = x - b_dec[:, None, :]
    pre = centred.float() @ W_enc.float() + b_enc.float()[:, None, :]
    top_pre, indices = torch.sort(pre, dim=-1, descending=True, stable=True)
    return torch.relu(top_pre[..., :k]).to(W_enc.dtype), indices[..., :k]
