"""GPU benchmarks: the kernels against the torch code a user would otherwise write.

Run:  pytest -m bench -s tests/test_bench_kernels.py
The table goes to $HUSAI_BENCH_OUT (default runs/bench/kernels.md) and to stdout. These are
measurements, not timed tests: nothing here asserts a speed. See BENCHMARKS.md for what each row means.
"""

import os
import platform
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.testing

import kernels

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16]
# (name, S, B, d, m, k)
GROKKING = ("grokking", 1, 4096, 128, 2048, 32)
GROKKING_ENSEMBLE = ("grokking", 5, 4096, 128, 2048, 32)
LLM = ("llm", 1, 8192, 768, 24576, 32)
SHAPES = [GROKKING, GROKKING_ENSEMBLE, LLM]
QUANTILES = [0.5, 0.2, 0.8]


# ---- the torch path a user would otherwise write --------------------------------------------------

def torch_encode(x, W_enc, b_enc, b_dec, k):
    return torch.topk(torch.relu((x - b_dec[:, None, :]) @ W_enc + b_enc[:, None, :]), k, dim=-1)


def torch_decode(values, indices, W_dec, b_dec):
    n_seeds, n_rows, k = values.shape
    m, d = W_dec.shape[1:]
    # one bag per (seed, row): offset each seed's indices into the flattened [S * m, d] table
    flat_indices = (indices + m * torch.arange(n_seeds, device=indices.device)[:, None, None]).view(-1, k)
    x_hat = F.embedding_bag(flat_indices, W_dec.reshape(-1, d), per_sample_weights=values.reshape(-1, k), mode="sum")
    return x_hat.view(n_seeds, n_rows, d) + b_dec[:, None, :]


@torch.no_grad()
def torch_remove_parallel_grad_(W_dec, grad):
    unit = F.normalize(W_dec, dim=-1)
    grad -= torch.einsum("smd,smd->sm", grad, unit)[..., None] * unit


@torch.no_grad()
def torch_normalize_rows_(W_dec):
    W_dec.copy_(F.normalize(W_dec, dim=-1))


KERNEL_OPS = (kernels.topk_encode, kernels.sparse_decode, kernels.remove_parallel_grad_, kernels.normalize_rows_)
TORCH_OPS = (torch_encode, torch_decode, torch_remove_parallel_grad_, torch_normalize_rows_)


# ---- set-up and measurement ----------------------------------------------------------------------

def make_sae(n_seeds: int, d: int, m: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    W_dec = F.normalize(torch.randn(n_seeds, m, d, device=DEVICE, generator=gen), dim=-1)
    params = {
        "W_enc": W_dec.transpose(1, 2).contiguous(),
        "b_enc": torch.zeros(n_seeds, m, device=DEVICE),
        "b_dec": torch.zeros(n_seeds, d, device=DEVICE),
        "W_dec": W_dec,
    }
    return {name: p.to(dtype).requires_grad_() for name, p in params.items()}


def make_x(n_rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n_rows, d, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1)).to(dtype)


def training_step(params: dict, x: torch.Tensor, k: int, ops: tuple) -> Callable[[], None]:
    """One TopK SAE step: encode, decode, MSE, backward, project decoder grads, Adam, renormalise."""
    encode, decode, remove_parallel_grad_, normalize_rows_ = ops
    optimiser = torch.optim.Adam(params.values(), lr=1e-4)
    W_enc, b_enc, b_dec, W_dec = (params[name] for name in ("W_enc", "b_enc", "b_dec", "W_dec"))

    def step():
        values, indices = encode(x, W_enc, b_enc, b_dec, k)
        loss = (decode(values, indices, W_dec, b_dec) - x).float().pow(2).sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_grad_(W_dec, W_dec.grad)
        optimiser.step()
        normalize_rows_(W_dec)

    return step


def measure(fn: Callable[[], object]) -> dict:
    """Median and 20-80% range of fn's time (ms), and its peak memory above what was allocated before."""
    fn()
    torch.cuda.synchronize()
    median, low, high = triton.testing.do_bench(fn, quantiles=QUANTILES)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {"ms": median, "low": low, "high": high, "peak": torch.cuda.max_memory_allocated() - allocated_before}


def timing(result: dict) -> str:
    return f"{result['ms']:.3f} [{result['low']:.3f}, {result['high']:.3f}]"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def shape_label(shape: tuple, dtype: torch.dtype) -> str:
    name, n_seeds, n_rows, d, m, k = shape
    return f"{name} S={n_seeds} B={n_rows} d={d} m={m} k={k} {str(dtype).removeprefix('torch.')}"


COLUMNS = ["measurement", "shape", "kernels ms, median [p20, p80]", "torch ms, median [p20, p80]",
           "speedup", "throughput (kernels / torch)", "peak memory (kernels / torch)", "note"]


