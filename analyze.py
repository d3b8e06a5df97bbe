"""Stage 3: do SAEs trained with different seeds learn the same latents, and are those the model's
Fourier features?

    python analyze.py                                   # every runs/sae/*/seed<N>.safetensors
    python analyze.py runs/sae/topk-w512-k32 'runs/sae/relu-*'   # chosen files, folders or globs
    python analyze.py --out runs/analysis --force       # regenerate an existing report

Reads the SAEs written by train_sae.py and the transformer (or activation file) that each one names in
its provenance, groups them by configuration, and writes to --out:
    report.md       readable on its own: what each number is, every choice that moves the numbers, each
                    score beside its baselines
    report.json     every number in report.md and more (per-pair matrices, curves, per-seed values)
    figures/*.png   similarity matrices, shared fraction vs tau, purity, training dynamics, comparisons
                    across configurations, the transformer's grokking curve and Fourier spectrum
The same files give the same report byte for byte: nothing reads the clock, every random draw has a
recorded fixed seed, and files, groups and seeds are visited in sorted order (the report is the same with
any number of threads; on a CPU that other jobs keep busy, OMP_NUM_THREADS=1 is the faster setting).

Definitions are those in README.md (stage 3) and in report.md itself. Every metric is one function here (or in sae_core:
Fourier basis, purity, FVU, SAE inference), used by the trained SAEs and by their baselines alike.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

import matplotlib
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from sae_core import (ARCHITECTURES, KEY_FREQUENCY_MIN_SHARE, PURE_NEURON_THRESHOLD, SAE_VERSION, SNAPSHOT_FORMAT,
                      CliParser, HusaiError, atomic_write, embedding_spectrum, file_sha256, fourier_purity, load_sae,
                      load_tensors, pick_device, prepare_output, reconstruction_metrics, run_cli, sae_latents,
                      snapshot_file_name, sum_frequency_directions)
from train_transformer import activations_from, plot_fourier_spectrum, plot_training_curves

matplotlib.use("Agg")   # figures go to files; no display is needed or used
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# --------------------------------------------------------------------------------------------------
# Settings. Each one changes the numbers, so report.md and report.json list them all.

SHARED_TAU = 0.7                 # a latent is "shared" above this matched cosine (Paulo & Belrose 2025)
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # the shared-fraction curve
PURE_LATENT = PURE_NEURON_THRESHOLD   # a latent is Fourier-pure at purity >= 0.85: the neuron rule of stage 1
SUBSPACE_VARIANCE = 0.99         # the subspace baseline draws from the top principal directions holding this
HUNGARIAN_MAX_LATENTS = 16_384   # one-to-one matching needs the whole [m, m] matrix: 2 GiB in float64 here,
                                 # 4.6 GB peak and ~10 s per matching of a planted pair, measured on this CPU
CHUNK_ELEMENTS = 1 << 24         # max-cosine works on [c, m] blocks of at most this many cosines (64 MiB)
PURITY_CHUNK = 256               # latents per fourier_purity call (its float64 temporaries are [p, p, chunk])
BASELINE_DICTIONARIES = 2        # dictionaries per baseline, so one pair: random baselines barely vary at a given
                                 # shape, and each pair costs two one-to-one matchings (most of the run time)
BOOTSTRAP_RESAMPLES = 2000       # resamples of the seeds for every confidence interval
CI_LEVEL = 0.95
RECOMMENDED_SEEDS = 5
FIGURE_LATENTS = 128             # latents shown in a similarity heat map
# Fixed generator seeds; replicate i of a baseline uses seed + 2i (decoder) and seed + 2i + 1 (encoder).
GENERATOR_SEEDS = {"bootstrap": 0, "isotropic": 1000, "covariance": 2000, "subspace": 3000, "random_latents": 4000}

BASELINES = {
    "isotropic": "unit vectors from N(0, I_d): pure geometry, depends only on d and m",
    "covariance": "vectors from N(0, Sigma_x), the activations' own covariance",
    "subspace": f"uniform directions in the top-r principal subspace holding {SUBSPACE_VARIANCE:.0%} of the "
                "variance (the honest baseline; normalised scores use it)",
    "init": "the same SAEs at step 0 (untrained initialisation, from the snapshot files)",
}


class Variant(NamedTuple):
    absolute: bool      # |cos| instead of the signed cosine
    alive_only: bool    # dead latents left out
    hungarian: bool     # one-to-one matching too (the |cos| check is max-based only: matching costs most)


VARIANTS = {"signed, all latents": Variant(False, False, True), "signed, alive latents": Variant(False, True, True),
            "|cos|, all latents": Variant(True, False, False)}
PRIMARY = "signed, all latents"
HEADLINES = {"decoder.pwmcc": "PWMCC", "decoder.hungarian": "Hungarian mean cosine",
             "shared_fraction": "shared fraction"}
SCORES = {  # name in report.json -> what report.md calls it
    "decoder.pwmcc": "PWMCC (max-based), decoder rows",
    "decoder.hungarian": "Hungarian mean cosine (one-to-one), decoder rows",
    "encoder.pwmcc": "PWMCC (max-based), encoder columns",
    "encoder.hungarian": "Hungarian mean cosine (one-to-one), encoder columns",
    "shared_fraction": "shared fraction at tau (Hungarian, decoder AND encoder)",
}
# MMCS is directional, so it is kept as a per-pair matrix: averaged over both directions it is PWMCC
DIRECTIONAL = ("decoder.mmcs", "encoder.mmcs")
TRAINING_SETTINGS = ("steps", "batch_size", "lr", "normalize", "data_seed", "vary_data_order")   # shown per group
DOWNSTREAM = ("acc_clean", "acc_sae", "loss_recovered_zero", "loss_recovered_mean")   # as train_sae.py recorded
SAE_FILE = re.compile(r"seed(\d+)\.safetensors")   # not seedN.snapshots.safetensors, not last-good-*
DEFAULT_INPUTS = "runs/sae/*/seed*.safetensors"
TRAIN_COMMAND = "python train_sae.py --arch topk --seeds 0 1 2 3 4"


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 3: cross-seed stability of SAE latents, against baselines and the "
                                   "transformer's Fourier features.")
    add = parser.add_argument
    add("inputs", nargs="*", help=f"SAE files, folders or globs (default: {DEFAULT_INPUTS})")
    add("--out", default="runs/analysis", help="folder for report.md, report.json and figures/")
    add("--tau", type=float, default=SHARED_TAU, help="matched cosine above which a latent counts as shared")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where SAE latents, purity and the max-cosine blocks are computed (auto: the GPU when there is one)")
    add("--force", action="store_true", help="overwrite an existing report in --out")
    return parser


# --------------------------------------------------------------------------------------------------
# Stability: how alike two dictionaries are. A dictionary is m latent directions in activation space.


class Dictionary(NamedTuple):
    """One SAE's latents: decoder rows and encoder columns, each as unit rows [m, d], and which latents
    fire on the dataset (alive [m], bool)."""
    decoder: torch.Tensor
    encoder: torch.Tensor
    alive: torch.Tensor


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows of W [m, d] scaled to unit length (cosines are then plain dot products)."""
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def read_dictionary(f: "SAEFile", X: torch.Tensor, device: torch.device) -> tuple[Dictionary, torch.Tensor, dict]:
    """One SAE file's dictionary (alive = fires on some row of X), its latents on X [N, m] and its weights
    on the device."""
    weights = {name: t.to(device) for name, t in f.tensors.items()}
    with torch.no_grad():
        latents = sae_latents(weights, f.config, X)
    return make_dictionary(f.tensors["W_dec"], f.tensors["W_enc"], (latents > 0).any(dim=0)), latents, weights


def make_dictionary(W_dec: torch.Tensor, W_enc: torch.Tensor, alive: torch.Tensor) -> Dictionary:
    """From SAELens-shaped weights W_dec [m, d] and W_enc [d, m]."""
    return Dictionary(unit_rows(W_dec), unit_rows(W_enc.T), alive.bool().cpu())


class MaxCosine(NamedTuple):
    """Best matches between the rows of A [m_A, d] and B [m_B, d] under C = A B^T."""
    best_a: torch.Tensor    # [m_A] max_j C_ij: how well latent i of A is found in B
    index_a: torch.Tensor   # [m_A] argmax_j C_ij (the heat map's partners)
    best_b: torch.Tensor    # [m_B] max_i C_ij


