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
The report folder is written beside --out and moved into place whole (sae_core.RunOutput): --force
replaces an earlier report entirely (no figure of it survives), and a second analysis writing to the same
place at the same time is refused. SAE files with a non-finite tensor or metric are skipped and listed.
The same files give the same report byte for byte: nothing reads the clock, every random draw has a
recorded fixed seed, and files, groups and seeds are visited in sorted order (the report is the same with
any number of threads; on a CPU that other jobs keep busy, OMP_NUM_THREADS=1 is the faster setting).

The file reads top to bottom as the run goes: settings and the table of stability scores (SCORES), then
what is computed, then how the inputs are loaded, then how the report and figures are rendered, then
main(). A stability score is one function plus one entry in SCORES; the report's tables, definitions,
comparison, dynamics and figures all read that table. The other metrics are one function each, here or
in sae_core (Fourier basis, purity, FVU, SAE inference), used by the trained SAEs and by their baselines
alike.
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

from sae_core import (ARCHITECTURES, KEY_FREQUENCY_MIN_SHARE, PURE_NEURON_THRESHOLD, RUN_DIR, SAE_VERSION,
                      SNAPSHOT_FORMAT, CliParser, HusaiError, RunOutput, atomic_write, embedding_spectrum, file_sha256,
                      fourier_purity, load_sae, load_tensors, non_finite_tensors, pick_device, reconstruction_metrics,
                      run_cli, sae_latents, snapshot_file_name, sum_frequency_directions)
from train_transformer import activations_from, plot_fourier_spectrum, plot_training_curves, training_log_path

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
KEY_FREQUENCY_RULE = (f"embedding Fourier share >= {KEY_FREQUENCY_MIN_SHARE} "
                      f"({embedding_spectrum.__module__}.{embedding_spectrum.__name__})")

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
PRIMARY_VARIANT = "signed, all latents"
TRAINING_SETTINGS = ("steps", "batch_size", "lr", "normalize", "data_seed", "vary_data_order")   # shown per group
DOWNSTREAM = ("acc_clean", "acc_sae", "loss_recovered_zero", "loss_recovered_mean")   # as train_sae.py recorded
SAE_FILE = re.compile(r"seed(\d+)\.safetensors")   # not seedN.snapshots.safetensors, not last-good-*
DEFAULT_INPUTS = "runs/sae/*/seed*.safetensors"
TRAIN_COMMAND = "python train_sae.py --arch topk --seeds 0 1 2 3 4"

# --------------------------------------------------------------------------------------------------
# The stability scores of a pair of dictionaries. A new score is its function (in the next part, beside
# the others) plus one entry in SCORES: the entry alone puts it in report.json and in every table,
# sentence and figure that its fields name.

VIEWS = {"decoder": "decoder rows", "encoder": "encoder columns"}   # each dictionary is compared both ways
PRIMARY_VIEW = "decoder"   # the view of the headline, the comparison across groups and the trends figure
SECTIONS = {
    "headline": "the group's verdict: one sentence against the subspace baseline (primary view)",
    "dynamics": "stability at every snapshot step: table, figure and report.json (scores without matching)",
    "trends": "the figure of stability against width, k and penalty (primary view; its comparison statistics "
              "must include trained, subspace and isotropic)",
}
COMPARISON_STATISTICS = ("trained", *BASELINES, "normalised")   # a baseline's statistic is its mean score


class Score(NamedTuple):
    """One stability score and where the report shows it. Every score that is not directional is also in
    the group's stability table (each variant, beside its baselines, normalised), in the reruns table, and
    in report.json's summaries; every score's per-pair matrix is in report.json."""
    key: str                # report.json name, after "decoder." or "encoder." for a score of one view
    label: str              # report.md name; "{tau}" stands for the threshold
    short: str              # shorter name: headline, comparison, dynamics and figures
    digits: int             # decimals in report.md
    definition: str         # its line in report.md's definitions ("{tau}" allowed)
    compute: Callable       # (PairMatches, view or None, tau) -> the score; tau may be an array (then a curve)
    views: tuple[str, ...] = tuple(VIEWS)   # (): one number that reads both views
    one_to_one: bool = False                # needs the Hungarian matchings (none for |cos| or above the limit)
    directional: bool = False               # compute returns (A -> B, B -> A): a per-pair matrix, shown seed by seed
    sections: frozenset[str] = frozenset()  # among SECTIONS
    comparison: tuple[str, ...] = ()        # among COMPARISON_STATISTICS: columns of the comparison across groups
    curve: str | None = None                # report.json name of its curve over TAU_GRID, drawn in the stability figure


SCORES = (
    Score("mmcs", "MMCS", "MMCS", 3,
          "**MMCS(A -> B)** = (1/m_A) sum_i max_j C_ij (Sharkey et al. 2022), reported both ways.",
          lambda pair, view, tau: (mmcs(pair.best[view].best_a), mmcs(pair.best[view].best_b)), directional=True),
    Score("pwmcc", "PWMCC (max-based)", "PWMCC", 3,
          "**PWMCC** (max-based) = (MMCS(A -> B) + MMCS(B -> A)) / 2. A latent may be matched more than once, so "
          "PWMCC >= the Hungarian score.",
          lambda pair, view, tau: pwmcc(pair.best[view]),
          sections=frozenset({"headline", "dynamics", "trends"}),
          comparison=("trained", "subspace", "isotropic", "normalised")),
    Score("hungarian", "Hungarian mean cosine (one-to-one)", "Hungarian mean cosine", 3,
          "**Hungarian mean cosine** (one-to-one): the assignment maximising the total cosine, mean cosine over "
          "matched pairs. (Song et al. 2025 call this PW-MCC; it is kept apart from PWMCC here.)",
          lambda pair, view, tau: hungarian_mean_cosine(pair.matchings[view]),
          one_to_one=True, sections=frozenset({"headline"}), comparison=("normalised",)),
    Score("shared_fraction", "shared fraction at tau = {tau} (Hungarian, decoder AND encoder)", "shared fraction", 3,
          "**Shared fraction at tau = {tau}** (Paulo & Belrose 2025): a latent is shared when its Hungarian partner "
          "has cosine > tau under both the decoder and the encoder matching (two separate matchings).",
          lambda pair, view, tau: shared_fraction(pair.matchings["decoder"], pair.matchings["encoder"], tau),
          views=(), one_to_one=True, sections=frozenset({"headline"}), comparison=("trained",),
          curve="shared_curve"),
)
PARETO_SCORE = "pwmcc"   # its normalised value (primary view) is the stability axis of the Pareto frontier


class ScoreName(NamedTuple):
    """One number of a score: the score for one view (or for both, when it reads both)."""
    name: str               # report.json key: "decoder.pwmcc", "shared_fraction"
    score: Score
    view: str | None


def places(score: Score) -> set[str]:
    """Where a score appears: "directional" or "group" (the stability table, reruns and summaries), its
    SECTIONS, and "comparison" when it has comparison statistics."""
    return ({"directional" if score.directional else "group"} | set(score.sections)
            | ({"comparison"} if score.comparison else set()))


def score_names(where: str) -> list[ScoreName]:
    """The numbers shown `where` (a place of places(), or "all": the group's scores, then the directional
    ones), in a fixed order: view by view, then the scores that read both views. The headline, the
    comparison and the trends figure show the primary view only."""
    if where == "all":
        return score_names("group") + score_names("directional")
    views = [PRIMARY_VIEW] if where in ("headline", "comparison", "trends") else list(VIEWS)
    chosen = [score for score in SCORES if where in places(score)]
    return ([ScoreName(f"{view}.{score.key}", score, view) for view in views for score in chosen if view in score.views]
            + [ScoreName(score.key, score, None) for score in chosen if not score.views])


def comparison_key(score: Score, statistic: str) -> str:
    """The comparison row's key for one statistic of a score: "pwmcc", "pwmcc_subspace", ..."""
    return score.key if statistic == "trained" else f"{score.key}_{statistic}"


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 3: cross-seed stability of SAE latents, against baselines and the "
                                   "transformer's Fourier features.")
    add = parser.add_argument
    add("inputs", nargs="*", help=f"SAE files, folders or globs (default: {DEFAULT_INPUTS})")
    add("--out", default="runs/analysis", help="folder for report.md, report.json and figures/")
    add("--tau", type=float, default=SHARED_TAU, help="matched cosine above which a latent counts as shared")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where SAE latents, purity and the max-cosine blocks are computed (auto: the GPU when there is one)")
    add("--force", action="store_true", help="replace an existing report in --out, whole")
    return parser


# ==================================================================================================
# COMPUTE
# --------------------------------------------------------------------------------------------------
# Stability: how alike two dictionaries are. A dictionary is m latent directions in activation space.