@pytest.fixture(scope="module")
def report():
    rows: list[list[str]] = []
    yield rows
    header = [
        "# Kernel benchmarks",
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"triton {triton.__version__}; python {platform.python_version()}; "
        f"float32 matmul precision: {torch.get_float32_matmul_precision()}",
        "Command: pytest -m bench -s tests/test_bench_kernels.py. Times from triton.testing.do_bench; "
        "peak memory = torch.cuda.max_memory_allocated() during one call minus the memory allocated before it.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    table = "\n".join(header + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"
    out = Path(os.environ.get("HUSAI_BENCH_OUT", "runs/bench/kernels.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print("\n" + table + f"\n(written to {out})")


def rates(amount: float, fused: dict, torch_: dict, per_unit: float, unit: str) -> str:
    """'kernels / torch' rates of `amount` per second, in units of per_unit (1e12 FLOP -> TFLOP/s)."""
    return f"{amount / fused['ms'] * 1e3 / per_unit:.1f} / {amount / torch_['ms'] * 1e3 / per_unit:.1f} {unit}"


def each_shape_and_dtype(test):
    by_shape = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-S{s[1]}")
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(by_shape(test))


def compare_row(what: str, label: str, fused: dict, torch_: dict, throughput: str = "", note: str = "") -> list[str]:
    return [what, label, timing(fused), timing(torch_), f"{torch_['ms'] / fused['ms']:.2f}x", throughput,
            f"{mib(fused['peak'])} / {mib(torch_['peak'])}", note]


# ---- benchmarks ------------------------------------------------------------------------------------

@each_shape_and_dtype
def test_bench_encoder_forward(report, shape, dtype):
    _, n_seeds, n_rows, d, m, k = shape
    p = {name: t.detach() for name, t in make_sae(n_seeds, d, m, dtype).items()}
    args = (make_x(n_rows, d, dtype), p["W_enc"], p["b_enc"], p["b_dec"], k)
    fused, torch_ = measure(lambda: kernels.topk_encode(*args, triton=True)), measure(lambda: torch_encode(*args))
    throughput = rates(2 * n_seeds * n_rows * d * m, fused, torch_, 1e12, "TFLOP/s")
    report.append(compare_row("encoder forward", shape_label(shape, dtype), fused, torch_, throughput))


@each_shape_and_dtype
def test_bench_decoder_forward(report, shape, dtype):
    _, n_seeds, n_rows, d, m, k = shape
    p = {name: t.detach() for name, t in make_sae(n_seeds, d, m, dtype).items()}
    values, indices = kernels.topk_encode(make_x(n_rows, d, dtype), p["W_enc"], p["b_enc"], p["b_dec"], k, triton=True)
    args = (values, indices, p["W_dec"], p["b_dec"])
    fused, torch_ = measure(lambda: kernels.sparse_decode(*args, triton=True)), measure(lambda: torch_decode(*args))
    gathered_bytes = n_seeds * n_rows * k * d * p["W_dec"].element_size()
    throughput = rates(gathered_bytes, fused, torch_, 1e9, "GB/s of gathered rows")
    report.append(compare_row("decoder forward", shape_label(shape, dtype), fused, torch_, throughput))


@each_shape_and_dtype
def test_bench_decoder_normalisation(report, shape, dtype):
    _, n_seeds, _, d, m, _ = shape
    W_dec = make_sae(n_seeds, d, m, dtype)["W_dec"].detach()
    grad = torch.randn_like(W_dec)
    copy_gbs = 2 * W_dec.nbytes / measure(lambda: W_dec.clone())["ms"] / 1e6
    label = shape_label(shape, dtype)
    # the projection reads W and G and writes G; the renormalisation reads and writes W
    for what, bytes_moved, fused_fn, torch_fn in [
        ("decoder grad projection", 3 * W_dec.nbytes,
         lambda: kernels.remove_parallel_grad_(W_dec, grad, triton=True), lambda: torch_remove_parallel_grad_(W_dec, grad)),
        ("decoder renormalisation", 2 * W_dec.nbytes,
         lambda: kernels.normalize_rows_(W_dec, triton=True), lambda: torch_normalize_rows_(W_dec)),
    ]:
        fused, torch_ = measure(fused_fn), measure(torch_fn)
        note = f"kernel at {100 * bytes_moved / fused['ms'] / 1e6 / copy_gbs:.0f}% of clone bandwidth ({copy_gbs:.0f} GB/s)"
        report.append(compare_row(what, label, fused, torch_, rates(bytes_moved, fused, torch_, 1e9, "GB/s"), note))


@each_shape_and_dtype
def test_bench_training_step(report, shape, dtype):
    _, n_seeds, n_rows, d, m, k = shape
    x = make_x(n_rows, d, dtype)
    fused = measure(training_step(make_sae(n_seeds, d, m, dtype), x, k, KERNEL_OPS))
    torch_ = measure(training_step(make_sae(n_seeds, d, m, dtype), x, k, TORCH_OPS))
    dense_bytes = n_seeds * n_rows * m * 4
    note = f"memory saved = {(torch_['peak'] - fused['peak']) / dense_bytes:.2f} x S*B*m*4 ({mib(dense_bytes)})"
    report.append(compare_row("training step (fwd, bwd, Adam, norm)", shape_label(shape, dtype), fused, torch_, note=note))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bench_ensemble_step(report, dtype):
    """One 5-seed ensemble step against five separate single-seed steps (torch path, and kernels)."""
    _, n_seeds, n_rows, d, m, k = GROKKING_ENSEMBLE
    x = make_x(n_rows, d, dtype)
    ensemble = measure(training_step(make_sae(n_seeds, d, m, dtype), x, k, KERNEL_OPS))
    for ops, path in [(TORCH_OPS, "torch"), (KERNEL_OPS, "kernels")]:
        steps = [training_step(make_sae(1, d, m, dtype, seed=seed), x, k, ops) for seed in range(n_seeds)]
        separate = measure(lambda: [step() for step in steps])
        report.append(compare_row(f"{n_seeds}-seed ensemble step vs {n_seeds} single-seed {path} steps",
                                  shape_label(GROKKING_ENSEMBLE, dtype), ensemble, separate))