def max_cosine(A: torch.Tensor, B: torch.Tensor, absolute: bool = False, device: torch.device | str = "cpu",
               chunk_elements: int = CHUNK_ELEMENTS) -> MaxCosine:
    """Each row's best cosine in the other dictionary, both ways, for unit rows A [m_A, d], B [m_B, d].

    C = A B^T is never held whole: blocks of rows of A ([c, m_B] with c m_B <= chunk_elements) are
    computed on `device` and reduced along both axes, so m = 65,536 needs 64 MiB instead of 16 GiB.
    absolute: rank by |C| (the sensitivity check) instead of the signed cosine (the primary choice:
    latents are non-negative, so a decoder direction's sign means something)."""
    A, B = A.to(device), B.to(device)
    rows = max(1, chunk_elements // max(1, len(B)))
    best_a, index_a = [], []
    best_b = torch.full((len(B),), -math.inf, device=device)
    for start in range(0, len(A), rows):
        block = A[start:start + rows] @ B.T
        if absolute:
            block = block.abs()
        value, index = block.max(dim=1)
        best_a.append(value)
        index_a.append(index)
        best_b = torch.maximum(best_b, block.amax(dim=0))   # amax: a column max without indices is ~10x faster
    best = MaxCosine(torch.cat(best_a).cpu(), torch.cat(index_a).cpu(), best_b.cpu())
    assert float(best.best_a.max()) <= 1 + 1e-4, "a cosine above 1: the rows were not unit length"
    return best


def mmcs(best: torch.Tensor) -> float:
    """MMCS(A -> B) = (1/m_A) sum_i max_j C_ij (Sharkey et al. 2022), from MaxCosine.best_a (or best_b
    for B -> A). Asymmetric; with A = ground truth it is the recovery score GT-MCC."""
    return float(best.double().mean())


def pwmcc(best: MaxCosine) -> float:
    """PWMCC(A, B) = (MMCS(A -> B) + MMCS(B -> A)) / 2. Max-matching may reuse a latent of the other SAE,
    so for equal widths PWMCC >= the Hungarian mean cosine (for unequal ones, the smaller side's MMCS is)."""
    return (mmcs(best.best_a) + mmcs(best.best_b)) / 2


class Matching(NamedTuple):
    """A one-to-one matching of the rows of A [m_A, d] and B [m_B, d]."""
    partner_a: np.ndarray   # [m_A] index in B of latent i's partner, -1 when unmatched (m_A > m_B)
    cos_a: np.ndarray       # [m_A] cosine with the partner, NaN when unmatched
    cos_b: np.ndarray       # [m_B]


def hungarian_match(A: torch.Tensor, B: torch.Tensor, absolute: bool = False) -> Matching:
    """The one-to-one assignment maximising the total cosine (scipy linear_sum_assignment on C = A B^T,
    or |C|). It needs C whole, so callers keep m <= HUNGARIAN_MAX_LATENTS."""
    C = (A.cpu() @ B.cpu().T).double().numpy()
    if absolute:
        C = np.abs(C)
    rows, cols = linear_sum_assignment(C, maximize=True)
    partner_a = np.full(len(A), -1)
    cos_a, cos_b = np.full(len(A), np.nan), np.full(len(B), np.nan)
    partner_a[rows], cos_a[rows], cos_b[cols] = cols, C[rows, cols], C[rows, cols]
    return Matching(partner_a, cos_a, cos_b)


def hungarian_mean_cosine(matching: Matching) -> float:
    """Mean cosine over the min(m_A, m_B) one-to-one matched pairs. Song et al. 2025 call this PW-MCC;
    here it keeps its own name so that it is never confused with the max-based PWMCC."""
    return float(np.nanmean(matching.cos_a))


def shared_fraction(decoder: Matching, encoder: Matching, tau: float | np.ndarray) -> float | np.ndarray:
    """Paulo & Belrose 2025: a latent is shared when its Hungarian partner has cosine > tau under BOTH the
    decoder matching and the encoder matching (two separate matchings). The fraction of shared latents of
    each SAE, averaged over the two SAEs of the pair; tau may be an array of thresholds (the curve)."""
    tau = np.asarray(tau, dtype=float)[..., None]
    def fraction(dec_cos, enc_cos):   # NaN (unmatched) compares False: never shared
        return ((dec_cos > tau) & (enc_cos > tau)).mean(axis=-1)
    return (fraction(decoder.cos_a, encoder.cos_a) + fraction(decoder.cos_b, encoder.cos_b)) / 2


def compare_pair(a: Dictionary, b: Dictionary, variant: Variant, device: torch.device,
                 tau: float) -> tuple[dict, MaxCosine | None]:
    """Every stability number for one pair of SAEs: per view (decoder rows, encoder columns) MMCS both
    ways, PWMCC and the Hungarian mean cosine; the shared fraction at tau and over TAU_GRID. Returns
    (scores, the decoder MaxCosine); a score is absent where the pair has no latents to compare, the
    variant has no matching, or m is too large for Hungarian. MMCS is a pair (A -> B, B -> A)."""
    if variant.alive_only:
        a = Dictionary(a.decoder[a.alive], a.encoder[a.alive], a.alive[a.alive])
        b = Dictionary(b.decoder[b.alive], b.encoder[b.alive], b.alive[b.alive])
    if not len(a.alive) or not len(b.alive):
        return {}, None
    do_hungarian = variant.hungarian and max(len(a.alive), len(b.alive)) <= HUNGARIAN_MAX_LATENTS
    scores, matchings, decoder_best = {}, {}, None
    for view in ("decoder", "encoder"):
        A, B = getattr(a, view), getattr(b, view)
        best = max_cosine(A, B, variant.absolute, device)
        if view == "decoder":
            decoder_best = best
        scores[f"{view}.mmcs"] = (mmcs(best.best_a), mmcs(best.best_b))
        scores[f"{view}.pwmcc"] = pwmcc(best)
        if do_hungarian:
            matchings[view] = hungarian_match(A, B, variant.absolute)
            scores[f"{view}.hungarian"] = hungarian_mean_cosine(matchings[view])
    if do_hungarian:
        scores["shared_fraction"] = float(shared_fraction(matchings["decoder"], matchings["encoder"], tau))
        scores["shared_curve"] = shared_fraction(matchings["decoder"], matchings["encoder"], np.array(TAU_GRID))
    return scores, decoder_best


def stability(dictionaries: list[Dictionary], device: torch.device, tau: float,
              variants: dict[str, Variant] = VARIANTS) -> dict:
    """compare_pair on every pair of seeds (i < j), for each variant, pairs side by side on the CPU's
    threads (scipy's matching releases the GIL; the results do not depend on the order). Returns
        scores[variant][score]  [S, S] matrix (MMCS: entry (i, j) = MMCS(i -> j); the others symmetric;
                                shared_curve: [S, S, len(TAU_GRID)]); the diagonal is NaN
        latent_match            per seed [m]: each latent's best decoder cosine in another seed (signed, all
                                latents), averaged over the other seeds
        first_pair              the decoder MaxCosine of seeds 0 and 1 (signed, all latents), for a heat map
    Variants that coincide (alive-only when no latent is dead) are computed once."""
    S = len(dictionaries)
    everything_alive = all(bool(d.alive.all()) for d in dictionaries)
    computed, scores = {}, {}
    latent_match = [torch.zeros(len(d.alive), dtype=torch.float64) for d in dictionaries]
    first_pair = None
    pairs = list(combinations(range(S), 2))
    for name_of_variant, variant in variants.items():
        effective = variant._replace(alive_only=variant.alive_only and not everything_alive)
        if effective in computed:
            scores[name_of_variant] = computed[effective]
            continue
        matrices = defaultdict(lambda: np.full((S, S), np.nan))
        curve = np.full((S, S, len(TAU_GRID)), np.nan)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # one thread per pair instead of a team per pair: no oversubscribed cores
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                outcomes = list(pool.map(lambda ij: compare_pair(dictionaries[ij[0]], dictionaries[ij[1]],
                                                                 effective, device, tau), pairs))
        finally:
            torch.set_num_threads(threads)
        for (i, j), (pair, best) in zip(pairs, outcomes):
            for name, value in pair.items():
                if name == "shared_curve":
                    curve[i, j] = curve[j, i] = value
                elif isinstance(value, tuple):
                    matrices[name][i, j], matrices[name][j, i] = value
                else:
                    matrices[name][i, j] = matrices[name][j, i] = value
            if not effective.absolute and not effective.alive_only:
                latent_match[i] += best.best_a.double()
                latent_match[j] += best.best_b.double()
                if (i, j) == (0, 1):
                    first_pair = best
        computed[effective] = scores[name_of_variant] = ({name: matrices[name] for name in (*SCORES, *DIRECTIONAL)}
                                                         | {"shared_curve": curve})
    return {"scores": scores, "latent_match": [m / max(1, S - 1) for m in latent_match], "first_pair": first_pair}


# --------------------------------------------------------------------------------------------------
# Statistics: seed pairs share seeds, so intervals come from resampling seeds, never the list of pairs.


def mean_and_ci(values: np.ndarray) -> dict | None:
    """Mean and percentile confidence interval (CI_LEVEL) from BOOTSTRAP_RESAMPLES resamples of the seeds.

    values [S]: one number per seed; the statistic is their mean. values [S, S]: one number per ordered
    pair of seeds (diagonal ignored); the statistic is the mean over the pairs of DISTINCT seeds in the
    resample (a seed drawn twice is not paired with itself). None when a value is missing (NaN)."""
    values = np.asarray(values, dtype=float)
    S = len(values)
    off_diagonal = ~np.eye(S, dtype=bool) if values.ndim == 2 else None
    if np.isnan(values[off_diagonal] if values.ndim == 2 else values).any() or S == 0:
        return None
    idx = np.random.default_rng(GENERATOR_SEEDS["bootstrap"]).integers(0, S, size=(BOOTSTRAP_RESAMPLES, S))
    if values.ndim == 1:
        mean, resampled = values.mean(), values[idx].mean(axis=1)
    else:
        mean = values[off_diagonal].mean()
        distinct = idx[:, :, None] != idx[:, None, :]
        picked = np.where(distinct, np.nan_to_num(values[idx[:, :, None], idx[:, None, :]]), 0.0)
        counts = distinct.sum(axis=(1, 2))
        resampled = picked.sum(axis=(1, 2))[counts > 0] / counts[counts > 0]
    lo, hi = np.quantile(resampled, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return {"mean": float(mean), "ci": [float(lo), float(hi)]}


def normalised(score: dict | None, baseline: dict | None) -> float | None:
    """(S - S_rand) / (1 - S_rand): 0 at the baseline, 1 at perfect agreement."""
    if score is None or baseline is None or baseline["mean"] >= 1:
        return None
    return (score["mean"] - baseline["mean"]) / (1 - baseline["mean"])


def summarise(result: dict) -> dict:
    """stability()'s matrices -> {variant: {score: mean and CI}, shared_curve: mean per tau}."""
    summary = {}
    for variant, matrices in result["scores"].items():
        summary[variant] = {name: mean_and_ci(matrices[name]) for name in SCORES}
        curve = matrices["shared_curve"]
        off_diagonal = ~np.eye(len(curve), dtype=bool)
        summary[variant]["shared_curve"] = (None if np.isnan(curve[off_diagonal]).any() or not off_diagonal.any()
                                            else curve[off_diagonal].mean(axis=0).tolist())
    return summary


# --------------------------------------------------------------------------------------------------
# Baselines: dictionaries of the same shape, from random directions or the untrained initialisation.


class ActivationGeometry(NamedTuple):
    """The shape of the activations' distribution that the random baselines copy."""
    eigenvalues: torch.Tensor   # [d] of the covariance, descending (float64)
    eigenvectors: torch.Tensor  # [d, d] columns, same order
    rank: int                   # principal directions holding SUBSPACE_VARIANCE of the variance


def activation_geometry(X: torch.Tensor) -> ActivationGeometry:
    """Covariance spectrum and the SUBSPACE_VARIANCE rank of activations X [N, d]."""
    X = X.double()
    mean = X.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh((X - mean).T @ (X - mean) / len(X))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    share = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-30)
    rank = int((share < SUBSPACE_VARIANCE - 1e-12).sum()) + 1
    return ActivationGeometry(eigenvalues, eigenvectors, min(rank, len(eigenvalues)))


def subspace_share(rows: torch.Tensor, geometry: ActivationGeometry) -> float:
    """Mean over unit rows [m, d] of the fraction of their squared length inside the top-`rank` principal
    subspace: 1 for directions in the data's subspace, rank / d on average for isotropic ones."""
    return float((rows.double() @ geometry.eigenvectors[:, :geometry.rank]).pow(2).sum(dim=1).mean())


def random_directions(kind: str, n: int, geometry: ActivationGeometry, seed: int) -> torch.Tensor:
    """n random directions [n, d] (not normalised) of a baseline kind: isotropic N(0, I), the activations'
    N(0, Sigma_x), or isotropic within the top-`rank` principal subspace."""
    generator = torch.Generator().manual_seed(seed)
    V, d = geometry.eigenvectors, len(geometry.eigenvalues)
    if kind == "isotropic":
        return torch.randn(n, d, generator=generator)
    if kind == "covariance":
        standard = torch.randn(n, d, generator=generator, dtype=torch.float64)
        return ((standard * geometry.eigenvalues.sqrt()) @ V.T).float()
    if kind == "subspace":
        standard = torch.randn(n, geometry.rank, generator=generator, dtype=torch.float64)
        return (standard @ V[:, :geometry.rank].T).float()
    raise ValueError(f"unknown baseline {kind!r}")


def baseline_dictionaries(kind: str, trained: list[Dictionary], geometry: ActivationGeometry,
                          initial: list[dict] | None) -> tuple[list[Dictionary], list[int]]:
    """BASELINE_DICTIONARIES dictionaries shaped like the trained ones. Replicate i takes trained seed i's
    alive mask (random rows are exchangeable, so only the count matters), so alive-only numbers compare
    like with like. Random kinds draw decoder and encoder independently. Returns (dictionaries, the
    generator seeds used)."""
    dictionaries, seeds = [], []
    for i, reference in enumerate(trained[:BASELINE_DICTIONARIES]):
        m = len(reference.alive)
        if kind == "init":
            dictionaries.append(make_dictionary(initial[i]["W_dec"], initial[i]["W_enc"], reference.alive))
            continue
        seed = GENERATOR_SEEDS[kind] + 2 * i
        seeds += [seed, seed + 1]
        dictionaries.append(Dictionary(unit_rows(random_directions(kind, m, geometry, seed)),
                                       unit_rows(random_directions(kind, m, geometry, seed + 1)), reference.alive))
    return dictionaries, seeds


# --------------------------------------------------------------------------------------------------
# Ground truth: the transformer's Fourier features, mapped into the latents' space through activations.


def latent_purity(f: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier purity and best frequency of every latent from its activations f [p*p, m] on all inputs
    (row a*p + b): sae_core.fourier_purity on the [p, p] grid, PURITY_CHUNK latents at a time."""
    grid = f.reshape(p, p, -1)
    parts = [fourier_purity(grid[:, :, start:start + PURITY_CHUNK]) for start in range(0, f.shape[1], PURITY_CHUNK)]
    if not parts:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat([purity for purity, _ in parts]), torch.cat([best for _, best in parts])


def frequency_plane(X: torch.Tensor, p: int, op: str, k: int) -> tuple[torch.Tensor, float] | None:
    """The plane in activation space that carries frequency k of (a + b) (a - b for sub): the centred
    activations X [p*p, d] projected on the unit input patterns cos(w_k (a+b)) and sin(w_k (a+b)) give two
    vectors in activation space. Returns (orthonormal basis [d, 2], share of the activations' variance
    in those two patterns), or None where the operation has no such plane (mul)."""
    patterns = sum_frequency_directions(p, op, [k])
    if patterns is None:
        return None
    centred = (X - X.mean(dim=0)).double()
    vectors = centred.T @ patterns.double()                        # [d, 2]
    basis, _ = torch.linalg.qr(vectors)
    return basis, float(vectors.pow(2).sum() / centred.pow(2).sum())


def plane_coverage(plane: torch.Tensor, vectors: torch.Tensor) -> list[float]:
    """Cosines of the two principal angles between a plane (orthonormal basis [d, 2]) and the span of
    vectors [n, d]: the singular values of plane^T Q, Q an orthonormal basis of the span. [1, 1] means
    the plane lies inside the span; [0, 0] that they are orthogonal (or n = 0)."""
    cosines = torch.zeros(2, dtype=torch.float64)
    if len(vectors):
        U, S, _ = torch.linalg.svd(vectors.double().T, full_matrices=False)
        span = U[:, S > S.max() * 1e-6]
        values = torch.linalg.svdvals(plane.T @ span).clamp(max=1)
        cosines[:len(values)] = values
    return cosines.tolist()


def coverage(cosines: list[float]) -> float:
    """Coverage of a plane = mean squared principal-angle cosine: the share of a random in-plane vector's
    squared length that the span captures (1: the plane is spanned)."""
    return sum(c * c for c in cosines) / len(cosines)


class FourierSetup(NamedTuple):
    """What the Fourier analysis of a group needs, computed once per group."""
    p: int
    keys: list[int]              # key frequencies, largest embedding share first
    planes: dict                 # k -> (orthonormal basis [d, 2] of its plane, variance share)
    random_rows: torch.Tensor    # [m, d] unit random directions of the subspace baseline


def fourier_setup(model, X: torch.Tensor, geometry: ActivationGeometry, m: int) -> FourierSetup:
    """Key frequencies, their planes in activation space, and the random directions of the baselines."""
    p = model.cfg.p
    keys = embedding_spectrum(model.W_E[:p])[1]
    planes = {k: plane for k in keys if (plane := frequency_plane(X, p, model.cfg.op, k)) is not None}
    random_rows = unit_rows(random_directions("subspace", m, geometry, GENERATOR_SEEDS["random_latents"]))
    return FourierSetup(p, keys, planes, random_rows)


def fourier_recovery(f: torch.Tensor, decoder: torch.Tensor, fourier: FourierSetup) -> dict:
    """Ground-truth numbers for one dictionary: latents f [p*p, m] on all inputs, decoder rows [m, d].
    Per alive latent, its purity and best frequency; the fraction of alive latents that are pure
    (>= PURE_LATENT) and the fraction pure AND on a key frequency; per key frequency k, the principal-angle
    cosines between k's plane and the span of the decoder rows of the alive latents whose best
    frequency is k, their coverage, and the coverage of as many of the random directions (the baseline:
    a span grows with its number of vectors)."""
    alive = (f > 0).any(dim=0)
    purity, best = torch.zeros(f.shape[1]), torch.zeros(f.shape[1], dtype=torch.long)
    alive_purity, alive_best = latent_purity(f[:, alive], fourier.p)
    alive = alive.cpu()
    purity[alive], best[alive] = alive_purity.cpu(), alive_best.cpu()
    pure = alive & (purity >= PURE_LATENT)
    n_alive = max(1, int(alive.sum()))
    per_frequency = {}
    for k, (plane, _) in fourier.planes.items():
        assigned = alive & (best == k)
        n = int(assigned.sum())
        cosines = plane_coverage(plane, decoder[assigned])
        per_frequency[k] = {"latents": n, "cosines": cosines, "coverage": coverage(cosines),
                            "random_coverage": coverage(plane_coverage(plane, fourier.random_rows[:n]))}
    keys = torch.tensor(fourier.keys, dtype=torch.long)
    return {"alive": alive, "purity": purity, "best": best,
            "frac_pure": int(pure.sum()) / n_alive,
            "frac_pure_key": int((pure & torch.isin(best, keys)).sum()) / n_alive,
            "per_frequency": per_frequency,
            "coverage": float(np.mean([v["coverage"] for v in per_frequency.values()])) if per_frequency else None}


def random_direction_latents(X: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The baseline's latents: f = relu((x - mean x) . r) for unit random directions r [m, d] -> [N, m],
    a readout that fires on half the inputs, like a latent with its bias at the mean."""
    return torch.relu((X - X.mean(dim=0)) @ unit_rows(directions).T)


def match_purity_correlation(match: list[torch.Tensor], recovery: list[dict], tau: float) -> dict:
    """Are the stable latents the Fourier-pure ones? Over the alive latents of all seeds of a group:
    Spearman correlation between a latent's cross-seed match (stability()'s latent_match) and its
    purity, and the fraction pure among latents with match > tau vs <= tau."""
    alive = torch.cat([r["alive"] for r in recovery])
    x = torch.cat(match)[alive].numpy()
    y = torch.cat([r["purity"] for r in recovery])[alive].double().numpy()
    result = {"latents": int(alive.sum()), "spearman": None, "p_value": None}
    if len(x) > 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho, p_value = spearmanr(x, y)
        result.update(spearman=float(rho), p_value=float(p_value))
    for name, chosen in (("frac_pure_if_stable", x > tau), ("frac_pure_if_unstable", x <= tau)):
        result[name] = float((y[chosen] >= PURE_LATENT).mean()) if chosen.any() else None
        result[name.replace("frac_pure", "latents")] = int(chosen.sum())
    return result


# --------------------------------------------------------------------------------------------------
# Inputs: find the SAE files, read them, group them by configuration, and get their activations.


@dataclass
class SAEFile:
    path: Path
    seed: int
    config: dict
    metrics: dict
    provenance: dict
    tensors: dict


class GroupKey(NamedTuple):
    """What SAEs must share to be compared: they may differ only in their seed."""
    arch: str
    width: int
    parameter: str          # k, l1 or l0
    value: float
    hook: str
    checkpoint: int         # -1: the final model
    source: str             # transformer or acts
    sha256: str             # of the transformer or activation file
    d_in: int

    def configuration(self) -> tuple:
        """The part a user chooses; two groups with the same configuration differ in their source."""
        return self[:6]

    def describe(self) -> str:
        return (f"{self.arch} width {self.width} {self.parameter}={self.value:g} at {self.hook}"
                + (f" (checkpoint epoch {self.checkpoint})" if self.checkpoint >= 0 else ""))


@dataclass
class Group:
    """SAEs that differ only in their seed."""
    key: GroupKey
    files: list[SAEFile]
    name: str = ""
    notes: list[str] = field(default_factory=list)
    reruns: list[tuple[SAEFile, SAEFile]] = field(default_factory=list)   # (the file kept, another of its seed)

    @property
    def first(self) -> SAEFile:
        return self.files[0]


def find_sae_files(inputs: list[str]) -> list[Path]:
    """SAE files from files, folders (searched recursively) and globs, sorted; the default glob without
    inputs. A file named explicitly is taken as it is; folders and globs yield seed<N>.safetensors only.
    A named path that does not exist is an error; finding nothing at all is one too."""
    patterns = inputs or [DEFAULT_INPUTS]
    found = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
        elif Path(pattern).exists():
            matches = [Path(pattern)]
        else:
            raise HusaiError(f"{pattern}: no such file or folder")
        for match in matches:
            if match.is_dir():
                found |= {c for c in match.rglob("seed*.safetensors") if SAE_FILE.fullmatch(c.name)}
            elif SAE_FILE.fullmatch(match.name) or not glob.has_magic(pattern):
                found.add(match)
    if not found:
        raise HusaiError(f"no SAE files found in {' '.join(patterns)}; create them with `{TRAIN_COMMAND}`")
    return sorted(found)


def read_sae_files(paths: list[Path]) -> tuple[list[SAEFile], list[dict]]:
    """Load every file; a file that cannot be read or lacks what the analysis needs is skipped, with
    the reason, and the rest go on."""
    files, skipped = [], []
    for path in paths:
        try:
            tensors, meta = load_sae(path)
            config, provenance = meta["config"], meta["provenance"]
            d, m = tensors["W_enc"].shape
            if tensors["W_dec"].shape != (m, d) or config["width"] != m or config["d_in"] != d:
                raise HusaiError(f"{path}: W_enc {list(tensors['W_enc'].shape)}, W_dec {list(tensors['W_dec'].shape)} "
                                 f"do not match width {config['width']}, d_in {config['d_in']}")
            files.append(SAEFile(path, int(config["seed"]), config, meta.get("metrics", {}), provenance, tensors))
        except HusaiError as e:
            skipped.append({"path": str(path), "reason": str(e)})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            skipped.append({"path": str(path), "reason": f"{path}: metadata lacks or mangles {e}"})
    return files, skipped


def sparsity(config: dict) -> tuple[str, float]:
    """(parameter name, value): k for TopK and BatchTopK, the penalty coefficient for ReLU and JumpReLU."""
    name = ARCHITECTURES[config["arch"]].sparsity
    return name, float(config[name])


def source_of(provenance: dict) -> tuple[str, str, str]:
    """(kind, path, sha256) of what produced the activations: the transformer or an activation file."""
    kind = provenance.get("source", "transformer")
    return kind, str(provenance.get(kind)), str(provenance.get(f"{kind}_sha256"))


def group_files(files: list[SAEFile]) -> tuple[list[Group], list[str]]:
    """Group by configuration; within a group one file per seed. Returns (groups sorted by
    architecture, width, sparsity, ...; refusals: comparisons not made, and why)."""
    by_key = defaultdict(list)
    for f in files:
        kind, _, sha = source_of(f.provenance)
        checkpoint = f.provenance.get("checkpoint")
        key = GroupKey(f.config["arch"], f.config["width"], *sparsity(f.config), str(f.provenance.get("hook")),
                       -1 if checkpoint is None else int(checkpoint), kind, sha, f.config["d_in"])
        by_key[key].append(f)
    refused = []
    by_configuration = defaultdict(list)
    for key in sorted(by_key):
        by_configuration[key.configuration()].append(key)
    for keys in by_configuration.values():
        if len(keys) > 1:
            sources = "; ".join(f"{len(by_key[k])} file(s) from {k.source} sha256 {k.sha256[:12]} with d_in {k.d_in}"
                                for k in keys)
            refused.append(f"{keys[0].describe()}: seeds come from different sources or activation sizes "
                           f"({sources}); not compared across sources, each analysed as its own group")
    groups = []
    for key in sorted(by_key):
        seen = {}
        group = Group(key, [])
        # a seed found twice: keep the file whose folder holds most of the group
        folder_size = defaultdict(int)
        for f in by_key[key]:
            folder_size[f.path.parent] += 1
        for f in sorted(by_key[key], key=lambda f: (f.seed, -folder_size[f.path.parent], str(f.path))):
            if f.seed in seen:
                group.notes.append(f"{f.path}: seed {f.seed} again (as {seen[f.seed].path}); compared with it as "
                                   "a rerun of one seed, never as another seed")
                group.reruns.append((seen[f.seed], f))
                continue
            seen[f.seed] = f
            group.files.append(f)
        groups.append(group)
    names = [" + ".join(sorted({f.path.parent.name for f in g.files})) for g in groups]
    for group, name in zip(groups, names):
        unique = names.count(name) == 1
        group.name = re.sub(r"[^A-Za-z0-9._+-]+", "_",
                            name if unique else f"{name}-{group.key.sha256[:8]}-d{group.key.d_in}")
    return groups, refused


class Source(NamedTuple):
    """The activations a group's SAEs were trained on, and the model behind them when there is one."""
    X: torch.Tensor               # [N, d]; with a transformer, N = p^2 in the order a*p + b
    model: object | None
    transformer_id: str | None    # its path, and the epoch for a checkpoint
    path: str


def load_source(group: Group, cache: dict) -> Source:
    """Recompute the group's activations from its provenance (the transformer at its checkpoint and
    hook, at the `=` position; or the activation file), after checking the file is the one the SAEs
    were trained on (sha256). A HusaiError explains a group that cannot be analysed."""
    provenance = group.first.provenance
    kind, path, sha = source_of(provenance)
    checkpoint, hook = provenance.get("checkpoint"), provenance.get("hook")
    if provenance.get("position") not in ("eq", None):
        raise HusaiError(f"position {provenance['position']!r}: this analysis reads activations at `=` (eq) only")
    key = (kind, path, sha, checkpoint, hook)
    if key not in cache:
        if not Path(path).is_file():
            raise HusaiError(f"the {kind} file {path} named in the SAEs' provenance does not exist")
        if file_sha256(path) != sha:
            raise HusaiError(f"{path} has changed since the SAEs were trained (sha256 differs from the provenance)")
        data = activations_from(provenance)
        transformer_id = None if kind == "acts" else path + (f" (epoch {checkpoint})" if checkpoint is not None else "")
        cache[key] = Source(data.acts, data.model, transformer_id, path)
    return cache[key]


def load_snapshots(files: list[SAEFile]) -> tuple[dict | None, str | None]:
    """Each seed's snapshot file, over the steps all seeds share: ({"weights": {step: [W_dec and W_enc per
    seed]}, "fvu": {step: [FVU per seed]}}, None), step 0 being the initialisation; or (None, why not)."""
    try:
        loaded = []
        for f in files:
            path = f.path.with_name(snapshot_file_name(f.seed))
            tensors, meta = load_tensors(path, SNAPSHOT_FORMAT, SAE_VERSION, required=("step0.W_enc", "step0.W_dec"))
            loaded.append((tensors, dict(zip(meta["steps"], meta["fvu"], strict=True))))
        steps = sorted(set.intersection(*(set(fvu) for _, fvu in loaded)))
        if 0 not in steps:
            raise KeyError("step 0, the initialisation, is not in every file's steps")
        weights = {t: [{name: tensors[f"step{t}.{name}"] for name in ("W_dec", "W_enc")} for tensors, _ in loaded]
                   for t in steps}
        snapshots = {"weights": weights, "fvu": {t: [fvu[t] for _, fvu in loaded] for t in steps}}
    except HusaiError as e:
        return None, f"snapshots unusable: {e}"
    except (KeyError, TypeError, ValueError) as e:
        return None, f"snapshots unusable: their steps, FVUs and tensors do not agree ({e!r})"
    return snapshots, None


# --------------------------------------------------------------------------------------------------
# The analysis of one group


def analyse_group(group: Group, source: Source, device: torch.device, tau: float) -> tuple[dict, dict]:
    """Everything about one configuration. Returns (numbers for report.json, data for the figures)."""
    X = source.X
    seeds = [f.seed for f in group.files]
    config = group.first.config
    result = {"name": group.name, "arch": config["arch"], "width": config["width"], "d_in": config["d_in"],
              "sparsity": dict([sparsity(config)]), "hook": group.first.provenance.get("hook"),
              "checkpoint": group.first.provenance.get("checkpoint"), "source": source_of(group.first.provenance)[1],
              "source_sha256": group.key.sha256, "seeds": seeds, "files": [str(f.path) for f in group.files],
              "notes": list(group.notes), "settings": settings_of(group.files)}
    plots = {}

    geometry = activation_geometry(X)
    fourier = fourier_setup(source.model, X, geometry, config["width"]) if source.model is not None else None

    # per seed, on every input: which latents fire, reconstruction, and the latents' Fourier structure. One
    # seed's latents [N, m] at a time: at m = 65,536 they take 3 GiB each.
    X_device = X.to(device)
    dictionaries, per_seed, recovery = [], [], []
    for f in group.files:
        dictionary, latents, weights = read_dictionary(f, X_device, device)
        dictionaries.append(dictionary)
        downstream = {k: f.metrics.get(k) for k in DOWNSTREAM}
        per_seed.append({"seed": f.seed, **reconstruction_metrics(weights, f.config, X_device), **downstream})
        if fourier is not None:
            recovery.append(fourier_recovery(latents, dictionaries[-1].decoder, fourier))
        del latents
    result["per_seed"] = per_seed
    result["reconstruction"] = {name: mean_and_ci(values) if None not in values else None
                                for name in per_seed[0] if name != "seed"
                                for values in [[s[name] for s in per_seed]]}

    result["activations"] = {"n": len(X), "d": X.shape[1], "subspace_rank": geometry.rank,
                             **{f"{view}_in_subspace": mean_and_ci([subspace_share(getattr(d, view), geometry)
                                                                    for d in dictionaries])
                                for view in ("decoder", "encoder")}}
    snapshots, snapshot_problem = load_snapshots(group.files)
    initial = snapshots["weights"][0] if snapshots else None
    if snapshot_problem:
        result["notes"].append(f"{snapshot_problem}; no init baseline and no dynamics")

    # stability and its baselines
    latent_match = None
    if len(group.files) < 2:
        result["stability"] = None
        result["notes"].append(f"only one seed ({seeds[0]}): stability needs at least two seeds of one configuration")
    else:
        if len(group.files) < RECOMMENDED_SEEDS:
            result["notes"].append(f"{len(group.files)} seeds: confidence intervals from fewer than "
                                   f"{RECOMMENDED_SEEDS} seeds are rough")
        if config["width"] > HUNGARIAN_MAX_LATENTS:
            result["notes"].append(f"width {config['width']} > HUNGARIAN_MAX_LATENTS = {HUNGARIAN_MAX_LATENTS}: "
                                   "Hungarian matching and the shared fraction are skipped (the dense [m, m] "
                                   "cost matrix would not fit); max-based scores are still reported")
        trained = stability(dictionaries, device, tau)
        result["stability"] = summarise(trained)
        result["pair_matrices"] = {variant: {name: matrix.tolist() for name, matrix in matrices.items()
                                             if name != "shared_curve"}
                                   for variant, matrices in trained["scores"].items()}
        result["baselines"], result["baseline_generator_seeds"], baseline_pairs = {}, {}, {}
        for kind in BASELINES:
            if kind == "init" and initial is None:
                continue
            dicts, generator_seeds = baseline_dictionaries(kind, dictionaries, geometry, initial)
            scores = stability(dicts, device, tau)
            result["baselines"][kind] = summarise(scores)
            result["baseline_generator_seeds"][kind] = generator_seeds
            baseline_pairs[kind] = (dicts[0], dicts[1], scores["first_pair"])
        result["normalised"] = {variant: {name: normalised(scores[name], result["baselines"]["subspace"][variant][name])
                                          for name in SCORES}
                                for variant, scores in result["stability"].items()}
        plots["heatmaps"] = {"trained": (dictionaries[0], dictionaries[1], trained["first_pair"]),
                             "subspace baseline": baseline_pairs["subspace"]}
        plots["latent_match"] = latent_match = trained["latent_match"]

    result["reruns"] = [rerun_similarity(a, b, X_device, device, tau) for a, b in group.reruns]

    # ground truth: only with the transformer's full (a, b) grid
    if fourier is None:
        result["ground_truth"] = None
        result["notes"].append("activations come from a file, not the (a, b) grid of a transformer: "
                               "no Fourier analysis")
    else:
        baseline = fourier_recovery(random_direction_latents(X_device, fourier.random_rows.to(device)),
                                    fourier.random_rows, fourier)
        result["ground_truth"], plots["purity"] = ground_truth(source, fourier, recovery, baseline, latent_match, tau)

    # per seed and latent: the numbers behind the histograms and the correlation
    result["latents"] = [{"seed": f.seed, "alive": d.alive.int().tolist(),
                          "match": latent_match[i].tolist() if latent_match else None,
                          "purity": recovery[i]["purity"].tolist() if recovery else None,
                          "best_frequency": recovery[i]["best"].tolist() if recovery else None}
                         for i, (f, d) in enumerate(zip(group.files, dictionaries))]

    # training dynamics from the snapshots
    if snapshots is not None and len(group.files) > 1:
        result["dynamics"] = dynamics(snapshots, device, tau)
    else:
        result["dynamics"] = None
    return result, plots


def rerun_similarity(a: SAEFile, b: SAEFile, X: torch.Tensor, device: torch.device, tau: float) -> dict:
    """Two files of one seed and configuration. Identical bits, or how far apart rounding alone (another
    thread count, machine or library version) carried one training run: the ceiling that no cross-seed
    stability can be read above. Scores as for a pair of seeds (signed, all latents)."""
    scores, _ = compare_pair(read_dictionary(a, X, device)[0], read_dictionary(b, X, device)[0], VARIANTS[PRIMARY],
                             device, tau)
    identical = a.tensors.keys() == b.tensors.keys() and all(torch.equal(t, b.tensors[n]) for n, t in a.tensors.items())
    return {"seed": a.seed, "files": [str(a.path), str(b.path)], "identical": identical,
            **{name: scores.get(name) for name in SCORES}}


def ground_truth(source: Source, fourier: FourierSetup, recovery: list[dict], baseline: dict,
                 latent_match: list[torch.Tensor] | None, tau: float) -> tuple[dict, dict]:
    """The group's Fourier numbers from each seed's fourier_recovery: means over seeds with CIs beside the
    random-direction baseline, per key frequency, and the match-purity correlation."""
    planes, m = fourier.planes, len(fourier.random_rows)
    result = {
        "transformer": source.transformer_id, "p": fourier.p, "op": source.model.cfg.op,
        "key_frequencies": fourier.keys,
        "key_frequency_rule": f"embedding Fourier share >= {KEY_FREQUENCY_MIN_SHARE} "
                              "(sae_core.embedding_spectrum)",
        "plane_variance_share": {k: share for k, (_, share) in planes.items()},
        "frac_pure": mean_and_ci([r["frac_pure"] for r in recovery]),
        "frac_pure_key": mean_and_ci([r["frac_pure_key"] for r in recovery]),
        "coverage": mean_and_ci([r["coverage"] for r in recovery]) if planes else None,
        "per_frequency": {k: {"latents": mean_and_ci([r["per_frequency"][k]["latents"] for r in recovery]),
                              "coverage": mean_and_ci([r["per_frequency"][k]["coverage"] for r in recovery]),
                              "cosines_per_seed": [r["per_frequency"][k]["cosines"] for r in recovery],
                              "baseline_coverage": mean_and_ci([r["per_frequency"][k]["random_coverage"]
                                                                for r in recovery])}
                          for k in planes},
        "per_seed": [{"frac_pure": r["frac_pure"], "frac_pure_key": r["frac_pure_key"], "coverage": r["coverage"]}
                     for r in recovery],
        "baseline": {"what": f"{m} random directions r from the subspace baseline; purity of the latents "
                             "f = relu((x - mean) . r); coverage of as many of them as the SAE assigns to k",
                     "generator_seed": GENERATOR_SEEDS["random_latents"], "frac_pure": baseline["frac_pure"],
                     "frac_pure_key": baseline["frac_pure_key"],
                     "coverage": mean_and_ci([np.mean([v["random_coverage"] for v in r["per_frequency"].values()])
                                              for r in recovery]) if planes else None},
        "match_vs_purity": match_purity_correlation(latent_match, recovery, tau) if latent_match else None,
    }
    plots = {"purity": [r["purity"][r["alive"]] for r in recovery],
             "baseline_purity": baseline["purity"][baseline["alive"]], "alive": [r["alive"] for r in recovery],
             "spearman": result["match_vs_purity"]}
    return result, plots


def dynamics(snapshots: dict, device: torch.device, tau: float) -> dict:
    """Stability across seeds at each snapshot step (PWMCC, decoder and encoder, signed, all latents:
    the max-based scores, which need no m x m matrix) beside the full-dataset FVU at that step."""
    rows = []
    for step, weights in snapshots["weights"].items():
        dictionaries = [make_dictionary(w["W_dec"], w["W_enc"], torch.ones(len(w["W_dec"]), dtype=torch.bool))
                        for w in weights]
        scores = stability(dictionaries, device, tau, variants={PRIMARY: VARIANTS[PRIMARY]._replace(hungarian=False)})
        matrices = scores["scores"][PRIMARY]
        rows.append({"step": step, "decoder.pwmcc": mean_and_ci(matrices["decoder.pwmcc"]),
                     "encoder.pwmcc": mean_and_ci(matrices["encoder.pwmcc"]),
                     "fvu": mean_and_ci(snapshots["fvu"][step])})
    return {"what": "PWMCC (signed, all latents) and FVU at each snapshot step; step 0 is the initialisation",
            "steps": rows}


def settings_of(files: list[SAEFile]) -> dict:
    """The training settings shared by all seeds of a group, and those that differ between seeds."""
    keys = sorted(set().union(*(f.config for f in files)) - {"seed"})
    shared, varying = {}, {}
    for key in keys:
        values = [f.config.get(key) for f in files]
        if all(v == values[0] for v in values):
            shared[key] = values[0]
        else:
            varying[key] = values
    return {"shared": shared, "varying": varying}


# --------------------------------------------------------------------------------------------------
# Across groups


def comparison(results: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per group, and the names of the groups on the Pareto frontier of stability (normalised
    PWMCC, decoder, signed, all latents: higher is better) against FVU (lower is better)."""
    rows = []
    for r in results:
        stab, gt = r.get("stability"), r.get("ground_truth")
        rec = r["reconstruction"]
        rows.append({
            "name": r["name"], "arch": r["arch"], "width": r["width"],
            "sparsity": ", ".join(f"{k}={v:g}" for k, v in r["sparsity"].items()),
            "sparsity_parameter": next(iter(r["sparsity"])), "sparsity_value": next(iter(r["sparsity"].values())),
            "seeds": len(r["seeds"]), "fvu": rec["fvu"]["mean"], "l0": rec["l0"]["mean"],
            "dead_frac": rec["dead_frac"]["mean"], "acc_sae": rec["acc_sae"]["mean"] if rec.get("acc_sae") else None,
            "pwmcc": stab[PRIMARY]["decoder.pwmcc"]["mean"] if stab else None,
            "pwmcc_subspace": r["baselines"]["subspace"][PRIMARY]["decoder.pwmcc"]["mean"] if stab else None,
            "pwmcc_isotropic": r["baselines"]["isotropic"][PRIMARY]["decoder.pwmcc"]["mean"] if stab else None,
            "pwmcc_normalised": r["normalised"][PRIMARY]["decoder.pwmcc"] if stab else None,
            "hungarian_normalised": r["normalised"][PRIMARY]["decoder.hungarian"] if stab else None,
            "shared_fraction": (stab[PRIMARY]["shared_fraction"] or {}).get("mean") if stab else None,
            "frac_pure_key": gt["frac_pure_key"]["mean"] if gt else None,
            "frac_pure_key_baseline": gt["baseline"]["frac_pure_key"] if gt else None,
            "coverage": gt["coverage"]["mean"] if gt and gt["coverage"] else None,
            "coverage_baseline": gt["baseline"]["coverage"]["mean"] if gt and gt["coverage"] else None,
        })
    candidates = [row for row in rows if row["pwmcc_normalised"] is not None]
    pareto = [row["name"] for row in candidates
              if not any(o["pwmcc_normalised"] >= row["pwmcc_normalised"] and o["fvu"] <= row["fvu"]
                         and (o["pwmcc_normalised"] > row["pwmcc_normalised"] or o["fvu"] < row["fvu"])
                         for o in candidates)]
    return rows, pareto


# --------------------------------------------------------------------------------------------------
# Figures (every one written atomically)


def save_figure(path: Path, draw: Callable[[BinaryIO], None]) -> None:
    """draw(file) saves a figure into an open binary file (PNG, matplotlib's default format); the file
    appears at `path` complete or not at all."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            draw(handle)
    atomic_write(path, write)


def finish(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


def heatmap_matrix(a: Dictionary, b: Dictionary, best: MaxCosine) -> np.ndarray:
    """FIGURE_LATENTS latents of A, evenly spaced in the order of their best cosine in B (best first),
    against their best partners in B: the diagonal holds each latent's max cosine."""
    order = torch.argsort(best.best_a, descending=True, stable=True)
    chosen = order[torch.linspace(0, len(order) - 1, min(FIGURE_LATENTS, len(order))).long()]
    return (a.decoder[chosen] @ b.decoder[best.index_a[chosen]].T).numpy()


def plot_group(result: dict, plots: dict, folder: Path) -> dict[str, str]:
    """The group's figures; returns {what: file name}."""
    names = {}
    if "heatmaps" in plots:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (label, (a, b, best)) in zip(axes, plots["heatmaps"].items()):
            image = ax.imshow(heatmap_matrix(a, b, best), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set(title=f"{label}: decoder cosines, first two dictionaries\n{FIGURE_LATENTS} latents sorted by "
                         "best match, vs their best partners",
                   xlabel="partner in dictionary 2", ylabel="latent of dictionary 1")
            fig.colorbar(image, ax=ax, shrink=0.8)
        ax = axes[2]
        for label, summary in [("trained", result["stability"])] + list(result["baselines"].items()):
            curve = summary[PRIMARY]["shared_curve"]
            if curve is not None:
                ax.plot(TAU_GRID, curve, "-" if label == "trained" else "--", label=label)
        ax.axvline(SHARED_TAU, color="k", lw=0.8, ls=":")
        ax.set(xlabel="tau", ylabel="shared fraction", ylim=(0, 1.02),
               title="shared fraction vs tau (signed, all latents)")
        ax.legend()
        names["stability"] = f"{result['name']}-stability.png"
        finish(fig, folder / names["stability"])
    if "purity" in plots:
        data = plots["purity"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        bins = np.linspace(0, 1, 41)
        axes[0].hist(torch.cat(data["purity"]).numpy(), bins=bins, density=True, alpha=0.7, label="trained (all seeds)")
        axes[0].hist(data["baseline_purity"].numpy(), bins=bins, density=True, alpha=0.5, label="random directions")
        axes[0].axvline(PURE_LATENT, color="k", ls=":", lw=0.8)
        axes[0].set(xlabel="Fourier purity", ylabel="density", title="purity of alive latents")
        axes[0].legend()
        if "latent_match" in plots:
            match = torch.cat([m[alive] for m, alive in zip(plots["latent_match"], data["alive"])]).numpy()
            axes[1].scatter(match, torch.cat(data["purity"]).numpy(), s=4, alpha=0.4)
            rho = data["spearman"]["spearman"]
            axes[1].set(title=f"cross-seed match vs purity (Spearman {fmt(rho)})")
        axes[1].set(xlabel="mean best decoder cosine in the other seeds", ylabel="Fourier purity")
        names["purity"] = f"{result['name']}-purity.png"
        finish(fig, folder / names["purity"])
    if result.get("dynamics"):
        rows = result["dynamics"]["steps"]
        steps = [row["step"] for row in rows]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for view, color in (("decoder", "tab:blue"), ("encoder", "tab:green")):
            values = [row[f"{view}.pwmcc"] for row in rows]
            ax.plot(steps, [v["mean"] for v in values], "o-", color=color, label=f"PWMCC {view}")
            ax.fill_between(steps, [v["ci"][0] for v in values], [v["ci"][1] for v in values], color=color, alpha=0.2)
            for kind, style in (("subspace", "--"), ("isotropic", ":")):
                ax.axhline(result["baselines"][kind][PRIMARY][f"{view}.pwmcc"]["mean"], color=color, ls=style, lw=1,
                           label=f"{kind} baseline ({view})")
        ax.set(xscale="symlog", xlabel="training step", ylabel="PWMCC across seeds", ylim=(0, 1.02))
        twin = ax.twinx()
        twin.plot(steps, [row["fvu"]["mean"] for row in rows], "s-", color="tab:red", label="FVU")
        twin.set(ylabel="FVU (full dataset)", yscale="log")
        ax.legend(loc="lower left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        ax.set_title(f"{result['name']}: stability and FVU during training")
        names["dynamics"] = f"{result['name']}-dynamics.png"
        finish(fig, folder / names["dynamics"])
    return names


def plot_comparison(rows: list[dict], folder: Path) -> str:
    """Stability (decoder PWMCC, signed, all latents) vs width at fixed sparsity, vs k at fixed width, and vs
    the penalty at fixed width, each with its subspace (dashed) and isotropic (dotted) baselines."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    def at_width(r): return f"{r['arch']} w{r['width']}"
    def sparsity_value(r): return r["sparsity_value"]
    panels = [("width", lambda r: f"{r['arch']} {r['sparsity']}", lambda r: r["width"], lambda r: True),
              ("k", at_width, sparsity_value, lambda r: r["sparsity_parameter"] == "k"),
              ("penalty (relu: l1, jumprelu: l0)", at_width, sparsity_value, lambda r: r["sparsity_parameter"] != "k")]
    for ax, (x_name, series_of, x_of, keep) in zip(axes, panels):
        series = defaultdict(list)
        for row in rows:
            if row["pwmcc"] is not None and keep(row):
                series[series_of(row)].append(row)
        for i, (label, members) in enumerate(sorted(series.items())):
            members.sort(key=x_of)
            x = [x_of(r) for r in members]
            color = f"C{i % 10}"
            ax.plot(x, [r["pwmcc"] for r in members], "o-", color=color, label=label)
            ax.plot(x, [r["pwmcc_subspace"] for r in members], "x--", color=color, lw=1)
            ax.plot(x, [r["pwmcc_isotropic"] for r in members], "+:", color=color, lw=1)
        ax.set(xlabel=x_name, ylabel="decoder PWMCC", ylim=(0, 1.02),
               title=f"stability vs {x_name.split()[0]}\n(x--: subspace baseline, +: isotropic baseline)")
        if series:
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no groups", ha="center", transform=ax.transAxes)
    name = "stability-vs-width-k.png"
    finish(fig, folder / name)
    return name


def plot_transformers(sources: dict, folder: Path) -> dict[str, dict]:
    """Each transformer's grokking curve (from log.jsonl beside it) and embedding Fourier spectrum."""
    out = {}
    for i, (transformer_id, source) in enumerate(sorted(sources.items())):
        model = source.model
        shares, keys = embedding_spectrum(model.W_E[:model.cfg.p])
        entry = {"key_frequencies": keys, "embedding_frequency_shares": [round(float(s), 6) for s in shares],
                 "figures": {}}
        log_path = Path(source.path).parent / "log.jsonl"
        if log_path.is_file():
            log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            entry["final"] = {k: log[-1][k] for k in ("epoch", "train_acc", "test_acc", "train_loss", "test_loss")
                              if k in log[-1]}
            entry["figures"]["curves"] = f"transformer{i}-curves.png"
            save_figure(folder / entry["figures"]["curves"],
                        lambda handle: plot_training_curves(log, handle, title=f"{model.cfg.op} mod {model.cfg.p}"))
        else:
            entry["final"] = None
        entry["figures"]["spectrum"] = f"transformer{i}-fourier.png"
        save_figure(folder / entry["figures"]["spectrum"],
                    lambda handle: plot_fourier_spectrum(entry["embedding_frequency_shares"], keys, handle))
        out[transformer_id] = entry
    return out


# --------------------------------------------------------------------------------------------------
# The report


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_ci(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['ci'][0]:.{digits}f}, {stat['ci'][1]:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def rounded(value):
    """JSON-ready: floats to 6 decimals (so float noise below that never changes the file), NaN -> null."""
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


CHOICES = [
    ("signed vs \\|cos\\|", "signed cosine is primary (latents are non-negative, so direction sign is meaningful); "
                           "\\|cos\\| is a check on the max-based scores (PWMCC), where one-to-one matching would "
                           "double the cost"),
    ("decoder vs encoder", "both: decoder rows and encoder columns, each normalised to unit length"),
    ("dead latents", "all latents and alive-only (alive = fires on at least one of the dataset's inputs); "
                     "baselines for alive-only numbers have the same number of atoms as the trained SAE has alive"),
    ("max-matching vs Hungarian", "both, named apart: PWMCC/MMCS are max-based (a latent may be reused); the "
                                  "Hungarian mean cosine is one-to-one (scipy linear_sum_assignment), skipped above "
                                  f"HUNGARIAN_MAX_LATENTS = {HUNGARIAN_MAX_LATENTS} latents"),
    ("width mismatch", "none: stability is only computed between SAEs of the same configuration, hence width"),
    ("baseline", "isotropic, N(0, Sigma_x), principal subspace, and the untrained initialisation; normalised "
                 "scores (S - S_rand) / (1 - S_rand) use the subspace baseline"),
    ("hook and position", "those recorded in each SAE's provenance; activations are recomputed at the `=` position"),
    ("activation normalisation", "none here: saved weights are in raw activation units and cosines ignore scale; "
                                 "the training-time setting (`normalize`) is listed per group"),
    ("key frequencies K", f"embedding Fourier share >= {KEY_FREQUENCY_MIN_SHARE} (sae_core.embedding_spectrum), "
                          "recomputed from the embedding of the exact checkpoint analysed"),
    ("tau", "shared-fraction threshold; the curve over tau is in report.json and the stability figures"),
    ("number of seeds", f"{RECOMMENDED_SEEDS} or more recommended; confidence intervals resample seeds "
                        f"({BOOTSTRAP_RESAMPLES} resamples, {CI_LEVEL:.0%} percentile), never the list of pairs"),
    ("data order", "per group: the `vary_data_order` and `data_seed` settings below"),
    ("purity threshold", f"a latent is Fourier-pure at purity >= {PURE_LATENT} (the neuron rule of Nanda et al.)"),
]


DEFINITIONS = """## What the numbers are

Cosines C = A B^T between the unit-normalised latent directions of two SAEs A and B (decoder rows; the
same again on encoder columns). Scores are averaged over every pair of seeds of a configuration.

- **MMCS(A -> B)** = (1/m_A) sum_i max_j C_ij (Sharkey et al. 2022), reported both ways.
- **PWMCC** (max-based) = (MMCS(A -> B) + MMCS(B -> A)) / 2. A latent may be matched more than once,
  so PWMCC >= the Hungarian score.
- **Hungarian mean cosine** (one-to-one): the assignment maximising the total cosine, mean cosine over
  matched pairs. (Song et al. 2025 call this PW-MCC; it is kept apart from PWMCC here.)
- **Shared fraction at tau = {tau}** (Paulo & Belrose 2025): a latent is shared when its Hungarian
  partner has cosine > tau under both the decoder and the encoder matching (two separate matchings).
- **Confidence intervals**: {ci} percentile intervals from {resamples} resamples of the seeds (the pair
  mean is recomputed over distinct resampled seeds; pairs share seeds, so they are not independent
  samples). Written `mean [low, high]`.
- **Baselines**, computed by the same code on dictionaries of the same shape ({dictionaries} dictionaries
  each, so {pairs} pair(s); fixed generator seeds in report.json):
{baselines}
- **Normalised** = (S - S_subspace) / (1 - S_subspace): 0 = no more alike than random directions in the
  activations' own subspace, 1 = identical.
- **Fourier purity** of a latent: its activation over all p^2 inputs (a, b), centred, 2-D Fourier
  transform A_hat = F A F^T; the share of energy in the 3x3 block {{const, cos_k, sin_k}}^2 (minus
  const x const) of the best frequency k (sae_core.fourier_purity). Pure: >= {pure}.
- **Key frequencies K**: see each transformer below.
- **Coverage** of key frequency k: the centred activations projected on the input patterns
  cos(w_k (a+b)) and sin(w_k (a+b)) give a plane in activation space; the principal angles between it
  and the span of the decoder rows of the alive latents whose best frequency is k; coverage = mean
  squared cosine of the two angles (1 = the plane is spanned). Baselines: for purity, random directions
  r (subspace baseline) read out as latents relu((x - mean) . r); for coverage, the span of as many
  random directions as latents are assigned to k (a span grows with its number of vectors).
- **FVU** = sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all inputs (sae_core.fvu, centred); L0 =
  mean active latents per input; dead = never fires on the dataset. Downstream accuracy is as recorded
  by train_sae.py (reconstruction spliced in at the hook).
"""


def write_report(report: dict, path: Path) -> None:
    """report.md: written from report.json's numbers only, so the two never disagree."""
    s = report["settings"]
    lines = ["# HUSAI analysis: cross-seed stability of SAE latents and the transformer's Fourier features", "",
             f"Generated by `{report['command']}` from the files listed below; rerunning it on the same files "
             "gives this report again, byte for byte.", ""]

    lines += DEFINITIONS.format(tau=s["tau"], ci=f"{CI_LEVEL:.0%}", resamples=BOOTSTRAP_RESAMPLES,
                                dictionaries=BASELINE_DICTIONARIES,
                                pairs=BASELINE_DICTIONARIES * (BASELINE_DICTIONARIES - 1) // 2,
                                baselines="\n".join(f"  - *{kind}*: {what}" for kind, what in BASELINES.items()),
                                pure=PURE_LATENT).split("\n")

    lines += ["## Choices that change the numbers", ""]
    lines += table(["choice", "here"], [[c, w] for c, w in CHOICES])
    listed = ", ".join(f"{k} = {v}" for k, v in s.items() if k not in ("generator_seeds", "tau_grid"))
    lines += ["", "Settings: " + listed
              + f"; generator seeds {s['generator_seeds']}.", ""]

    lines += ["## Inputs", ""]
    lines += [f"- {len(report['groups'])} configuration group(s) from {sum(len(g['files']) for g in report['groups'])} "
              "SAE file(s)."]
    if report["skipped_files"]:
        lines += ["- Skipped files (unreadable or incomplete):"]
        lines += [f"  - {skipped['reason']}" for skipped in report["skipped_files"]]
    if report["refused"]:
        lines += ["- Comparisons refused:"] + [f"  - {r}" for r in report["refused"]]
    if report["failed_groups"]:
        lines += ["- Groups that could not be analysed:"]
        lines += [f"  - {failed['name']}: {failed['reason']}" for failed in report["failed_groups"]]
    lines += [""]

    for transformer_id, t in report["transformers"].items():
        lines += [f"## Transformer {transformer_id}", "",
                  f"Key frequencies K = {t['key_frequencies']} (rule: embedding Fourier share >= "
                  f"{KEY_FREQUENCY_MIN_SHARE}).",
                  ""]
        if t["final"]:
            final = t["final"]
            lines += [f"Last logged epoch {final.get('epoch')}: train accuracy {fmt(final.get('train_acc'), 4)}, "
                      f"held-out accuracy {fmt(final.get('test_acc'), 4)}, held-out loss "
                      f"{fmt(final.get('test_loss'), 4)}.", "",
                      f"![grokking curve](figures/{t['figures']['curves']})", ""]
        else:
            lines += ["No log.jsonl beside the model: no training curve.", ""]
        lines += [f"![Fourier spectrum](figures/{t['figures']['spectrum']})", ""]

    for g in report["groups"]:
        lines += group_section(g, s)

    if report["comparison"]:
        lines += ["## Comparison across configurations", "",
                  "Stability = decoder PWMCC (signed, all latents), raw and normalised against the subspace baseline; "
                  "Fourier recovery = fraction of alive latents that are pure and on a key frequency (random-direction "
                  "baseline in brackets) and mean coverage of the key-frequency planes. Means over seeds.", ""]
        lines += table(["group", "arch", "width", "sparsity", "seeds", "FVU", "L0", "dead", "acc (SAE)", "PWMCC",
                        "subspace", "normalised", "Hungarian norm.", f"shared@{s['tau']}", "pure & key (baseline)",
                        "coverage (baseline)"],
                       [[r["name"], r["arch"], str(r["width"]), r["sparsity"],
                         str(r["seeds"]), fmt(r["fvu"], 4), fmt(r["l0"], 1), fmt(r["dead_frac"]), fmt(r["acc_sae"], 4),
                         fmt(r["pwmcc"]), fmt(r["pwmcc_subspace"]), fmt(r["pwmcc_normalised"]),
                         fmt(r["hungarian_normalised"]), fmt(r["shared_fraction"]),
                         f"{fmt(r['frac_pure_key'])} ({fmt(r['frac_pure_key_baseline'])})",
                         f"{fmt(r['coverage'])} ({fmt(r['coverage_baseline'])})"]
                        for r in report["comparison"]])
        lines += ["", "Pareto frontier (normalised PWMCC higher, FVU lower; groups with two or more seeds): "
                  + (", ".join(report["pareto"]) or "none (no group has two seeds)") + ".", "",
                  f"![stability vs width and k](figures/{report['comparison_figure']})", ""]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def group_section(g: dict, s: dict) -> list[str]:
    lines = [f"## Group {g['name']}", "",
             f"{g['arch']}, width {g['width']}, {', '.join(f'{k} = {v:g}' for k, v in g['sparsity'].items())}, "
             f"d_in {g['d_in']}, hook {g['hook'] or 'n/a'}, "
             f"checkpoint {g['checkpoint'] if g['checkpoint'] is not None else 'final'}, "
             f"source {g['source']} (sha256 {g['source_sha256'][:12]}). Seeds {g['seeds']}: "
             + ", ".join(g["files"]) + ".", ""]
    shared = g["settings"]["shared"]
    varying = g["settings"]["varying"]
    lines += ["Training settings: " + ", ".join(f"{k} = {shared[k]}" for k in TRAINING_SETTINGS if k in shared)
              + ("; differing between seeds: " + ", ".join(f"{k} = {v}" for k, v in varying.items()) if varying else "")
              + ".", ""]
    if g["notes"]:
        lines += ["Notes:"] + [f"- {n}" for n in g["notes"]] + [""]
    acts = g["activations"]
    lines += [f"Activations: {acts['n']} inputs x d = {acts['d']}; {SUBSPACE_VARIANCE:.0%} of their variance lies in "
              f"r = {acts['subspace_rank']} principal directions. Share of a unit decoder row's squared length inside "
              f"that subspace: {fmt_ci(acts['decoder_in_subspace'])}; of a unit encoder column's: "
              f"{fmt_ci(acts['encoder_in_subspace'])}; of an isotropic random direction: r / d = "
              f"{fmt(acts['subspace_rank'] / acts['d'])}.", ""]
    lines += ["### Reconstruction", ""]
    lines += table(["seed", "FVU", "L0", "dead", "acc clean", "acc SAE", "loss recovered (zero)", "(mean)"],
                   [[str(r["seed"]), fmt(r["fvu"], 4), fmt(r["l0"], 1), fmt(r["dead_frac"]), fmt(r["acc_clean"], 4),
                     fmt(r["acc_sae"], 4), fmt(r["loss_recovered_zero"]), fmt(r["loss_recovered_mean"])]
                    for r in g["per_seed"]])
    lines += [""]

    if g["stability"]:
        kinds = list(g["baselines"])
        lines += ["### Stability across seeds", "",
                  "Trained: mean over seed pairs [CI]. Baselines: means over their pairs. Normalised against the "
                  "subspace baseline. MMCS, averaged over both directions, is PWMCC; each direction is in the matrix "
                  "below (all variants and baselines' means in report.json).", ""]
        rows = []
        for variant, scores in g["stability"].items():
            for name, label in SCORES.items():
                if scores[name] is None and not VARIANTS[variant].hungarian:
                    continue   # the |cos| check is max-based only
                label = label.replace("at tau", f"at tau = {s['tau']}")
                rows.append([label, variant, fmt_ci(scores[name])]
                            + [fmt((g["baselines"][k][variant][name] or {}).get("mean")) for k in kinds]
                            + [fmt(g["normalised"][variant][name])])
        lines += table(["score", "variant", "trained"] + kinds + ["normalised"], rows)
        seeds = g["seeds"]
        matrix = g["pair_matrices"][PRIMARY]["decoder.mmcs"]
        lines += ["", "MMCS(row seed -> column seed), decoder, signed, all latents:", ""]
        lines += table(["seed"] + [str(x) for x in seeds],
                       [[str(a)] + ["-" if i == j else fmt(matrix[i][j]) for j in range(len(seeds))]
                        for i, a in enumerate(seeds)])
        lines += ["", verdict(g), "", f"![stability](figures/{g['figures']['stability']})", ""]

    if g["reruns"]:
        lines += ["### One seed trained twice", "",
                  "Files of the same seed and configuration found in different folders, compared the way a pair "
                  "of seeds is (signed, all latents). Where their bits differ, rounding alone (another thread count, "
                  "machine or library version) moved the run this far: no cross-seed score above can be read as "
                  "more stable than this.", ""]
        lines += table(["seed", "files", "identical bits"] + [SCORES[name] for name in SCORES],
                       [[str(r["seed"]), " and ".join(r["files"]), "yes" if r["identical"] else "no"]
                        + [fmt(r[name]) for name in SCORES] for r in g["reruns"]])
        lines += [""]

    gt = g["ground_truth"]
    if gt:
        lines += ["### Fourier ground truth", "",
                  f"Key frequencies of {gt['transformer']}: K = {gt['key_frequencies']}; rule: "
                  f"{gt['key_frequency_rule']}.", ""]
        b = gt["baseline"]
        lines += table(["quantity", "trained (mean over seeds [CI])", "random directions"],
                       [["alive latents that are Fourier-pure", fmt_ci(gt["frac_pure"]), fmt(b["frac_pure"])],
                        ["alive latents pure AND on a key frequency", fmt_ci(gt["frac_pure_key"]),
                         fmt(b["frac_pure_key"])],
                        ["mean coverage of the key-frequency planes", fmt_ci(gt["coverage"]), fmt_ci(b["coverage"])]])
        lines += ["", "Per key frequency (latents assigned = alive latents whose best frequency is k):", ""]
        lines += table(["k", "variance share of its plane", "latents assigned", "coverage",
                        "as many random directions: coverage"],
                       [[str(k), fmt(gt["plane_variance_share"][k]), fmt_ci(v["latents"], 1), fmt_ci(v["coverage"]),
                         fmt_ci(v["baseline_coverage"])] for k, v in gt["per_frequency"].items()])
        c = gt["match_vs_purity"]
        if c:
            p_value = ("n/a" if c["p_value"] is None else f"{c['p_value']:.2g}" if c["p_value"] > 0
                       else "< 1e-300")   # below float range: spearmanr returns 0
            lines += ["", f"Are the stable latents the Fourier-pure ones? Over {c['latents']} alive latents "
                      "(all seeds), Spearman correlation between a latent's cross-seed match (mean over the other "
                      f"seeds of its best decoder cosine) and its purity: rho = {fmt(c['spearman'])} "
                      f"(p = {p_value}). "
                      f"Pure among latents with match > {s['tau']}: {fmt(c['frac_pure_if_stable'])} "
                      f"({c['latents_if_stable']} latents); with match <= {s['tau']}: "
                      f"{fmt(c['frac_pure_if_unstable'])} "
                      f"({c['latents_if_unstable']} latents)."]
        lines += ["", f"![purity](figures/{g['figures']['purity']})", ""]

    if g["dynamics"]:
        lines += ["### Training dynamics", "", g["dynamics"]["what"] + "; baselines (subspace / isotropic) do not "
                  "depend on the step: decoder " + fmt(g["baselines"]["subspace"][PRIMARY]["decoder.pwmcc"]["mean"])
                  + " / " + fmt(g["baselines"]["isotropic"][PRIMARY]["decoder.pwmcc"]["mean"]) + ".", ""]
        lines += table(["step", "decoder PWMCC", "encoder PWMCC", "FVU"],
                       [[str(r["step"]), fmt_ci(r["decoder.pwmcc"]), fmt_ci(r["encoder.pwmcc"]),
                         fmt(r["fvu"]["mean"], 4)]
                        for r in g["dynamics"]["steps"]])
        lines += ["", f"![dynamics](figures/{g['figures']['dynamics']})", ""]
    return lines


def verdict(g: dict) -> str:
    """One sentence per headline score, each with its numbers: above the subspace baseline or not."""
    sentences = []
    for name, label in HEADLINES.items():
        score, base = g["stability"][PRIMARY][name], g["baselines"]["subspace"][PRIMARY][name]
        if score is None or base is None:
            continue
        above = score["ci"][0] > base["mean"]
        sentences.append(f"{label}: {fmt_ci(score)} vs subspace baseline "
                         f"{fmt(base['mean'])} -> {'above' if above else 'NOT above'} the baseline "
                         f"(normalised {fmt(g['normalised'][PRIMARY][name])}).")
    return "Headline (decoder, signed, all latents): " + " ".join(sentences)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    args = build_parser().parse_args()
    if not 0 <= args.tau < 1:
        raise HusaiError(f"--tau {args.tau}: must lie in [0, 1)")
    device = pick_device(args.device)
    paths = find_sae_files(args.inputs)
    out = Path(args.out)
    for name in ("report.md", "report.json"):
        prepare_output(out / name, args.force)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)

    files, skipped = read_sae_files(paths)
    for s in skipped:
        print(f"skipped: {s['reason']}")
    if not files:
        raise HusaiError(f"none of the {len(skipped)} SAE file(s) could be read: {skipped[0]['reason']}")
    groups, refused = group_files(files)

    cache, results, failed = {}, [], []
    for group in groups:
        try:
            source = load_source(group, cache)
            if source.X.shape[1] != group.key.d_in:
                raise HusaiError(f"the SAEs have d_in {group.key.d_in} but the activations have "
                                 f"d = {source.X.shape[1]}")
        except HusaiError as e:
            failed.append({"name": group.name, "reason": str(e)})
            print(f"group {group.name}: not analysed: {e}")
            continue
        print(f"group {group.name}: {len(group.files)} seed(s)")
        result, plots = analyse_group(group, source, device, args.tau)
        result["figures"] = plot_group(result, plots, figures)
        results.append(result)
    if not results:
        raise HusaiError(f"no group could be analysed: {failed[0]['name']}: {failed[0]['reason']}")

    transformers = {s.transformer_id: s for s in cache.values() if s.model is not None}
    rows, pareto = comparison(results)
    report = {
        "command": " ".join(["python analyze.py", *args.inputs] + [f"--tau {args.tau}"] * (args.tau != SHARED_TAU)),
        "settings": {"tau": args.tau, "tau_grid": list(TAU_GRID), "pure_latent": PURE_LATENT,
                     "subspace_variance": SUBSPACE_VARIANCE, "hungarian_max_latents": HUNGARIAN_MAX_LATENTS,
                     "baseline_dictionaries": BASELINE_DICTIONARIES, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                     "ci_level": CI_LEVEL, "generator_seeds": GENERATOR_SEEDS},
        "choices": dict(CHOICES), "skipped_files": skipped, "refused": refused, "failed_groups": failed,
        "transformers": plot_transformers(transformers, figures),
        "groups": results, "comparison": rows, "pareto": pareto,
        "comparison_figure": plot_comparison(rows, figures),
    }
    report = rounded(report)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    write_report(report, out / "report.md")
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and the figures in {figures}")


if __name__ == "__main__":
    run_cli(main)