class Dictionary(NamedTuple):
    """One SAE's latents: decoder rows and encoder columns, each as unit rows [m, d], and which latents
    fire on the dataset (alive [m], bool)."""
    decoder: torch.Tensor
    encoder: torch.Tensor
    alive: torch.Tensor


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows [m, d] scaled to unit length (cosines are then plain dot products)."""
    rows = rows.float()
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def make_dictionary(W_dec: torch.Tensor, W_enc: torch.Tensor, alive: torch.Tensor) -> Dictionary:
    """From SAELens-shaped weights W_dec [m, d] and W_enc [d, m]."""
    return Dictionary(unit_rows(W_dec), unit_rows(W_enc.T), alive.bool().cpu())


def read_dictionary(sae_file: SAEFile, acts: torch.Tensor, device: torch.device) -> tuple[Dictionary, torch.Tensor,
                                                                                           dict]:
    """One SAE file's dictionary (alive = fires on some row of acts [N, d]), its latents on acts [N, m] and
    its weights on the device."""
    weights = {name: t.to(device) for name, t in sae_file.tensors.items()}
    with torch.no_grad():
        latents = sae_latents(weights, sae_file.config, acts)
    dictionary = make_dictionary(sae_file.tensors["W_dec"], sae_file.tensors["W_enc"], (latents > 0).any(dim=0))
    return dictionary, latents, weights


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


class PairMatches(NamedTuple):
    """What every score of one pair of dictionaries is computed from, per view."""
    best: dict[str, MaxCosine]        # view -> the best cosines both ways
    matchings: dict[str, Matching]    # view -> the one-to-one matching; empty when none was made


def compare_pair(a: Dictionary, b: Dictionary, variant: Variant, device: torch.device,
                 tau: float) -> tuple[dict, MaxCosine | None]:
    """Every score of SCORES for one pair of SAEs, under its report.json name, and the curves over TAU_GRID
    of the scores that have one. Returns (scores, the decoder MaxCosine); a score is absent where the pair
    has no latents to compare, or where it needs the one-to-one matching and the variant has none or m is
    too large for Hungarian."""
    if variant.alive_only:
        a = Dictionary(a.decoder[a.alive], a.encoder[a.alive], a.alive[a.alive])
        b = Dictionary(b.decoder[b.alive], b.encoder[b.alive], b.alive[b.alive])
    if not len(a.alive) or not len(b.alive):
        return {}, None
    one_to_one = variant.hungarian and max(len(a.alive), len(b.alive)) <= HUNGARIAN_MAX_LATENTS
    best = {view: max_cosine(getattr(a, view), getattr(b, view), variant.absolute, device) for view in VIEWS}
    matchings = ({view: hungarian_match(getattr(a, view), getattr(b, view), variant.absolute) for view in VIEWS}
                 if one_to_one else {})
    pair = PairMatches(best, matchings)
    scores = {name: score.compute(pair, view, tau) for name, score, view in score_names("all")
              if one_to_one or not score.one_to_one}
    for score in SCORES:
        if score.curve and (one_to_one or not score.one_to_one):
            scores[score.curve] = score.compute(pair, PRIMARY_VIEW if score.views else None, np.array(TAU_GRID))
    return scores, best["decoder"]


def stability(dictionaries: list[Dictionary], device: torch.device, tau: float,
              variants: dict[str, Variant] = VARIANTS) -> dict:
    """compare_pair on every pair of seeds (i < j), for each variant, pairs side by side on the CPU's
    threads (scipy's matching releases the GIL; the results do not depend on the order). Returns
        scores[variant][name]   [S, S] matrix per score name (directional: entry (i, j) is i -> j; the others
                                symmetric), [S, S, len(TAU_GRID)] per curve; the diagonal is NaN
        latent_match            per seed [m]: each latent's best decoder cosine in another seed (signed, all
                                latents), averaged over the other seeds
        first_pair              the decoder MaxCosine of seeds 0 and 1 (signed, all latents), for a heat map
    Variants that coincide (alive-only when no latent is dead) are computed once."""
    S = len(dictionaries)
    everything_alive = all(bool(dictionary.alive.all()) for dictionary in dictionaries)
    directional = {name for name, _, _ in score_names("directional")}
    curves = [score.curve for score in SCORES if score.curve]
    computed, scores = {}, {}
    latent_match = [torch.zeros(len(dictionary.alive), dtype=torch.float64) for dictionary in dictionaries]
    first_pair = None
    pairs = list(combinations(range(S), 2))
    for name_of_variant, variant in variants.items():
        effective = variant._replace(alive_only=variant.alive_only and not everything_alive)
        if effective in computed:
            scores[name_of_variant] = computed[effective]
            continue
        matrices = ({name: np.full((S, S), np.nan) for name, _, _ in score_names("all")}
                    | {curve: np.full((S, S, len(TAU_GRID)), np.nan) for curve in curves})
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
                if name in directional:
                    matrices[name][i, j], matrices[name][j, i] = value
                else:
                    matrices[name][i, j] = matrices[name][j, i] = value
            if not effective.absolute and not effective.alive_only:
                latent_match[i] += best.best_a.double()
                latent_match[j] += best.best_b.double()
                if (i, j) == (0, 1):
                    first_pair = best
        computed[effective] = scores[name_of_variant] = matrices
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


def mean_curve(curve: np.ndarray) -> list[float] | None:
    """A curve's mean over the pairs of seeds, from [S, S, len(TAU_GRID)]; None when a pair lacks it."""
    off_diagonal = ~np.eye(len(curve), dtype=bool)
    if np.isnan(curve[off_diagonal]).any() or not off_diagonal.any():
        return None
    return curve[off_diagonal].mean(axis=0).tolist()


def normalised(score: dict | None, baseline: dict | None) -> float | None:
    """(S - S_rand) / (1 - S_rand): 0 at the baseline, 1 at perfect agreement."""
    if score is None or baseline is None or baseline["mean"] >= 1:
        return None
    return (score["mean"] - baseline["mean"]) / (1 - baseline["mean"])


def summarise(result: dict) -> dict:
    """stability()'s matrices -> {variant: {score name: mean and CI, curve name: mean per tau}}."""
    summary = {}
    for variant, matrices in result["scores"].items():
        summary[variant] = {name: mean_and_ci(matrices[name]) for name, _, _ in score_names("group")}
        summary[variant] |= {score.curve: mean_curve(matrices[score.curve]) for score in SCORES if score.curve}
    return summary


# --------------------------------------------------------------------------------------------------
# Baselines: dictionaries of the same shape, from random directions or the untrained initialisation.


class ActivationGeometry(NamedTuple):
    """The shape of the activations' distribution that the random baselines copy."""
    eigenvalues: torch.Tensor   # [d] of the covariance, descending (float64)
    eigenvectors: torch.Tensor  # [d, d] columns, same order
    rank: int                   # principal directions holding SUBSPACE_VARIANCE of the variance


def activation_geometry(acts: torch.Tensor) -> ActivationGeometry:
    """Covariance spectrum and the SUBSPACE_VARIANCE rank of activations acts [N, d]."""
    acts = acts.double()
    mean = acts.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh((acts - mean).T @ (acts - mean) / len(acts))
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


