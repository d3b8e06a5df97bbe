"""The Triton kernels equal their plain-torch references.

Without a GPU (CI) the kernels run under the Triton interpreter (tests/conftest.py), so shapes are
tiny but deliberately odd (d = 37, m = 300, B = 45: nothing a power of two or a multiple of a block).
With a GPU the same tests run the compiled kernels, and the bfloat16 and memory tests run too.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.decoder_norm import MAX_D, normalize_rows_triton_, remove_parallel_grad_triton_
from kernels.sparse_decoder import sparse_decode_forward
from kernels.topk_encoder import MAX_K, topk_encode_forward

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU (the Triton interpreter has no bfloat16)")

# float32 tolerances: the kernels and torch sum in different orders
ATOL, RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-4


def make_sae(n_seeds: int, d: int, m: int, *, dtype=torch.float32, seed: int = 0, bias_shift: float = 0.0) -> dict:
    """Random SAE parameters scaled so pre-activations are O(1); bias_shift moves b_enc (negative: ReLU zeros)."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        "W_enc": torch.randn(n_seeds, d, m, generator=gen) / d**0.5,
        "b_enc": 0.1 * torch.randn(n_seeds, m, generator=gen) + bias_shift,
        "b_dec": 0.1 * torch.randn(n_seeds, d, generator=gen),
        "W_dec": torch.nn.functional.normalize(torch.randn(n_seeds, m, d, generator=gen), dim=-1),
    }
    return {name: p.to(DEVICE, dtype) for name, p in params.items()}


def make_x(n_seeds: int, n_rows: int, d: int, *, shared: bool, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n_rows, d) if shared else (n_seeds, n_rows, d)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def with_grad(params: dict) -> dict:
    return {name: p.detach().clone().requires_grad_() for name, p in params.items()}


def assert_topk_matches(values, indices, x, p, k, *, atol=ATOL, rtol=RTOL):
    """Values equal the reference; the returned indices really hold those values, in descending order,
    and are among the k largest; index sets equal the reference's wherever the k-th and (k+1)-th
    pre-activations are further apart than the tolerance (ReLU zeros and near-ties may pick either)."""
    ref_values, ref_indices = kernels.topk_encode_reference(x, p["W_enc"], p["b_enc"], p["b_dec"], k)
    assert values.shape == indices.shape == ref_values.shape
    assert values.dtype == p["W_enc"].dtype and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, atol=atol, rtol=rtol)

    pre = (x.double() - p["b_dec"].double()[:, None, :]) @ p["W_enc"].double() + p["b_enc"].double()[:, None, :]
    pre_at_indices = pre.gather(-1, indices)
    torch.testing.assert_close(torch.relu(pre_at_indices).to(values.dtype), values, atol=atol, rtol=rtol)
    assert (pre_at_indices[..., :-1] >= pre_at_indices[..., 1:] - atol).all(), "not in descending order"
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "a latent was returned twice"
    sorted_pre = pre.sort(dim=-1, descending=True).values
    if k < pre.shape[-1]:
        next_best = sorted_pre[..., k]
        assert (pre_at_indices[..., -1] >= next_best - atol).all(), "a returned latent is not among the top k"
        clear = sorted_pre[..., k - 1] - next_best > 10 * atol
        same_set = (indices.sort(dim=-1).values == ref_indices.sort(dim=-1).values).all(dim=-1)
        assert same_set[clear].all(), "index sets differ where the top k is unambiguous"


ENCODER_SHAPES = [(45, 37, 300), (20, 24, 520)]  # (B, d, m); m = 520 gives two latent splits


@pytest.mark.parametrize("n_rows,d,m", ENCODER_SHAPES)
@pytest.mark.parametrize("k", [1, 7, 32])
@pytest.mark.parametrize("n_seeds", [1, 3])
@pytest.mark.parametrize("shared_x", [True, False])
def test_topk_encode_matches_reference(n_rows, d, m, k, n_seeds, shared_x):
    p = make_sae(n_seeds, d, m)
    x = make_x(n_seeds, n_rows, d, shared=shared_x)
    values, indices = kernels.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)
    assert_topk_matches(values, indices, x, p, k)


