"""Code the three HUSAI stages share.

Part 1, plumbing: one-line errors for the command lines, device choice, seeding, and atomic
safetensors files that carry a format name, a version and JSON metadata.
Part 2, measurement: the orthonormal Fourier basis on Z_p, Fourier purity, and FVU. Each metric is
one function here, used by every stage.
Part 3, the sparse autoencoders: architectures, training tricks and the batched-seed trainer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# --------------------------------------------------------------------------------------------------
# Part 1: plumbing


class HusaiError(Exception):
    """A problem with the user's input or files. Command lines print it as one line and exit 2."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage's main(); a HusaiError becomes one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except HusaiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: files already written are complete; nothing partial was left", file=sys.stderr)
        sys.exit(130)


class CliParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and its own errors reduced to one line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def pick_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HusaiError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_output(path: str | Path, force: bool, flag: str = "--out") -> Path:
    """Check that `path` may be written: its folder is writable, and it does not exist unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise HusaiError(f"{path} already exists; pass --force to overwrite it, or choose another {flag}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".husai-probe-"):
            pass
    except OSError as e:
        raise HusaiError(f"{flag} {path}: cannot write to {path.parent} ({e.strerror}); choose another {flag}")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path` in one step, so a
    reader (or an interrupted run) never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, version: int,
                 metadata: dict) -> None:
    """Write a safetensors file atomically. Metadata values are stored as JSON strings, next to
    `format` and `version`, so that readers can check what they are given."""
    header = {"format": fmt, "version": str(version)}
    header.update({key: json.dumps(value, sort_keys=True) for key, value in metadata.items()})
    tensors = {name: t.detach().contiguous().cpu().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_tensors(path: str | Path, fmt: str, version: int, required: tuple[str, ...] = (),
                 hint: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by save_tensors and check its format, version and required tensors.
    Every problem is a HusaiError that names the file. Returns (tensors, metadata decoded from JSON)."""
    path = Path(path)
    if not path.is_file():
        raise HusaiError(f"{path}: no such file" + (f"; create it with `{hint}`" if hint else ""))
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            raw = json.loads(f.read(header_len)).get("__metadata__", {})
    except (SafetensorError, OSError, ValueError) as e:
        raise HusaiError(f"{path}: not a readable safetensors file (truncated or corrupt: {e})")
    if raw.get("format") != fmt:
        raise HusaiError(f"{path}: format is {raw.get('format')!r}, expected {fmt!r}")
    if raw.get("version") != str(version):
        raise HusaiError(f"{path}: {fmt} version {raw.get('version')!r}, this code reads version {version}")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise HusaiError(f"{path}: missing tensor(s) {', '.join(missing)}")
    metadata = {key: json.loads(value) for key, value in raw.items() if key not in ("format", "version")}
    return tensors, metadata


# --------------------------------------------------------------------------------------------------
# Part 2: measurement


def fourier_basis(p: int) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The orthonormal Fourier basis of functions on Z_p, as a [p, p] matrix F with F F^T = I.

    Row 0 is the constant 1/sqrt(p); then for k = 1..(p-1)//2 the rows cos(2 pi k x / p) and
    sin(2 pi k x / p), each scaled by sqrt(2/p); for even p a last row cos(pi x)/sqrt(p). Rows are
    labelled (kind, frequency), e.g. ("cos", 3), so no caller indexes components by position."""
    x = torch.arange(p, dtype=torch.float64)
    rows, labels = [torch.full((p,), 1.0 / p**0.5, dtype=torch.float64)], [("const", 0)]
    for k in range(1, (p - 1) // 2 + 1):
        angle = 2 * torch.pi * k * x / p
        rows += [torch.cos(angle) * (2 / p) ** 0.5, torch.sin(angle) * (2 / p) ** 0.5]
        labels += [("cos", k), ("sin", k)]
    if p % 2 == 0:
        rows.append(torch.cos(torch.pi * x) / p**0.5)
        labels.append(("cos", p // 2))
    return torch.stack(rows).float(), labels


def frequency_of_rows(labels: list[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([k for _, k in labels])


def embedding_frequency_shares(W: torch.Tensor) -> torch.Tensor:
    """Share of a [p, d] embedding's non-constant energy at each frequency k = 1..n_freq.

    Project the token rows onto the Fourier basis (F W) and sum the squared norm of the cos and sin
    rows of each frequency. A planted cos(2 pi k x / p) embedding has share 1 at k."""
    p = W.shape[0]
    F, labels = fourier_basis(p)
    energy = ((F.to(W) @ W) ** 2).sum(dim=1)
    freq = frequency_of_rows(labels)
    per_freq = torch.zeros(int(freq.max()) + 1, dtype=energy.dtype).index_add_(0, freq, energy.cpu())[1:]
    return per_freq / per_freq.sum().clamp_min(1e-30)


def key_frequencies(shares: torch.Tensor, min_share: float) -> list[int]:
    """The rule for key frequencies: every frequency holding at least `min_share` of the embedding's
    non-constant Fourier energy, largest first."""
    order = torch.argsort(shares, descending=True, stable=True)
    return [int(i) + 1 for i in order if shares[i] >= min_share]


def fourier_purity(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier purity of units (neurons or SAE latents) from their activations on every input (a, b).

    acts [p, p, n]: unit n's activation on input (a, b). Centre each unit, take the 2-D Fourier
    transform A_hat = F A F^T, and measure the fraction of the energy in the 3x3 block
    {const, cos_k, sin_k} x {const, cos_k, sin_k} of the best frequency k. Returns (purity [n], best
    frequency [n]); a unit that never varies has purity 0 and best frequency 0."""
    p = acts.shape[0]
    F, labels = fourier_basis(p)
    F = F.to(acts.device, torch.float64)
    centred = acts.double() - acts.double().mean(dim=(0, 1), keepdim=True)
    energy = torch.einsum("ia,abn,jb->ijn", F, centred, F) ** 2
    freq = frequency_of_rows(labels).to(acts.device)
    onehot = torch.nn.functional.one_hot(freq).double()                     # [p, n_freq + 1]
    by_freq = torch.einsum("ik,ijn,jl->kln", onehot, energy, onehot)         # energy per (freq_a, freq_b)
    diag = torch.diagonal(by_freq, dim1=0, dim2=1).T                         # [n_freq + 1, n]
    block = diag[1:] + by_freq[1:, 0] + by_freq[0, 1:]                       # {0,k}^2 minus (0,0)
    total = energy.sum(dim=(0, 1))
    best_energy, best = block.max(dim=0)
    alive = total > 1e-12 * total.max().clamp_min(1e-30)
    purity = torch.where(alive, best_energy / total.clamp_min(1e-30), torch.zeros_like(total))
    return purity.float(), torch.where(alive, best + 1, torch.zeros_like(best))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, pooled over the whole set with a centred denominator:
    sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2. Works on [N, d] or batched [..., N, d]."""
    residual = (x - x_hat).double().pow(2).sum(dim=(-2, -1))
    variance = (x - x.mean(dim=-2, keepdim=True)).double().pow(2).sum(dim=(-2, -1))
    return (residual / variance).float()