def latent_purity(latents: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier purity and best frequency of every latent from its activations latents [p*p, m] on all
    inputs (row a*p + b): sae_core.fourier_purity on the [p, p] grid, PURITY_CHUNK latents at a time."""
    grid = latents.reshape(p, p, -1)
    parts = [fourier_purity(grid[:, :, start:start + PURITY_CHUNK])
             for start in range(0, latents.shape[1], PURITY_CHUNK)]
    if not parts:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat([purity for purity, _ in parts]), torch.cat([best for _, best in parts])


def frequency_plane(acts: torch.Tensor, p: int, op: str, k: int) -> tuple[torch.Tensor, float] | None:
    """The plane in activation space that carries frequency k of (a + b) (a - b for sub): the centred
    activations acts [p*p, d] projected on the unit input patterns cos(w_k (a+b)) and sin(w_k (a+b)) give
    two vectors in activation space. Returns (orthonormal basis [d, 2], share of the activations' variance
    in those two patterns), or None where the operation has no such plane (mul)."""
    patterns = sum_frequency_directions(p, op, [k])
    if patterns is None:
        return None
    centred = (acts - acts.mean(dim=0)).double()
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


def fourier_setup(model, acts: torch.Tensor, geometry: ActivationGeometry, m: int) -> FourierSetup:
    """Key frequencies, their planes in activation space, and the random directions of the baselines."""
    p = model.cfg.p
    keys = embedding_spectrum(model.W_E[:p])[1]
    planes = {k: plane for k in keys if (plane := frequency_plane(acts, p, model.cfg.op, k)) is not None}
    random_rows = unit_rows(random_directions("subspace", m, geometry, GENERATOR_SEEDS["random_latents"]))
    return FourierSetup(p, keys, planes, random_rows)


def fourier_recovery(latents: torch.Tensor, decoder: torch.Tensor, fourier: FourierSetup) -> dict:
    """Ground-truth numbers for one dictionary: latents [p*p, m] on all inputs, decoder rows [m, d].
    Per alive latent, its purity and best frequency; the fraction of alive latents that are pure
    (>= PURE_LATENT) and the fraction pure AND on a key frequency; per key frequency k, the principal-angle
    cosines between k's plane and the span of the decoder rows of the alive latents whose best
    frequency is k, their coverage, and the coverage of as many of the random directions (the baseline:
    a span grows with its number of vectors)."""
    alive = (latents > 0).any(dim=0)
    purity, best = torch.zeros(latents.shape[1]), torch.zeros(latents.shape[1], dtype=torch.long)
    alive_purity, alive_best = latent_purity(latents[:, alive], fourier.p)
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


def random_direction_latents(acts: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The baseline's latents: relu((x - mean x) . r) for each row x of acts [N, d] and unit random
    directions r [m, d] -> [N, m], a readout that fires on half the inputs, like a latent with its bias at
    the mean."""
    return torch.relu((acts - acts.mean(dim=0)) @ unit_rows(directions).T)


def match_purity_correlation(latent_match: list[torch.Tensor], recovery: list[dict], tau: float) -> dict:
    """Are the stable latents the Fourier-pure ones? Over the alive latents of all seeds of a group:
    Spearman correlation between a latent's cross-seed match (stability()'s latent_match) and its
    purity, and the fraction pure among latents with match > tau vs <= tau."""
    alive = torch.cat([r["alive"] for r in recovery])
    match = torch.cat(latent_match)[alive].numpy()
    purity = torch.cat([r["purity"] for r in recovery])[alive].double().numpy()
    result = {"latents": int(alive.sum()), "spearman": None, "p_value": None}
    if len(match) > 2 and np.ptp(match) > 0 and np.ptp(purity) > 0:
        rho, p_value = spearmanr(match, purity)
        result.update(spearman=float(rho), p_value=float(p_value))
    for name, chosen in (("frac_pure_if_stable", match > tau), ("frac_pure_if_unstable", match <= tau)):
        result[name] = float((purity[chosen] >= PURE_LATENT).mean()) if chosen.any() else None
        result[name.replace("frac_pure", "latents")] = int(chosen.sum())
    return result


def ground_truth(source: Source, fourier: FourierSetup, recovery: list[dict], baseline: dict,
                 latent_match: list[torch.Tensor] | None, tau: float) -> tuple[dict, dict]:
    """The group's Fourier numbers from each seed's fourier_recovery: means over seeds with CIs beside the
    random-direction baseline, per key frequency, and the match-purity correlation. Returns (numbers for
    report.json, data for the purity figure)."""
    planes, m = fourier.planes, len(fourier.random_rows)
    result = {
        "transformer": source.transformer_id, "p": fourier.p, "op": source.model.cfg.op,
        "key_frequencies": fourier.keys,
        "key_frequency_rule": KEY_FREQUENCY_RULE,
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


# --------------------------------------------------------------------------------------------------
# The analysis of one group, section by section


def analyse_group(group: Group, source: Source, device: torch.device, tau: float) -> tuple[dict, dict]:
    """Everything about one configuration. Returns (numbers for report.json, data for the figures)."""
    result = describe_group(group)
    geometry = activation_geometry(source.acts)
    fourier = (fourier_setup(source.model, source.acts, geometry, group.key.width)
               if source.model is not None else None)
    acts = source.acts.to(device)
    dictionaries, result["per_seed"], recovery = analyse_seeds(group.files, acts, device, fourier)
    result["reconstruction"] = summarise_reconstruction(result["per_seed"])
    result["activations"] = summarise_activations(source.acts, geometry, dictionaries)
    snapshots, snapshot_problem = load_snapshots(group.files)
    if snapshot_problem:
        result["notes"].append(f"{snapshot_problem}; no init baseline and no dynamics")

    plots, latent_match = {}, None
    if len(group.files) < 2:
        result["stability"] = None
        result["notes"].append(f"only one seed ({group.first.seed}): stability needs at least two seeds of one "
                               "configuration")
    else:
        result["notes"] += stability_notes(group)
        initial = snapshots["weights"][0] if snapshots else None
        numbers, plots = analyse_stability(dictionaries, geometry, initial, device, tau)
        result |= numbers
        latent_match = plots["latent_match"]

    result["reruns"] = [rerun_similarity(a, b, acts, device, tau) for a, b in group.reruns]

    if fourier is None:
        result["ground_truth"] = None
        result["notes"].append("activations come from a file, not the (a, b) grid of a transformer: "
                               "no Fourier analysis")
    else:
        baseline = fourier_recovery(random_direction_latents(acts, fourier.random_rows.to(device)),
                                    fourier.random_rows, fourier)
        result["ground_truth"], plots["purity"] = ground_truth(source, fourier, recovery, baseline, latent_match, tau)

    result["latents"] = latent_table(group.files, dictionaries, latent_match, recovery)
    result["dynamics"] = dynamics(snapshots, device, tau) if snapshots is not None and len(group.files) > 1 else None
    return result, plots


def describe_group(group: Group) -> dict:
    """What the group is: its configuration, source, seeds, files, notes so far and training settings."""
    config, provenance = group.first.config, group.first.provenance
    return {"name": group.name, "arch": config["arch"], "width": config["width"], "d_in": config["d_in"],
            "sparsity": dict([sparsity(config)]), "hook": provenance.get("hook"),
            "checkpoint": provenance.get("checkpoint"), "source": source_of(provenance)[1],
            "source_sha256": group.key.sha256, "seeds": [sae_file.seed for sae_file in group.files],
            "files": [str(sae_file.path) for sae_file in group.files], "notes": list(group.notes),
            "settings": settings_of(group.files)}


def settings_of(files: list[SAEFile]) -> dict:
    """The training settings shared by all seeds of a group, and those that differ between seeds."""
    keys = sorted(set().union(*(sae_file.config for sae_file in files)) - {"seed"})
    shared, varying = {}, {}
    for key in keys:
        values = [sae_file.config.get(key) for sae_file in files]
        if all(v == values[0] for v in values):
            shared[key] = values[0]
        else:
            varying[key] = values
    return {"shared": shared, "varying": varying}


def analyse_seeds(files: list[SAEFile], acts: torch.Tensor, device: torch.device,
                  fourier: FourierSetup | None) -> tuple[list[Dictionary], list[dict], list[dict]]:
    """Per seed, on every input acts [N, d]: its dictionary (which latents fire), reconstruction and the
    downstream numbers train_sae.py recorded, and (with a transformer) the latents' Fourier structure.
    One seed's latents [N, m] at a time: at m = 65,536 they take 3 GiB each."""
    dictionaries, per_seed, recovery = [], [], []
    for sae_file in files:
        dictionary, latents, weights = read_dictionary(sae_file, acts, device)
        dictionaries.append(dictionary)
        downstream = {k: sae_file.metrics.get(k) for k in DOWNSTREAM}
        per_seed.append({"seed": sae_file.seed, **reconstruction_metrics(weights, sae_file.config, acts),
                         **downstream})
        if fourier is not None:
            recovery.append(fourier_recovery(latents, dictionary.decoder, fourier))
        del latents   # freed before the next seed's are made
    return dictionaries, per_seed, recovery


def summarise_reconstruction(per_seed: list[dict]) -> dict:
    """Mean and CI over seeds of each per-seed number; None where a seed lacks it."""
    return {name: mean_and_ci(values) if None not in values else None
            for name in per_seed[0] if name != "seed"
            for values in [[row[name] for row in per_seed]]}


def summarise_activations(acts: torch.Tensor, geometry: ActivationGeometry, dictionaries: list[Dictionary]) -> dict:
    """The activations' size and principal rank, and how much of each view's unit rows lies in that subspace."""
    return {"n": len(acts), "d": acts.shape[1], "subspace_rank": geometry.rank,
            **{f"{view}_in_subspace": mean_and_ci([subspace_share(getattr(dictionary, view), geometry)
                                                   for dictionary in dictionaries])
               for view in VIEWS}}


def stability_notes(group: Group) -> list[str]:
    """What limits a group's stability numbers: too few seeds, or too many latents for matching."""
    notes, seeds, width = [], len(group.files), group.key.width
    if seeds < RECOMMENDED_SEEDS:
        notes.append(f"{seeds} seeds: confidence intervals from fewer than {RECOMMENDED_SEEDS} seeds are rough")
    if width > HUNGARIAN_MAX_LATENTS:
        skipped = ", ".join(score.short for score in SCORES if score.one_to_one)
        notes.append(f"width {width} > HUNGARIAN_MAX_LATENTS = {HUNGARIAN_MAX_LATENTS}: Hungarian matching and the "
                     f"scores that need it ({skipped}) are skipped (the dense [m, m] cost matrix would not fit); "
                     "max-based scores are still reported")
    return notes


def analyse_stability(dictionaries: list[Dictionary], geometry: ActivationGeometry, initial: list[dict] | None,
                      device: torch.device, tau: float) -> tuple[dict, dict]:
    """Stability of the trained dictionaries and of each baseline's (init only with snapshots), and the
    trained scores normalised against the subspace baseline. Returns (numbers for report.json, data for
    the figures: the heat maps and each latent's cross-seed match)."""
    trained = stability(dictionaries, device, tau)
    numbers = {"stability": summarise(trained),
               "pair_matrices": {variant: {name: matrices[name].tolist() for name, _, _ in score_names("all")}
                                 for variant, matrices in trained["scores"].items()},
               "baselines": {}, "baseline_generator_seeds": {}}
    heatmaps = {"trained": heatmap_matrix(dictionaries[0], dictionaries[1], trained["first_pair"])}
    for kind in BASELINES:
        if kind == "init" and initial is None:
            continue
        baseline, generator_seeds = baseline_dictionaries(kind, dictionaries, geometry, initial)
        scores = stability(baseline, device, tau)
        numbers["baselines"][kind] = summarise(scores)
        numbers["baseline_generator_seeds"][kind] = generator_seeds
        if kind == "subspace":
            heatmaps["subspace baseline"] = heatmap_matrix(baseline[0], baseline[1], scores["first_pair"])
    numbers["normalised"] = {variant: {name: normalised(summary[name], numbers["baselines"]["subspace"][variant][name])
                                       for name, _, _ in score_names("group")}
                             for variant, summary in numbers["stability"].items()}
    return numbers, {"heatmaps": heatmaps, "latent_match": trained["latent_match"]}


def heatmap_matrix(a: Dictionary, b: Dictionary, best: MaxCosine) -> np.ndarray:
    """FIGURE_LATENTS latents of A, evenly spaced in the order of their best cosine in B (best first),
    against their best partners in B: decoder cosines [n, n] whose diagonal holds each latent's max cosine."""
    order = torch.argsort(best.best_a, descending=True, stable=True)
    chosen = order[torch.linspace(0, len(order) - 1, min(FIGURE_LATENTS, len(order))).long()]
    return (a.decoder[chosen] @ b.decoder[best.index_a[chosen]].T).numpy()


def rerun_similarity(a: SAEFile, b: SAEFile, acts: torch.Tensor, device: torch.device, tau: float) -> dict:
    """Two files of one seed and configuration. Identical bits, or how far apart rounding alone (another
    thread count, machine or library version) carried one training run: the ceiling that no cross-seed
    stability can be read above. Scores as for a pair of seeds (signed, all latents)."""
    scores, _ = compare_pair(read_dictionary(a, acts, device)[0], read_dictionary(b, acts, device)[0],
                             VARIANTS[PRIMARY_VARIANT], device, tau)
    identical = a.tensors.keys() == b.tensors.keys() and all(torch.equal(t, b.tensors[n]) for n, t in a.tensors.items())
    return {"seed": a.seed, "files": [str(a.path), str(b.path)], "identical": identical,
            **{name: scores.get(name) for name, _, _ in score_names("group")}}


def latent_table(files: list[SAEFile], dictionaries: list[Dictionary], latent_match: list[torch.Tensor] | None,
                 recovery: list[dict]) -> list[dict]:
    """Per seed and latent: the numbers behind the histograms and the correlation."""
    return [{"seed": sae_file.seed, "alive": dictionary.alive.int().tolist(),
             "match": latent_match[i].tolist() if latent_match else None,
             "purity": recovery[i]["purity"].tolist() if recovery else None,
             "best_frequency": recovery[i]["best"].tolist() if recovery else None}
            for i, (sae_file, dictionary) in enumerate(zip(files, dictionaries))]


def dynamics(snapshots: dict, device: torch.device, tau: float) -> dict:
    """Stability across seeds at each snapshot step (the scores of the "dynamics" section, signed, all
    latents, without matching: they need no m x m matrix) beside the full-dataset FVU at that step."""
    names = score_names("dynamics")
    variant = {PRIMARY_VARIANT: VARIANTS[PRIMARY_VARIANT]._replace(hungarian=False)}
    rows = []
    for step, weights in snapshots["weights"].items():
        dictionaries = [make_dictionary(w["W_dec"], w["W_enc"], torch.ones(len(w["W_dec"]), dtype=torch.bool))
                        for w in weights]
        matrices = stability(dictionaries, device, tau, variants=variant)["scores"][PRIMARY_VARIANT]
        rows.append({"step": step, **{name: mean_and_ci(matrices[name]) for name, _, _ in names},
                     "fvu": mean_and_ci(snapshots["fvu"][step])})
    scores = " and ".join(dict.fromkeys(score.short for _, score, _ in names))
    return {"what": f"{scores} ({PRIMARY_VARIANT}) and FVU at each snapshot step; step 0 is the initialisation",
            "steps": rows}


# --------------------------------------------------------------------------------------------------
# Across groups


def analyse(inputs: Inputs, device: torch.device, tau: float) -> Analysis:
    """Every group that could be loaded, the comparison across them, and each transformer's spectrum."""
    results, plots = [], []
    for group, source in inputs.groups:
        print(f"group {group.name}: {len(group.files)} seed(s)")
        result, group_plots = analyse_group(group, source, device, tau)
        results.append(result)
        plots.append(group_plots)
    rows, pareto = comparison(results)
    transformers = {s.transformer_id: s for s in inputs.sources.values() if s.model is not None}
    spectra = {transformer_id: describe_transformer(source) for transformer_id, source in sorted(transformers.items())}
    return Analysis(results, plots, rows, pareto, spectra)


def comparison(results: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per group, and the names of the groups on the Pareto frontier of stability (PARETO_SCORE
    normalised, primary view, signed, all latents: higher is better) against FVU (lower is better)."""
    rows = [comparison_row(result) for result in results]
    stability_key = comparison_key(next(s for s in SCORES if s.key == PARETO_SCORE), "normalised")
    candidates = [row for row in rows if row[stability_key] is not None]
    pareto = [row["name"] for row in candidates
              if not any(o[stability_key] >= row[stability_key] and o["fvu"] <= row["fvu"]
                         and (o[stability_key] > row[stability_key] or o["fvu"] < row["fvu"])
                         for o in candidates)]
    return rows, pareto


def comparison_row(result: dict) -> dict:
    """A group in one row: configuration, reconstruction, each comparison score's statistics (primary view,
    signed, all latents; None with one seed), and Fourier recovery beside its baseline."""
    rec, gt = result["reconstruction"], result["ground_truth"]
    row = {"name": result["name"], "arch": result["arch"], "width": result["width"],
           "sparsity": ", ".join(f"{k}={v:g}" for k, v in result["sparsity"].items()),
           "sparsity_parameter": next(iter(result["sparsity"])),
           "sparsity_value": next(iter(result["sparsity"].values())),
           "seeds": len(result["seeds"]), "fvu": rec["fvu"]["mean"], "l0": rec["l0"]["mean"],
           "dead_frac": rec["dead_frac"]["mean"], "acc_sae": rec["acc_sae"]["mean"] if rec.get("acc_sae") else None}
    for name, score, _ in score_names("comparison"):
        for statistic in score.comparison:
            row[comparison_key(score, statistic)] = (comparison_statistic(result, name, statistic)
                                                     if result["stability"] else None)
    row |= {"frac_pure_key": gt["frac_pure_key"]["mean"] if gt else None,
            "frac_pure_key_baseline": gt["baseline"]["frac_pure_key"] if gt else None,
            "coverage": gt["coverage"]["mean"] if gt and gt["coverage"] else None,
            "coverage_baseline": gt["baseline"]["coverage"]["mean"] if gt and gt["coverage"] else None}
    return row


def comparison_statistic(result: dict, name: str, statistic: str) -> float | None:
    """One statistic of a score of a group with two or more seeds: the trained mean, a baseline's mean or
    the normalised score (signed, all latents); None where it was not computed."""
    if statistic == "normalised":
        return result["normalised"][PRIMARY_VARIANT][name]
    summary = result["stability"] if statistic == "trained" else result["baselines"].get(statistic)
    return (summary[PRIMARY_VARIANT][name] or {}).get("mean") if summary else None


def describe_transformer(source: Source) -> dict:
    """A transformer's embedding spectrum, key frequencies and last logged epoch (None without a log)."""
    shares, keys = embedding_spectrum(source.model.W_E[:source.model.cfg.p])
    final = ({k: source.log[-1][k] for k in ("epoch", "train_acc", "test_acc", "train_loss", "test_loss")
              if k in source.log[-1]} if source.log else None)
    return {"key_frequencies": keys, "embedding_frequency_shares": [round(float(s), 6) for s in shares],
            "final": final, "log": source.log, "op": source.model.cfg.op, "p": source.model.cfg.p}


class Analysis(NamedTuple):
    """Everything compute produces, for render."""
    results: list[dict]             # per group, for report.json
    plots: list[dict]               # per group, the data of its figures
    comparison: list[dict]          # one row per group
    pareto: list[str]               # names of the groups on the frontier
    transformers: dict[str, dict]   # per transformer: spectrum, key frequencies, log


# ==================================================================================================
# LOAD: find the SAE files, read them, group them by configuration, and get their activations.


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


class Source(NamedTuple):
    """The activations a group's SAEs were trained on, and the model behind them when there is one."""
    acts: torch.Tensor            # [N, d]; with a transformer, N = p^2 in the order a*p + b
    model: object | None
    transformer_id: str | None    # its path, and the epoch for a checkpoint
    path: str
    log: list[dict] | None        # the transformer's training log (<model>.log.jsonl beside it), if any


class Inputs(NamedTuple):
    """Everything load produces, for compute and render."""
    skipped: list[dict]                     # files that could not be read, with the reason
    refused: list[str]                      # comparisons not made, and why
    groups: list[tuple[Group, Source]]      # the groups that can be analysed, with their activations
    failed: list[dict]                      # groups that cannot, with the reason
    sources: dict                           # every source loaded, by what identifies it


def load_inputs(paths: list[Path]) -> Inputs:
    """Read the SAE files, group them, and load each group's activations; what cannot be read is listed
    with the reason, and the rest go on. A HusaiError when nothing at all can be analysed."""
    files, skipped = read_sae_files(paths)
    for s in skipped:
        print(f"skipped: {s['reason']}")
    if not files:
        raise HusaiError(f"none of the {len(skipped)} SAE file(s) could be read: {skipped[0]['reason']}")
    groups, refused = group_files(files)
    sources, loaded, failed = {}, [], []
    for group in groups:
        try:
            source = load_source(group, sources)
            if source.acts.shape[1] != group.key.d_in:
                raise HusaiError(f"the SAEs have d_in {group.key.d_in} but the activations have "
                                 f"d = {source.acts.shape[1]}")
        except HusaiError as e:
            failed.append({"name": group.name, "reason": str(e)})
            print(f"group {group.name}: not analysed: {e}")
            continue
        loaded.append((group, source))
    if not loaded:
        raise HusaiError(f"no group could be analysed: {failed[0]['name']}: {failed[0]['reason']}")
    return Inputs(skipped, refused, loaded, failed, sources)


def find_sae_files(inputs: list[str]) -> list[Path]:
    """SAE files from files, folders (searched recursively) and globs, sorted; the default glob without
    inputs. A file named explicitly is taken as it is; folders and globs yield seed<N>.safetensors only.
    Nothing inside a RUN_DIR (.husai) folder is taken: those are runs being written or set aside.
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
                found |= {c for c in match.rglob("seed*.safetensors")
                          if SAE_FILE.fullmatch(c.name) and RUN_DIR not in c.relative_to(match).parts}
            elif SAE_FILE.fullmatch(match.name) or not glob.has_magic(pattern):
                found.add(match)
    found = {path for path in found if RUN_DIR not in path.parts}   # a run's staging and set-aside files
    if not found:
        raise HusaiError(f"no SAE files found in {' '.join(patterns)}; create them with `{TRAIN_COMMAND}`")
    return sorted(found)


def read_sae_files(paths: list[Path]) -> tuple[list[SAEFile], list[dict]]:
    """Load every file; a file that cannot be read, lacks what the analysis needs or holds a non-finite
    tensor or metric is skipped, with the reason, and the rest go on."""
    files, skipped = [], []
    for path in paths:
        try:
            tensors, meta = load_sae(path)
            config, provenance = meta["config"], meta["provenance"]
            d, m = tensors["W_enc"].shape
            if tensors["W_dec"].shape != (m, d) or config["width"] != m or config["d_in"] != d:
                raise HusaiError(f"{path}: W_enc {list(tensors['W_enc'].shape)}, W_dec {list(tensors['W_dec'].shape)} "
                                 f"do not match width {config['width']}, d_in {config['d_in']}")
            metrics = meta.get("metrics", {})
            bad = non_finite_tensors(tensors) + [f"metric {name}" for name, value in metrics.items()
                                                 if isinstance(value, float) and not math.isfinite(value)]
            if bad:
                raise HusaiError(f"{path}: {', '.join(bad)} not finite (a diverged or damaged SAE); not analysed")
            files.append(SAEFile(path, int(config["seed"]), config, metrics, provenance, tensors))
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
    for sae_file in files:
        kind, _, sha = source_of(sae_file.provenance)
        checkpoint = sae_file.provenance.get("checkpoint")
        key = GroupKey(sae_file.config["arch"], sae_file.config["width"], *sparsity(sae_file.config),
                       str(sae_file.provenance.get("hook")), -1 if checkpoint is None else int(checkpoint), kind, sha,
                       sae_file.config["d_in"])
        by_key[key].append(sae_file)
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
        for sae_file in by_key[key]:
            folder_size[sae_file.path.parent] += 1
        for sae_file in sorted(by_key[key], key=lambda f: (f.seed, -folder_size[f.path.parent], str(f.path))):
            if sae_file.seed in seen:
                group.notes.append(f"{sae_file.path}: seed {sae_file.seed} again (as {seen[sae_file.seed].path}); "
                                   "compared with it as a rerun of one seed, never as another seed")
                group.reruns.append((seen[sae_file.seed], sae_file))
                continue
            seen[sae_file.seed] = sae_file
            group.files.append(sae_file)
        groups.append(group)
    names = [" + ".join(sorted({sae_file.path.parent.name for sae_file in g.files})) for g in groups]
    for group, name in zip(groups, names):
        unique = names.count(name) == 1
        group.name = re.sub(r"[^A-Za-z0-9._+-]+", "_",
                            name if unique else f"{name}-{group.key.sha256[:8]}-d{group.key.d_in}")
    return groups, refused


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
        if kind == "acts":
            cache[key] = Source(data.acts, None, None, path, None)
        else:
            transformer_id = path + (f" (epoch {checkpoint})" if checkpoint is not None else "")
            cache[key] = Source(data.acts, data.model, transformer_id, path,
                                read_training_log(training_log_path(path)))
    return cache[key]


def read_training_log(path: Path) -> list[dict] | None:
    """Stage 1's training log (one JSON object per logged epoch), or None where there is none."""
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_snapshots(files: list[SAEFile]) -> tuple[dict | None, str | None]:
    """Each seed's snapshot file, over the steps all seeds share: ({"weights": {step: [W_dec and W_enc per
    seed]}, "fvu": {step: [FVU per seed]}}, None), step 0 being the initialisation; or (None, why not)."""
    try:
        loaded = []
        for sae_file in files:
            path = sae_file.path.with_name(snapshot_file_name(sae_file.seed))
            tensors, meta = load_tensors(path, SNAPSHOT_FORMAT, SAE_VERSION, required=("step0.W_enc", "step0.W_dec"))
            bad = non_finite_tensors(tensors) + [f"FVU at step {t}" for t, v in zip(meta["steps"], meta["fvu"])
                                                 if not math.isfinite(v)]
            if bad:
                raise HusaiError(f"{path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} not finite")
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


# ==================================================================================================
# RENDER: report.json, report.md and the figures, every file written atomically.
# --------------------------------------------------------------------------------------------------
# Numbers as text, and tables from column specs


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_ci(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} [{stat['ci'][0]:.{digits}f}, {stat['ci'][1]:.{digits}f}]"


def fixed(digits: int) -> Callable[[float | None], str]:
    """A cell format: the number with `digits` decimals."""
    return lambda value: fmt(value, digits)


def with_ci(digits: int) -> Callable[[dict | None], str]:
    """A cell format: `mean [low, high]` with `digits` decimals."""
    return lambda stat: fmt_ci(stat, digits)


def estimate(value: dict | float | None) -> str:
    """A cell format for a column that holds plain numbers and means with CIs alike."""
    return fmt_ci(value) if isinstance(value, dict) else fmt(value)


def beside_baseline(value: float | None, baseline: float | None) -> str:
    """A cell format: the number, its baseline in brackets."""
    return f"{fmt(value)} ({fmt(baseline)})"


class Column(NamedTuple):
    """One column of a report.md table: its header, the row key it reads (or several), and the format
    that turns their values into the cell's text."""
    header: str
    key: str | tuple[str, ...]
    format: Callable[..., str]


def table(columns: list[Column], rows: list[dict]) -> list[str]:
    """A markdown table, one line per row (a dict), each cell column.format(row[key], ...)."""
    def cell(column: Column, row: dict) -> str:
        keys = (column.key,) if isinstance(column.key, str) else column.key
        return column.format(*(row[k] for k in keys))
    return (["| " + " | ".join(column.header for column in columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(column, row) for column in columns) + " |" for row in rows])


def score_label(score: Score, view: str | None, tau: float) -> str:
    """A score's full name in report.md: "PWMCC (max-based), decoder rows"."""
    label = score.label.format(tau=tau)
    return f"{label}, {VIEWS[view]}" if view else label


def score_short(score: Score, view: str | None) -> str:
    """A score's short name with its view: "decoder PWMCC"."""
    return f"{view} {score.short}" if view else score.short


RECONSTRUCTION_COLUMNS = [
    Column("seed", "seed", str), Column("FVU", "fvu", fixed(4)), Column("L0", "l0", fixed(1)),
    Column("dead", "dead_frac", fixed(3)), Column("acc clean", "acc_clean", fixed(4)),
    Column("acc SAE", "acc_sae", fixed(4)), Column("loss recovered (zero)", "loss_recovered_zero", fixed(3)),
    Column("(mean)", "loss_recovered_mean", fixed(3))]
COMPARISON_COLUMNS = [
    Column("group", "name", str), Column("arch", "arch", str), Column("width", "width", str),
    Column("sparsity", "sparsity", str), Column("seeds", "seeds", str), Column("FVU", "fvu", fixed(4)),
    Column("L0", "l0", fixed(1)), Column("dead", "dead_frac", fixed(3)), Column("acc (SAE)", "acc_sae", fixed(4))]
FOURIER_COMPARISON_COLUMNS = [
    Column("pure & key (baseline)", ("frac_pure_key", "frac_pure_key_baseline"), beside_baseline),
    Column("coverage (baseline)", ("coverage", "coverage_baseline"), beside_baseline)]
FOURIER_COLUMNS = [
    Column("quantity", "quantity", str), Column("trained (mean over seeds [CI])", "trained", with_ci(3)),
    Column("random directions", "random", estimate)]
FREQUENCY_COLUMNS = [
    Column("k", "k", str), Column("variance share of its plane", "variance_share", fixed(3)),
    Column("latents assigned", "latents", with_ci(1)), Column("coverage", "coverage", with_ci(3)),
    Column("as many random directions: coverage", "baseline_coverage", with_ci(3))]


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


# --------------------------------------------------------------------------------------------------
# The outputs


def check_report_folder(out: Path) -> None:
    """A report replaces its folder whole: an --out that exists must be an earlier report (it holds
    report.json), never a file or a folder of something else."""
    if out.exists() and not out.is_dir():
        raise HusaiError(f"--out {out}: is a file; --out names the report's folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise HusaiError(f"--out {out}: holds files that are not an analysis report (no report.json), and a report "
                         f"replaces its folder whole; choose another --out")


def render(analysis: Analysis, inputs: Inputs, command: str, tau: float, out: Path) -> None:
    """The figures, then report.json, then report.md from report.json's numbers, into the folder `out`."""
    figures = out / "figures"
    figures.mkdir(parents=True)
    for result, plots in zip(analysis.results, analysis.plots):
        result["figures"] = plot_group(result, plots, tau, figures)
    report = {
        "command": command,
        "settings": {"tau": tau, "tau_grid": list(TAU_GRID), "pure_latent": PURE_LATENT,
                     "subspace_variance": SUBSPACE_VARIANCE, "hungarian_max_latents": HUNGARIAN_MAX_LATENTS,
                     "baseline_dictionaries": BASELINE_DICTIONARIES, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                     "ci_level": CI_LEVEL, "generator_seeds": GENERATOR_SEEDS},
        "choices": dict(CHOICES), "skipped_files": inputs.skipped, "refused": inputs.refused,
        "failed_groups": inputs.failed,
        "transformers": plot_transformers(analysis.transformers, figures),
        "groups": analysis.results, "comparison": analysis.comparison, "pareto": analysis.pareto,
        "comparison_figure": plot_comparison(analysis.comparison, figures),
    }
    report = rounded(report)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
    write_report(report, out / "report.md")


# --------------------------------------------------------------------------------------------------
# Figures


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


def plot_group(result: dict, plots: dict, tau: float, folder: Path) -> dict[str, str]:
    """The group's figures: stability (with two seeds or more), purity (with a transformer), dynamics
    (with snapshots); returns {what: file name}."""
    names = {}
    if "heatmaps" in plots:
        names["stability"] = f"{result['name']}-stability.png"
        plot_stability(result, plots["heatmaps"], tau, folder / names["stability"])
    if "purity" in plots:
        names["purity"] = f"{result['name']}-purity.png"
        plot_purity(plots["purity"], plots.get("latent_match"), folder / names["purity"])
    if result.get("dynamics"):
        names["dynamics"] = f"{result['name']}-dynamics.png"
        plot_dynamics(result, folder / names["dynamics"])
    return names


def plot_stability(result: dict, heatmaps: dict[str, np.ndarray], tau: float, path: Path) -> None:
    """Decoder cosines of the first two dictionaries, trained and subspace baseline, as heat maps; then
    each curve over tau (trained solid, baselines dashed)."""
    curved = [score for score in SCORES if score.curve]
    fig, axes = plt.subplots(1, len(heatmaps) + len(curved), figsize=(5 * (len(heatmaps) + len(curved)), 4.5))
    for ax, (label, matrix) in zip(axes, heatmaps.items()):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"{label}: decoder cosines, first two dictionaries\n{FIGURE_LATENTS} latents sorted by "
                     "best match, vs their best partners",
               xlabel="partner in dictionary 2", ylabel="latent of dictionary 1")
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax, score in zip(axes[len(heatmaps):], curved):
        for label, summary in [("trained", result["stability"])] + list(result["baselines"].items()):
            curve = summary[PRIMARY_VARIANT][score.curve]
            if curve is not None:
                ax.plot(TAU_GRID, curve, "-" if label == "trained" else "--", label=label)
        ax.axvline(tau, color="k", lw=0.8, ls=":")   # the --tau of this report
        ax.set(xlabel="tau", ylabel=score.short, ylim=(0, 1.02), title=f"{score.short} vs tau ({PRIMARY_VARIANT})")
        ax.legend()
    finish(fig, path)


def plot_purity(data: dict, latent_match: list | None, path: Path) -> None:
    """Histogram of the purity of alive latents against random directions, and (with two seeds or more)
    each latent's cross-seed match against its purity."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = np.linspace(0, 1, 41)
    axes[0].hist(torch.cat(data["purity"]).numpy(), bins=bins, density=True, alpha=0.7, label="trained (all seeds)")
    axes[0].hist(data["baseline_purity"].numpy(), bins=bins, density=True, alpha=0.5, label="random directions")
    axes[0].axvline(PURE_LATENT, color="k", ls=":", lw=0.8)
    axes[0].set(xlabel="Fourier purity", ylabel="density", title="purity of alive latents")
    axes[0].legend()
    if latent_match is not None:
        match = torch.cat([m[alive] for m, alive in zip(latent_match, data["alive"])]).numpy()
        axes[1].scatter(match, torch.cat(data["purity"]).numpy(), s=4, alpha=0.4)
        axes[1].set(title=f"cross-seed match vs purity (Spearman {fmt(data['spearman']['spearman'])})")
    axes[1].set(xlabel="mean best decoder cosine in the other seeds", ylabel="Fourier purity")
    finish(fig, path)


DYNAMICS_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink")   # FVU is red


def plot_dynamics(result: dict, path: Path) -> None:
    """Each dynamics score (mean and CI band) against the training step, beside its subspace (dashed) and
    isotropic (dotted) baselines, and FVU on a second axis."""
    rows = result["dynamics"]["steps"]
    steps = [row["step"] for row in rows]
    names = score_names("dynamics")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, score, view), color in zip(names, DYNAMICS_COLORS):
        values = [row[name] for row in rows]
        ax.plot(steps, [v["mean"] for v in values], "o-", color=color, label=score_short(score, view))
        ax.fill_between(steps, [v["ci"][0] for v in values], [v["ci"][1] for v in values], color=color, alpha=0.2)
        for kind, style in (("subspace", "--"), ("isotropic", ":")):
            ax.axhline(result["baselines"][kind][PRIMARY_VARIANT][name]["mean"], color=color, ls=style, lw=1,
                       label=f"{kind} baseline ({score_short(score, view)})")
    scores = " / ".join(dict.fromkeys(score.short for _, score, _ in names))
    ax.set(xscale="symlog", xlabel="training step", ylabel=f"{scores} across seeds", ylim=(0, 1.02))
    twin = ax.twinx()
    twin.plot(steps, [row["fvu"]["mean"] for row in rows], "s-", color="tab:red", label="FVU")
    twin.set(ylabel="FVU (full dataset)", yscale="log")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{result['name']}: stability and FVU during training")
    finish(fig, path)


def plot_comparison(rows: list[dict], folder: Path) -> str:
    """For each trends score (primary view, signed, all latents), one row of panels: stability vs width at
    fixed sparsity, vs k at fixed width, and vs the penalty at fixed width, each with its subspace (dashed)
    and isotropic (dotted) baselines."""
    names = score_names("trends")
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.5 * len(names)), squeeze=False)
    def at_width(r): return f"{r['arch']} w{r['width']}"
    def sparsity_value(r): return r["sparsity_value"]
    panels = [("width", lambda r: f"{r['arch']} {r['sparsity']}", lambda r: r["width"], lambda r: True),
              ("k", at_width, sparsity_value, lambda r: r["sparsity_parameter"] == "k"),
              ("penalty (relu: l1, jumprelu: l0)", at_width, sparsity_value, lambda r: r["sparsity_parameter"] != "k")]
    for row_axes, (_, score, view) in zip(axes, names):
        trained, subspace, isotropic = (comparison_key(score, s) for s in ("trained", "subspace", "isotropic"))
        for ax, (x_name, series_of, x_of, keep) in zip(row_axes, panels):
            series = defaultdict(list)
            for row in rows:
                if row[trained] is not None and keep(row):
                    series[series_of(row)].append(row)
            for i, (label, members) in enumerate(sorted(series.items())):
                members.sort(key=x_of)
                x = [x_of(r) for r in members]
                color = f"C{i % 10}"
                ax.plot(x, [r[trained] for r in members], "o-", color=color, label=label)
                ax.plot(x, [r[subspace] for r in members], "x--", color=color, lw=1)
                ax.plot(x, [r[isotropic] for r in members], "+:", color=color, lw=1)
            ax.set(xlabel=x_name, ylabel=score_short(score, view), ylim=(0, 1.02),
                   title=f"stability vs {x_name.split()[0]}\n(x--: subspace baseline, +: isotropic baseline)")
            if series:
                ax.set_xscale("log")
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no groups", ha="center", transform=ax.transAxes)
    name = "stability-vs-width-k.png"
    finish(fig, folder / name)
    return name


def plot_transformers(transformers: dict[str, dict], folder: Path) -> dict[str, dict]:
    """Each transformer's grokking curve (when it has a log) and embedding Fourier spectrum; returns its
    entry of report.json."""
    out = {}
    for i, (transformer_id, t) in enumerate(transformers.items()):
        figures = {}
        if t["log"]:
            figures["curves"] = f"transformer{i}-curves.png"
            save_figure(folder / figures["curves"],
                        lambda handle: plot_training_curves(t["log"], handle, title=f"{t['op']} mod {t['p']}"))
        figures["spectrum"] = f"transformer{i}-fourier.png"
        save_figure(folder / figures["spectrum"],
                    lambda handle: plot_fourier_spectrum(t["embedding_frequency_shares"], t["key_frequencies"], handle))
        out[transformer_id] = {"key_frequencies": t["key_frequencies"],
                               "embedding_frequency_shares": t["embedding_frequency_shares"], "figures": figures,
                               "final": t["final"]}
    return out


# --------------------------------------------------------------------------------------------------
# report.md


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
    ("key frequencies K", f"{KEY_FREQUENCY_RULE}, recomputed from the embedding of the exact checkpoint analysed"),
    ("tau", "shared-fraction threshold; the curve over tau is in report.json and the stability figures"),
    ("number of seeds", f"{RECOMMENDED_SEEDS} or more recommended; confidence intervals resample seeds "
                        f"({BOOTSTRAP_RESAMPLES} resamples, {CI_LEVEL:.0%} percentile), never the list of pairs"),
    ("data order", "per group: the `vary_data_order` and `data_seed` settings below"),
    ("purity threshold", f"a latent is Fourier-pure at purity >= {PURE_LATENT} (the neuron rule of Nanda et al.)"),
]


DEFINITIONS = """## What the numbers are

Cosines C = A B^T between the unit-normalised latent directions of two SAEs A and B (decoder rows; the
same again on encoder columns). Scores are averaged over every pair of seeds of a configuration.

{scores}
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
    tau = report["settings"]["tau"]
    lines = (report_header(report) + definitions_section(report["settings"]) + choices_section(report["settings"])
             + inputs_section(report) + transformers_section(report["transformers"]))
    for g in report["groups"]:
        lines += group_section(g, tau)
    lines += comparison_section(report, tau)
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def report_header(report: dict) -> list[str]:
    return ["# HUSAI analysis: cross-seed stability of SAE latents and the transformer's Fourier features", "",
            f"Generated by `{report['command']}` from the files listed below; rerunning it on the same files "
            "gives this report again, byte for byte.", ""]


def definitions_section(settings: dict) -> list[str]:
    """What every number is: one line per score of SCORES, then the statistics, baselines and the rest."""
    scores = "\n".join(f"- {score.definition.format(tau=settings['tau'])}" for score in SCORES)
    return DEFINITIONS.format(scores=scores, ci=f"{CI_LEVEL:.0%}", resamples=BOOTSTRAP_RESAMPLES,
                              dictionaries=BASELINE_DICTIONARIES,
                              pairs=BASELINE_DICTIONARIES * (BASELINE_DICTIONARIES - 1) // 2,
                              baselines="\n".join(f"  - *{kind}*: {what}" for kind, what in BASELINES.items()),
                              pure=PURE_LATENT).split("\n")


def choices_section(settings: dict) -> list[str]:
    lines = ["## Choices that change the numbers", ""]
    lines += table([Column("choice", "choice", str), Column("here", "here", str)],
                   [{"choice": choice, "here": here} for choice, here in CHOICES])
    listed = ", ".join(f"{k} = {v}" for k, v in settings.items() if k not in ("generator_seeds", "tau_grid"))
    return lines + ["", f"Settings: {listed}; generator seeds {settings['generator_seeds']}.", ""]


def inputs_section(report: dict) -> list[str]:
    lines = ["## Inputs", "",
             f"- {len(report['groups'])} configuration group(s) from {sum(len(g['files']) for g in report['groups'])} "
             "SAE file(s)."]
    if report["skipped_files"]:
        lines += ["- Skipped files (unreadable or incomplete):"]
        lines += [f"  - {skipped['reason']}" for skipped in report["skipped_files"]]
    if report["refused"]:
        lines += ["- Comparisons refused:"] + [f"  - {r}" for r in report["refused"]]
    if report["failed_groups"]:
        lines += ["- Groups that could not be analysed:"]
        lines += [f"  - {failed['name']}: {failed['reason']}" for failed in report["failed_groups"]]
    return lines + [""]


def transformers_section(transformers: dict) -> list[str]:
    lines = []
    for transformer_id, t in transformers.items():
        lines += [f"## Transformer {transformer_id}", "",
                  f"Key frequencies K = {t['key_frequencies']} (rule: embedding Fourier share >= "
                  f"{KEY_FREQUENCY_MIN_SHARE}).", ""]
        if t["final"]:
            final = t["final"]
            lines += [f"Last logged epoch {final.get('epoch')}: train accuracy {fmt(final.get('train_acc'), 4)}, "
                      f"held-out accuracy {fmt(final.get('test_acc'), 4)}, held-out loss "
                      f"{fmt(final.get('test_loss'), 4)}.", "",
                      f"![grokking curve](figures/{t['figures']['curves']})", ""]
        else:
            lines += ["No training log beside the model: no training curve.", ""]
        lines += [f"![Fourier spectrum](figures/{t['figures']['spectrum']})", ""]
    return lines


def group_section(g: dict, tau: float) -> list[str]:
    """One group: what it is, then reconstruction, stability, reruns, Fourier ground truth and dynamics,
    each where there is something to show."""
    return (group_header(g) + reconstruction_section(g) + stability_section(g, tau) + reruns_section(g, tau)
            + fourier_section(g, tau) + dynamics_section(g))


def group_header(g: dict) -> list[str]:
    """Configuration, source and files; training settings; notes; the activations' principal subspace."""
    lines = [f"## Group {g['name']}", "",
             f"{g['arch']}, width {g['width']}, {', '.join(f'{k} = {v:g}' for k, v in g['sparsity'].items())}, "
             f"d_in {g['d_in']}, hook {g['hook'] or 'n/a'}, "
             f"checkpoint {g['checkpoint'] if g['checkpoint'] is not None else 'final'}, "
             f"source {g['source']} (sha256 {g['source_sha256'][:12]}). Seeds {g['seeds']}: "
             + ", ".join(g["files"]) + ".", ""]
    shared, varying = g["settings"]["shared"], g["settings"]["varying"]
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
    return lines


def reconstruction_section(g: dict) -> list[str]:
    return ["### Reconstruction", ""] + table(RECONSTRUCTION_COLUMNS, g["per_seed"]) + [""]


def stability_section(g: dict, tau: float) -> list[str]:
    """Every score under every variant beside the baselines, the directional scores seed by seed, the
    headline and the stability figure; nothing for a group of one seed."""
    if not g["stability"]:
        return []
    kinds = list(g["baselines"])
    directional = score_names("directional")
    lines = ["### Stability across seeds", "",
             "Trained: mean over seed pairs [CI]. Baselines: means over their pairs. Normalised against the "
             "subspace baseline. " + " and ".join(dict.fromkeys(score.short for _, score, _ in directional))
             + ": one number per direction, in the matrix below. All variants and baselines' means are in report.json.",
             ""]
    rows = [{"score": score_label(score, view, tau), "variant": variant, "digits": score.digits,
             "trained": summary[name], "normalised": g["normalised"][variant][name],
             **{kind: (g["baselines"][kind][variant][name] or {}).get("mean") for kind in kinds}}
            for variant, summary in g["stability"].items()
            for name, score, view in score_names("group")
            if VARIANTS[variant].hungarian or not score.one_to_one]   # the |cos| check is max-based only
    lines += table([Column("score", "score", str), Column("variant", "variant", str),
                    Column("trained", ("trained", "digits"), fmt_ci)]
                   + [Column(kind, (kind, "digits"), fmt) for kind in kinds]
                   + [Column("normalised", ("normalised", "digits"), fmt)], rows)
    seeds = g["seeds"]
    for name, score, view in directional:
        if view not in (PRIMARY_VIEW, None):
            continue
        matrix = g["pair_matrices"][PRIMARY_VARIANT][name]
        lines += ["", f"{score.label}(row seed -> column seed), {view}, {PRIMARY_VARIANT}:", ""]
        lines += table([Column("seed", "seed", str)] + [Column(str(b), str(b), str) for b in seeds],
                       [{"seed": a, **{str(b): "-" if i == j else fmt(matrix[i][j], score.digits)
                                       for j, b in enumerate(seeds)}}
                        for i, a in enumerate(seeds)])
    return lines + ["", verdict(g), "", f"![stability](figures/{g['figures']['stability']})", ""]


def verdict(g: dict) -> str:
    """One sentence per headline score, each with its numbers: above the subspace baseline or not."""
    sentences = []
    for name, score, _ in score_names("headline"):
        trained = g["stability"][PRIMARY_VARIANT][name]
        base = g["baselines"]["subspace"][PRIMARY_VARIANT][name]
        if trained is None or base is None:
            continue
        above = trained["ci"][0] > base["mean"]
        sentences.append(f"{score.short}: {fmt_ci(trained, score.digits)} vs subspace baseline "
                         f"{fmt(base['mean'], score.digits)} -> {'above' if above else 'NOT above'} the baseline "
                         f"(normalised {fmt(g['normalised'][PRIMARY_VARIANT][name], score.digits)}).")
    return f"Headline ({PRIMARY_VIEW}, {PRIMARY_VARIANT}): " + " ".join(sentences)


def reruns_section(g: dict, tau: float) -> list[str]:
    if not g["reruns"]:
        return []
    lines = ["### One seed trained twice", "",
             "Files of the same seed and configuration found in different folders, compared the way a pair "
             "of seeds is (signed, all latents). Where their bits differ, rounding alone (another thread count, "
             "machine or library version) moved the run this far: no cross-seed score above can be read as "
             "more stable than this.", ""]
    columns = ([Column("seed", "seed", str), Column("files", "files", " and ".join),
                Column("identical bits", "identical", lambda identical: "yes" if identical else "no")]
               + [Column(score_label(score, view, tau), name, fixed(score.digits))
                  for name, score, view in score_names("group")])
    return lines + table(columns, g["reruns"]) + [""]


def fourier_section(g: dict, tau: float) -> list[str]:
    """Purity and plane coverage beside random directions, per key frequency, and whether the stable
    latents are the pure ones; nothing without a transformer."""
    gt = g["ground_truth"]
    if not gt:
        return []
    b = gt["baseline"]
    lines = ["### Fourier ground truth", "",
             f"Key frequencies of {gt['transformer']}: K = {gt['key_frequencies']}; rule: "
             f"{gt['key_frequency_rule']}.", ""]
    lines += table(FOURIER_COLUMNS,
                   [{"quantity": "alive latents that are Fourier-pure", "trained": gt["frac_pure"],
                     "random": b["frac_pure"]},
                    {"quantity": "alive latents pure AND on a key frequency", "trained": gt["frac_pure_key"],
                     "random": b["frac_pure_key"]},
                    {"quantity": "mean coverage of the key-frequency planes", "trained": gt["coverage"],
                     "random": b["coverage"]}])
    lines += ["", "Per key frequency (latents assigned = alive latents whose best frequency is k):", ""]
    lines += table(FREQUENCY_COLUMNS, [{"k": k, "variance_share": gt["plane_variance_share"][k], **v}
                                       for k, v in gt["per_frequency"].items()])
    c = gt["match_vs_purity"]
    if c:
        p_value = ("n/a" if c["p_value"] is None else f"{c['p_value']:.2g}" if c["p_value"] > 0
                   else "< 1e-300")   # below float range: spearmanr returns 0
        lines += ["", f"Are the stable latents the Fourier-pure ones? Over {c['latents']} alive latents "
                  "(all seeds), Spearman correlation between a latent's cross-seed match (mean over the other "
                  f"seeds of its best decoder cosine) and its purity: rho = {fmt(c['spearman'])} "
                  f"(p = {p_value}). "
                  f"Pure among latents with match > {tau}: {fmt(c['frac_pure_if_stable'])} "
                  f"({c['latents_if_stable']} latents); with match <= {tau}: "
                  f"{fmt(c['frac_pure_if_unstable'])} "
                  f"({c['latents_if_unstable']} latents)."]
    return lines + ["", f"![purity](figures/{g['figures']['purity']})", ""]


def dynamics_section(g: dict) -> list[str]:
    if not g["dynamics"]:
        return []
    names = score_names("dynamics")
    baselines = "; ".join(f"{score_short(score, view)} "
                          + " / ".join(fmt(g["baselines"][kind][PRIMARY_VARIANT][name]["mean"], score.digits)
                                       for kind in ("subspace", "isotropic"))
                          for name, score, view in names)
    lines = ["### Training dynamics", "",
             g["dynamics"]["what"] + f"; baselines (subspace / isotropic) do not depend on the step: {baselines}.", ""]
    columns = ([Column("step", "step", str)]
               + [Column(score_short(score, view), name, with_ci(score.digits)) for name, score, view in names]
               + [Column("FVU", "fvu", lambda stat: fmt(stat["mean"], 4))])
    return lines + table(columns, g["dynamics"]["steps"]) + ["", f"![dynamics](figures/{g['figures']['dynamics']})",
                                                              ""]


def comparison_section(report: dict, tau: float) -> list[str]:
    """One row per group, the Pareto frontier and the trends figure."""
    if not report["comparison"]:
        return []
    pareto = next(score for score in SCORES if score.key == PARETO_SCORE)
    score_columns = [Column(score.short if statistic == "trained" else f"{score.short} {statistic}",
                            comparison_key(score, statistic), fixed(score.digits))
                     for _, score, _ in score_names("comparison") for statistic in score.comparison]
    lines = ["## Comparison across configurations", "",
             f"Stability: {PRIMARY_VIEW} view, {PRIMARY_VARIANT}, tau = {tau}; a column named after a baseline holds "
             "that baseline's score, and normalised is against the subspace baseline. Fourier recovery = fraction "
             "of alive latents that are pure and on a key frequency (random-direction baseline in brackets) and "
             "mean coverage of the key-frequency planes. Means over seeds.", ""]
    lines += table(COMPARISON_COLUMNS + score_columns + FOURIER_COMPARISON_COLUMNS, report["comparison"])
    return lines + ["", f"Pareto frontier (normalised {pareto.short} higher, FVU lower; groups with two or more "
                    "seeds): " + (", ".join(report["pareto"]) or "none (no group has two seeds)") + ".", "",
                    f"![stability vs width and k](figures/{report['comparison_figure']})", ""]


# ==================================================================================================


def parse_arguments():
    args = build_parser().parse_args()
    if not 0 <= args.tau < 1:
        raise HusaiError(f"--tau {args.tau}: must lie in [0, 1)")
    if Path(args.out).name in ("", ".", ".."):
        raise HusaiError(f"--out {args.out}: names no folder of its own; give the report's folder, e.g. runs/analysis")
    return args


def main() -> None:
    """The report is one run (sae_core.RunOutput) whose single entry is the report folder: written beside
    it under a lock and moved into place whole, so --force leaves nothing of an earlier report behind."""
    args = parse_arguments()
    device = pick_device(args.device)
    paths = find_sae_files(args.inputs)
    out = Path(args.out)
    with RunOutput(out.parent, out.name, [out.name], args.force) as run:
        check_report_folder(out)
        inputs = load_inputs(paths)
        analysis = analyse(inputs, device, args.tau)
        command = " ".join(["python analyze.py", *args.inputs] + [f"--tau {args.tau}"] * (args.tau != SHARED_TAU))
        render(analysis, inputs, command, args.tau, run.path(out.name))
        run.commit()
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and the figures in {out / 'figures'}")


if __name__ == "__main__":
    run_cli(main, unit_outputs=True)