def test_topk_encode_wide_k_and_relu_zeros():
    """k = 128 (a power of two) and k = 100 (padded to 128 and masked), with a negative bias so that
    most of the kept pre-activations are negative and come back as ReLU zeros."""
    p = make_sae(1, 16, 300, bias_shift=-1.0)
    x = make_x(1, 10, 16, shared=True)
    for k in (100, 128):
        values, indices = kernels.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)
        assert (values == 0).any() and (values > 0).any()
        assert_topk_matches(values, indices, x, p, k)


def test_topk_encode_ties_go_to_the_smaller_index():
    """Equal pre-activations must come out in latent order, exactly as the stable-sort reference."""
    n_rows, d, m, k = 9, 20, 70, 7
    # all pre-activations equal: the answer is latents 0..k-1 for every row
    zeros = {"W_enc": torch.zeros(1, d, m), "b_enc": torch.zeros(1, m), "b_dec": torch.zeros(1, d)}
    zeros = {name: t.to(DEVICE) for name, t in zeros.items()}
    values, indices = kernels.topk_encode(make_x(1, n_rows, d, shared=True), **zeros, k=k, triton=True)
    assert torch.equal(indices, torch.arange(k, device=DEVICE).expand(1, n_rows, k))
    assert torch.equal(values, torch.zeros_like(values))

    # small integers make every pre-activation exact in any summation order, with ties everywhere
    # (positive, zero and negative); the kernel must then equal the reference bit for bit
    gen = torch.Generator().manual_seed(3)
    ints = {
        "W_enc": torch.randint(-1, 2, (2, d, m), generator=gen),
        "b_enc": torch.randint(-2, 3, (2, m), generator=gen),
        "b_dec": torch.randint(-1, 2, (2, d), generator=gen),
    }
    ints = {name: t.to(DEVICE, torch.float32) for name, t in ints.items()}
    x = torch.randint(-2, 3, (n_rows, d), generator=gen).to(DEVICE, torch.float32)
    values, indices = kernels.topk_encode(x, **ints, k=k, triton=True)
    ref_values, ref_indices = kernels.topk_encode_reference(x, **ints, k=k)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


# bias_shift puts the k-th largest pre-activation near 0, so many kept entries are ReLU zeros
@pytest.mark.parametrize("n_seeds,shared_x,k,bias_shift", [(1, True, 7, -2.2), (3, True, 32, -1.3), (3, False, 7, -2.2)])
def test_topk_encode_gradients_match_reference(n_seeds, shared_x, k, bias_shift):
    n_rows, d, m = 45, 37, 300
    p = make_sae(n_seeds, d, m, bias_shift=bias_shift)
    x = make_x(n_seeds, n_rows, d, shared=shared_x)
    upstream = torch.randn(n_seeds, n_rows, k, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = []
    for use_kernel in (True, False):
        q = with_grad(p)
        values, indices = kernels.topk_encode(x, q["W_enc"], q["b_enc"], q["b_dec"], k, triton=use_kernel)
        (values * upstream).sum().backward()
        grads.append((values.detach(), indices, q["W_enc"].grad, q["b_enc"].grad, q["b_dec"].grad))
    (values, indices, *kernel_grads), (_, ref_indices, *ref_grads) = grads
    assert (values == 0).any() and (values > 0).any()
    assert torch.equal(indices, ref_indices)
    for got, want in zip(kernel_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=GRAD_ATOL, rtol=GRAD_RTOL)


@pytest.mark.parametrize("n_seeds,k,d", [(1, 7, 37), (3, 32, 130)])
def test_sparse_decode_and_gradients_match_reference(n_seeds, k, d):
    n_rows, m = 45, 300
    p = make_sae(n_seeds, d, m)
    gen = torch.Generator().manual_seed(7)
    # repeated latents across rows exercise the segmented reduction; values include exact zeros
    indices = torch.stack([torch.randperm(m, generator=gen)[:k] for _ in range(n_seeds * n_rows)])
    indices = indices.view(n_seeds, n_rows, k).to(DEVICE)
    values = torch.relu(torch.randn(n_seeds, n_rows, k, generator=gen)).to(DEVICE)
    upstream = torch.randn(n_seeds, n_rows, d, generator=gen).to(DEVICE)
    results = []
    for use_kernel in (True, False):
        q = with_grad({"values": values, "W_dec": p["W_dec"], "b_dec": p["b_dec"]})
        x_hat = kernels.sparse_decode(q["values"], indices, q["W_dec"], q["b_dec"], triton=use_kernel)
        (x_hat * upstream).sum().backward()
        results.append((x_hat.detach(), q["values"].grad, q["W_dec"].grad, q["b_dec"].grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=GRAD_ATOL, rtol=GRAD_RTOL)


def run_encode_decode_backward(p: dict, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    q = with_grad(p)
    values, indices = kernels.topk_encode(x, q["W_enc"], q["b_enc"], q["b_dec"], k, triton=True)
    x_hat = kernels.sparse_decode(values, indices, q["W_dec"], q["b_dec"], triton=True)
    ((x_hat - x) ** 2).sum().backward()
    return [values, indices, x_hat] + [q[name].grad for name in ("W_enc", "b_enc", "b_dec", "W_dec")]


def test_kernels_are_bitwise_deterministic():
    p = make_sae(3, 37, 300, bias_shift=-0.5)
    x = make_x(3, 45, 37, shared=True)
    first, second = run_encode_decode_backward(p, x, 7), run_encode_decode_backward(p, x, 7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    w_runs, g_runs = [], []
    for _ in range(2):
        w, g = p["W_dec"].clone() * 3, p["W_enc"].transpose(1, 2).contiguous()
        kernels.remove_parallel_grad_(w, g, triton=True)
        kernels.normalize_rows_(w, triton=True)
        w_runs.append(w), g_runs.append(g)
    assert torch.equal(*w_runs) and torch.equal(*g_runs)


def test_encoder_saves_no_dense_tensor_for_backward():
    n_seeds, n_rows, d, m, k = 2, 45, 37, 300, 7
    p = with_grad(make_sae(n_seeds, d, m))
    saved_sizes = []

    def record(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        kernels.topk_encode(make_x(n_seeds, n_rows, d, shared=True), p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)
    assert saved_sizes and max(saved_sizes) < n_seeds * n_rows * m
    assert max(saved_sizes) == p["W_enc"].numel()  # the largest thing saved is the parameter itself


@pytest.mark.parametrize("n_seeds,m,d", [(1, 300, 37), (3, 64, 130)])
def test_decoder_norm_matches_reference(n_seeds, m, d):
    gen = torch.Generator().manual_seed(11)
    W_dec = (3 * torch.randn(n_seeds, m, d, generator=gen)).to(DEVICE)
    W_dec[0, 0] = 0  # a zero row must stay zero, not become NaN
    grad = torch.randn(n_seeds, m, d, generator=gen).to(DEVICE)
    w_kernel, g_kernel, w_ref, g_ref = W_dec.clone(), grad.clone(), W_dec.clone(), grad.clone()

    kernels.remove_parallel_grad_(w_kernel, g_kernel, triton=True)
    kernels.remove_parallel_grad_(w_ref, g_ref, triton=False)
    torch.testing.assert_close(g_kernel, g_ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(w_kernel, W_dec), "the projection must not touch W_dec"
    unit = torch.nn.functional.normalize(W_dec, dim=-1)
    assert (g_kernel * unit).sum(-1).abs().max() < 1e-5, "projected gradient not orthogonal to its row"

    kernels.normalize_rows_(w_kernel, triton=True)
    kernels.normalize_rows_(w_ref, triton=False)
    torch.testing.assert_close(w_kernel, w_ref, atol=ATOL, rtol=RTOL)
    norms = w_kernel.norm(dim=-1)
    assert torch.equal(norms[0, 0], torch.tensor(0.0, device=DEVICE))
    torch.testing.assert_close(norms.flatten()[1:], torch.ones_like(norms.flatten()[1:]), atol=1e-6, rtol=0)


def train_topk_sae(p: dict, x: torch.Tensor, k: int, steps: int, *, use_kernel: bool) -> dict:
    """A few Adam steps of a TopK SAE: encode, decode, MSE, project decoder grads, step, renormalise."""
    q = with_grad(p)
    optimiser = torch.optim.Adam(q.values(), lr=1e-3)
    for _ in range(steps):
        values, indices = kernels.topk_encode(x, q["W_enc"], q["b_enc"], q["b_dec"], k, triton=use_kernel)
        x_hat = kernels.sparse_decode(values, indices, q["W_dec"], q["b_dec"], triton=use_kernel)
        loss = ((x_hat - x) ** 2).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        kernels.remove_parallel_grad_(q["W_dec"], q["W_dec"].grad, triton=use_kernel)
        optimiser.step()
        kernels.normalize_rows_(q["W_dec"], triton=use_kernel)
    return {name: t.detach() for name, t in q.items()}


def test_topk_sae_training_matches_reference():
    n_seeds, n_rows, d, m, k = 2, 48, 24, 96, 8
    p = make_sae(n_seeds, d, m)
    x = make_x(n_seeds, n_rows, d, shared=True)
    with_kernels = train_topk_sae(p, x, k, steps=5, use_kernel=True)
    with_reference = train_topk_sae(p, x, k, steps=5, use_kernel=False)
    for name in p:
        assert not torch.equal(with_kernels[name], p[name]), f"{name} did not train"
        torch.testing.assert_close(with_kernels[name], with_reference[name], atol=1e-4, rtol=1e-4)


def bad_input_cases() -> list:
    f32 = dict(device=DEVICE, dtype=torch.float32)
    x, W_enc, b_enc, b_dec = torch.ones(4, 8, **f32), torch.ones(1, 8, 32, **f32), torch.ones(1, 32, **f32), torch.ones(1, 8, **f32)
    values, indices, W_dec = torch.ones(1, 4, 2, **f32), torch.zeros(1, 4, 2, dtype=torch.int64, device=DEVICE), torch.ones(1, 32, 8, **f32)
    return [
        ("W_enc 2-D", lambda: topk_encode_forward(x, W_enc[0], b_enc, b_dec, 2), "W_enc must be"),
        ("x wrong d", lambda: topk_encode_forward(x[:, :5], W_enc, b_enc, b_dec, 2), "x must be"),
        ("x wrong S", lambda: topk_encode_forward(x.expand(2, 4, 8), W_enc, b_enc, b_dec, 2), "x must be"),
        ("b_enc shape", lambda: topk_encode_forward(x, W_enc, b_enc[:, :5], b_dec, 2), "b_enc must have shape"),
        ("x float64", lambda: topk_encode_forward(x.double(), W_enc, b_enc, b_dec, 2), "dtype"),
        ("float16 weights", lambda: topk_encode_forward(x.half(), W_enc.half(), b_enc.half(), b_dec.half(), 2), "dtype"),
        ("k = 0", lambda: topk_encode_forward(x, W_enc, b_enc, b_dec, 0), "k must satisfy"),
        ("k > m", lambda: topk_encode_forward(x, W_enc, b_enc, b_dec, 33), "k must satisfy"),
        ("2**31 rows x d", lambda: topk_encode_forward(x[:1].expand(2**28, 8), W_enc, b_enc, b_dec, 2), "fewer than 2"),
        ("k > MAX_K", lambda: topk_encode_forward(x, torch.ones(1, 8, 2 * MAX_K, **f32), torch.ones(1, 2 * MAX_K, **f32), b_dec, MAX_K + 1), "k must satisfy"),
        ("indices int32", lambda: sparse_decode_forward(values, indices.int(), W_dec, b_dec), "int64"),
        ("indices shape", lambda: sparse_decode_forward(values, indices[:, :3], W_dec, b_dec), "indices must have shape"),
        ("values wrong S", lambda: sparse_decode_forward(values.expand(2, 4, 2), indices, W_dec, b_dec), "values must be"),
        ("decoder b_dec shape", lambda: sparse_decode_forward(values, indices, W_dec, b_dec[:, :5]), "b_dec must have shape"),
        ("grad shape", lambda: remove_parallel_grad_triton_(W_dec, W_dec[:, :5]), "grad must have shape"),
        ("grad not contiguous", lambda: remove_parallel_grad_triton_(W_dec, torch.ones(1, 8, 32, **f32).transpose(1, 2)), "contiguous"),
        ("norm 2-D", lambda: normalize_rows_triton_(W_dec[0]), "W_dec must be"),
        ("norm too wide", lambda: normalize_rows_triton_(torch.ones(1, 1, MAX_D + 1, **f32)), "wider"),
    ]


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda case: case[0])
def test_launchers_reject_bad_inputs(case):
    _, launch, message = case
    with pytest.raises(ValueError, match=message):
        launch()


@needs_cuda
def test_launchers_reject_mixed_devices():
    x = torch.ones(4, 8)  # on the CPU
    W_enc, b_enc, b_dec = torch.ones(1, 8, 32, device="cuda"), torch.ones(1, 32, device="cuda"), torch.ones(1, 8, device="cuda")
    with pytest.raises(ValueError, match="is on"):
        topk_encode_forward(x, W_enc, b_enc, b_dec, 2)


@needs_cuda
@pytest.mark.parametrize("n_seeds,shared_x,k", [(1, True, 32), (3, False, 7)])
def test_bfloat16_matches_reference(n_seeds, shared_x, k):
    """bfloat16 inputs, float32 accumulation: values and gradients within bfloat16 rounding."""
    n_rows, d, m = 45, 37, 300
    p = make_sae(n_seeds, d, m, dtype=torch.bfloat16, bias_shift=-1.0)
    x = make_x(n_seeds, n_rows, d, shared=shared_x, dtype=torch.bfloat16)
    runs = []
    for use_kernel in (True, False):
        q = with_grad(p)
        values, indices = kernels.topk_encode(x, q["W_enc"], q["b_enc"], q["b_dec"], k, triton=use_kernel)
        x_hat = kernels.sparse_decode(values, indices, q["W_dec"], q["b_dec"], triton=use_kernel)
        ((x_hat.float() - x.float()) ** 2).sum().backward()
        runs.append((values, indices, x_hat, q))
    (values, indices, x_hat, q), (_, ref_indices, ref_x_hat, ref_q) = runs
    assert_topk_matches(values, indices, x, p, k, atol=2e-2, rtol=2e-2)
    if torch.equal(indices, ref_indices):  # gradients are comparable only for the same selection
        torch.testing.assert_close(x_hat, ref_x_hat, atol=2e-2, rtol=2e-2)
        for name in q:
            torch.testing.assert_close(q[name].grad, ref_q[name].grad, atol=5e-2, rtol=5e-2)

    W_dec, grad = 2 * p["W_dec"], torch.randn_like(p["W_dec"])
    w_kernel, g_kernel, w_ref, g_ref = W_dec.clone(), grad.clone(), W_dec.clone(), grad.clone()
    kernels.remove_parallel_grad_(w_kernel, g_kernel, triton=True)
    kernels.remove_parallel_grad_(w_ref, g_ref, triton=False)
    kernels.normalize_rows_(w_kernel, triton=True)
    kernels.normalize_rows_(w_ref, triton=False)
    torch.testing.assert_close(g_kernel, g_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(w_kernel, w_ref, atol=1e-2, rtol=1e-2)


@needs_cuda
def test_encoder_forward_never_allocates_the_dense_preactivation():
    n_seeds, n_rows, d, m, k = 1, 4096, 128, 16384, 32
    p = make_sae(n_seeds, d, m)
    x = make_x(n_seeds, n_rows, d, shared=True)
    kernels.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kernels.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < n_seeds * n_rows * m * 4 // 4


def compile_kernels_for_hopper() -> None:
    """Compile every kernel, with its launcher's tile sizes, to sm_90 machine code (Triton ships ptxas,
    so no GPU is needed). The interpreter never lowers a kernel, so this is what catches code that
    interprets but does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import decoder_norm, sparse_decoder, topk_encoder

    block_b, block_m, block_d = topk_encoder._candidate_tiles(32)
    gather_tiles = dict(BLOCK_B=sparse_decoder.GATHER_BLOCK_B, BLOCK_D=sparse_decoder.GATHER_BLOCK_D)
    sizes = dict(n_rows="i32", d="i32")
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        f = f"*{dtype}"
        specs = [
            (topk_encoder._topk_candidates_kernel,
             dict(x_ptr=f, w_enc_ptr=f, b_enc_ptr=f, b_dec_ptr=f, candidates_ptr="*i64", **sizes, m="i32",
                  latents_per_split="i32", n_splits="i32", x_seed_stride="i32"),
             dict(BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_D=block_d, K_PAD=32, DOT_PRECISION=precision)),
            (topk_encoder._topk_merge_kernel,
             dict(candidates_ptr="*i64", values_ptr=f, indices_ptr="*i64", n_rows="i32", k="i32", n_splits="i32"),
             dict(BLOCK_B=32, K_PAD=32)),
            (sparse_decoder._segment_sum_kernel,
             dict(rows_ptr=f, coef_ptr=f, entry_order_ptr="*i64", sorted_latents_ptr="*i64", segment_start_ptr="*i64",
                  out_ptr=f, coef_sum_ptr="*fp32", n_rows="i32", k="i32", d="i32", m="i32",
                  out_stride_seed="i32", out_stride_latent="i32", out_stride_dim="i32"),
             dict(BLOCK_L=sparse_decoder.BLOCK_LATENTS, BLOCK_E=sparse_decoder.BLOCK_ENTRIES, BLOCK_D=64,
                  STORE_COEF_SUM=True, DOT_PRECISION=precision)),
            (sparse_decoder._sparse_decode_kernel,
             dict(values_ptr=f, indices_ptr="*i64", w_dec_ptr=f, b_dec_ptr=f, out_ptr=f, n_rows="i32", k="i32", d="i32", m="i32"),
             gather_tiles),
            (sparse_decoder._gathered_dot_kernel,
             dict(grad_out_ptr=f, indices_ptr="*i64", w_dec_ptr=f, grad_values_ptr=f, n_rows="i32", k="i32", d="i32", m="i32"),
             gather_tiles),
            (decoder_norm._remove_parallel_grad_kernel, dict(w_ptr=f, grad_ptr=f, **sizes), dict(BLOCK_R=4, BLOCK_D=1024)),
            (decoder_norm._normalize_rows_kernel, dict(w_ptr=f, **sizes), dict(BLOCK_R=4, BLOCK_D=1024)),
        ]
        for kernel, signature, constexprs in specs:
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper():
    # a fresh process: this one imported the kernels under the interpreter, which cannot lower them
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = "import sys; sys.path.insert(0, 'tests'); import test_kernels; test_kernels.compile_kernels_for_hopper()"
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_kernels_import_and_fall_back_to_torch_without_triton():
    """A torch-only install (no Triton): the package imports, use_triton is False everywhere, and a TopK SAE
    trains through the references."""
    script = """
import builtins
real_import = builtins.__import__
def without_triton(name, *args, **kwargs):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("No module named 'triton'")
    return real_import(name, *args, **kwargs)
builtins.__import__ = without_triton
import torch, kernels, sae_core
assert not kernels.TRITON_AVAILABLE and not kernels.use_triton("cpu") and not kernels.use_triton("cuda")
sae = sae_core.build_sae(sae_core.SAEConfig(d_in=8, width=16, k=2), [0])
trainer = sae_core.SAETrainer(sae, lr=1e-3, steps=3, warmup_steps=1, decay_steps=1)
for _ in range(3):
    trainer.step(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
print("trained without triton")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, env=env)
    assert result.returncode == 0 and "trained without triton" in result.stdout, result.stderr
