"""Stage 3: do SAEs trained with different seeds learn the same features, and are those the model's
Fourier features?

    python analyze.py                                   # every runs/sae/*/seed<N>
    python analyze.py runs/sae/topk-w512-k32 'runs/sae/relu-*'   # chosen files, folders or globs
    python analyze.py --out runs/analysis --force       # regenerate an existing report

Reads the SAEs written by train_sae.py and the transformer (or activation file or shard folder) that each one names in
its provenance, groups them by configuration, and writes to --out:
    report.md       readable on its own: what each number is, every choice that moves the numbers, each
                    score beside its nulls
    report.json     every number in report.md and more (per-pair matrices, curves, per-seed values)
    figures/*.png   planes and latent types, similarity matrices, shared fraction vs tau, purity, training
                    dynamics, comparisons across configurations, the transformer's grokking curve and spectrum
The report folder is written beside --out and moved into place whole (sae_core.RunOutput): --force
replaces an earlier report entirely (no figure of it survives), and a second analysis writing to the same
place at the same time is refused. SAE files with a non-finite tensor or metric are skipped and listed.
The same files give the same report byte for byte: nothing reads the clock, every random draw has a
recorded fixed seed, and files, groups and seeds are visited in sorted order (the report is the same with
any number of threads; on a CPU that other jobs keep busy, OMP_NUM_THREADS=1 is the faster setting).

What is measured. The grokked model's features are circles: for each key frequency w, the activations at
`=` trace the plane of cos(w c) and sin(w c), c the answer. A sparse code tiles a circle with arcs at an
arbitrary phase, so two seeds can write the same planes with latents that do not match one to one, and
a decoder row is mostly its seed's leftover initialisation in directions the data never visits. The
report therefore leads with measures read from the latents' activations on every input: the plane each
harmonic family of latents writes (across seeds and against the true plane), the energy-weighted
activation match, and what each latent is a function of (its type). Every score stands beside nulls that
suit it: the untrained initialisation of the same seeds (the primary null; normalised scores use it),
random TopK dictionaries inside the data's subspace for the functional scores, and random directions in
the subspace for direction scores computed there. Raw decoder and encoder cosines follow.

The file reads top to bottom as the run goes: settings and the table of stability scores (SCORES), then
what is computed, then how the inputs are loaded, then how the report and figures are rendered, then
main(). A stability score is one function plus one entry in SCORES; the report's tables, definitions,
comparison, dynamics and figures all read that table. The other measures are one function each, here or
in sae_core (Fourier basis, FVU, SAE inference), used by the trained SAEs and by their nulls alike.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

import matplotlib
import numpy as np
import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from sae_core import (ARCHITECTURES, KEY_FREQUENCY_MIN_SHARE, RUN_DIR, SAE_VERSION, SAELENS_CONFIG, SNAPSHOT_FORMAT,
                      ActivationShards, CliParser, HusaiError, RunOutput, atomic_write, embedding_spectrum, file_sha256, fourier_basis, load_sae,
                      load_tensors, non_finite_tensors, pick_device, reconstruction_metrics, run_cli, sae_latents,
                      seed_files)
from train_transformer import activations_from, plot_fourier_spectrum, plot_training_curves, training_log_path

matplotlib.use("Agg")   # figures go to files; no display is needed or used
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# --------------------------------------------------------------------------------------------------
# Settings. Each one changes the numbers, so report.md and report.json list them all.

SHARED_TAU = 0.7                 # a latent is "shared" above this matched cosine (Paulo & Belrose 2025)
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(21))   # the shared-fraction curve
VARIANCE_SHARES = (0.99, 0.999)  # principal subspaces holding these shares of the variance: decoder scores are
                                 # repeated inside each, and the random TopK null lives in the first
HUNGARIAN_MAX_LATENTS = 16_384   # one-to-one matching needs the whole [m, m] matrix: 2 GiB in float64 here,
                                 # 4.6 GB peak and ~10 s per matching of a planted pair, measured on this CPU
CHUNK_ELEMENTS = 1 << 24         # max-cosine, correlations and the phase question work on blocks of at most
                                 # this many numbers (64 MiB of float32)
DENSE_LATENTS_BYTES = 1 << 30    # SAEs are read side by side while their dense latents [N, m] fit in this
BOOTSTRAP_RESAMPLES = 2000       # resamples of the seeds for every confidence interval
CI_LEVEL = 0.95
RECOMMENDED_SEEDS = 5
FIGURE_LATENTS = 128             # latents shown in a similarity heat map
VARIABLES = ("c", "a", "b", "other")   # of an input (a, b): c the answer ((a + b) mod p; (a - b) for sub), the two
                                       # inputs, and the other combination ((a - b) mod p; (a + b) for sub)
LATENT_TYPES = VARIABLES + ("frequency", "unexplained", "dead")
TYPE_SHARE = 0.5                 # a latent is a v-latent when >= this share of its variance is a function of v; a
                                 # frequency-latent when none is, but this share lies at one frequency of the four
                                 # variables together (the neuron rule's block {1, cos w, sin w}^2 of a and b)
PLANE_TYPES = ("c", "frequency")  # the latents that carry the answer's planes, grouped into harmonic families
FAMILY_R2 = 0.9                  # two groups are one harmonic family when either's cos/sin decode from the other's
                                 # group this well (grokked model: harmonic pairs 0.88-0.98, other pairs <= 0.84)
HARMONICS = 10                   # harmonic purity counts a latent's c-energy at j w, j = 1..HARMONICS: an arc
                                 # firing on 20% of inputs keeps 0.997 of its variance there, on 10% 0.98
PARTNER_CORRELATION = 0.9        # a latent "has a partner" when its one-to-one partner correlates above this
SPARSE_DENSITY = 0.1             # latents non-zero on fewer than this share of (input, latent) pairs correlate
                                 # through an exact float64 sparse product (cost ~ density^2); denser ones in
                                 # float32 blocks
NULL_PAIRS = 5                   # random nulls: this many independent pairs of dictionaries, with their spread
PHASE_DRAWS = 5                  # phase question: this many independent per-latent phase shuffles
DYNAMICS_LATENT_LIMIT = 1024     # functional scores over the training snapshots only up to this width: each
                                 # step costs as much as the trained SAEs (direction scores: every width)
# Fixed generator seeds. Random pair i uses seed + 2i and seed + 2i + 1; phase draw i uses seed + i.
GENERATOR_SEEDS = {"bootstrap": 0, "subspace": 3000, "random": 5000, "phase": 6000}
KEY_FREQUENCY_RULE = (f"embedding Fourier share >= {KEY_FREQUENCY_MIN_SHARE} "
                      f"({embedding_spectrum.__module__}.{embedding_spectrum.__name__})")

NULLS = {
    "init": "the same seeds' SAEs at step 0 (the untrained initialisation, from the snapshot files), all seed pairs: "
            "the primary null of every score, and the one normalised scores use",
    "random": f"{NULL_PAIRS} independent pairs of random TopK SAEs of the group's width and k (penalised "
              "architectures: k = the trained seeds' mean L0) inside the data: decoder rows uniform on the sphere of "
              f"the principal subspace holding {100 * VARIANCE_SHARES[0]:g}% of the variance, encoder = decoder^T, b_dec = "
              "the mean activation. Functional scores only",
    "subspace": f"{NULL_PAIRS} independent pairs of dictionaries of directions uniform in the principal subspace a "
                "projected score is computed in. Direction scores inside a subspace only",
}


class Variant(NamedTuple):
    absolute: bool      # |cos| instead of the signed cosine
    alive_only: bool    # dead latents left out
    hungarian: bool     # one-to-one matching too (it costs most: the primary variant only)


VARIANTS = {"signed, all latents": Variant(False, False, True), "signed, alive latents": Variant(False, True, False),
            "|cos|, all latents": Variant(True, False, False)}
PRIMARY_VARIANT = "signed, all latents"
TRAINING_SETTINGS = ("steps", "batch_size", "lr", "normalize", "data_seed", "vary_data_order")   # shown per group
DOWNSTREAM = ("acc_clean", "acc_sae", "loss_recovered_zero", "loss_recovered_mean")   # as train_sae.py recorded
SAE_FILE = re.compile(r"seed(\d+)(\.safetensors)?")   # a seed folder or an earlier run's file; not last-good-*
DEFAULT_INPUTS = "runs/sae/*/seed*"
TRAIN_COMMAND = "python train_sae.py --arch topk --seeds 0 1 2 3 4"
FRONTIER_FVU = 0.03              # the map's frontier: configurations stable and true at FVU at most this (plane
                                 # agreement holds across seeds from about this FVU down: circles.md)
FRONTIER_LEVEL = 0.9             # ... whose plane agreement and plane recovery have the lower CI end above this

# --------------------------------------------------------------------------------------------------
# The stability scores of a pair of SAEs. A new score is its function (in the next part, beside the
# others) plus one entry in SCORES: the entry alone puts it in report.json and in every table, sentence
# and figure that its fields name.

def percent(share: float) -> str:
    """0.99 -> "99%", 0.999 -> "99.9%"."""
    return f"{100 * share:g}%"


PROJECTED_VIEWS = {f"decoder_{str(share)[2:]}": share for share in VARIANCE_SHARES}   # "decoder_99": 0.99
VIEWS = {"decoder": "decoder rows", "encoder": "encoder columns",
         **{view: f"decoder rows in the {percent(share)} subspace" for view, share in PROJECTED_VIEWS.items()}}
MATCHED_VIEWS = ("decoder", "encoder")   # one-to-one matching (the costliest step) in the raw views only
PRIMARY_VIEW = "decoder"   # the view of the direction headline, comparison and trends
LEVELS = {
    "function": "read from the latents' activations on every input and the planes they write (primary variant only)",
    "direction": "read from the latents' decoder rows and encoder columns (every variant)",
}
SECTIONS = {
    "headline": "the group's verdicts: one sentence per score against its nulls (functional scores lead the group, "
                "direction scores open the direction part)",
    "dynamics": "stability at every snapshot step: table, figure and report.json (scores without matching; "
                f"functional ones up to width {DYNAMICS_LATENT_LIMIT})",
    "trends": "the figure of stability against width, k and penalty (trained beside its nulls)",
}
COMPARISON_STATISTICS = ("trained", *NULLS, "normalised")   # a null's statistic is its mean score


class Score(NamedTuple):
    """One stability score and where the report shows it. Every score that is not directional is also in
    the group's score table (beside its nulls, normalised against the initialisation), in the reruns
    table, and in report.json's summaries; every score's per-pair matrix is in report.json."""
    key: str                # report.json name, after "<view>." for a score of one view
    label: str              # report.md name; "{tau}" stands for the threshold
    short: str              # shorter name: headline, comparison, dynamics and figures
    digits: int             # decimals in report.md
    definition: str         # its line in report.md's definitions ("{tau}" allowed)
    compute: Callable       # (pair, view or None, tau) -> the score; tau may be an array (then a curve). The pair
                            # is a PairMatches for a direction score, a PairFunctions for a functional one
    level: str = "direction"                # among LEVELS
    views: tuple[str, ...] = tuple(VIEWS)   # (): one number (a functional score, or one that reads both raw views)
    one_to_one: bool = False                # needs a one-to-one matching (none above HUNGARIAN_MAX_LATENTS)
    directional: bool = False               # compute returns (A -> B, B -> A): a per-pair matrix, shown seed by seed
    sections: frozenset[str] = frozenset()  # among SECTIONS
    comparison: tuple[str, ...] = ()        # among COMPARISON_STATISTICS: columns of the comparison across groups
    curve: str | None = None                # report.json name of its curve over TAU_GRID, drawn in the stability figure


FUNCTION_COMPARISON = ("trained", "init", "random", "normalised")   # the headline scores' columns across groups
SCORES = (
    Score("plane_agreement", "plane agreement (mean over key frequencies)", "plane agreement", 3,
          "**Plane agreement**: for each key frequency w, the plane each SAE's harmonic family writes at w (the "
          "regression of the family's reconstruction on cos(w c), sin(w c)); the smaller principal-angle cosine "
          "between two seeds' planes (0 when either writes none); the mean over the key frequencies. Each "
          "frequency is in the plane table.",
          lambda pair, view, tau: mean_or_none(list(pair.planes.values())) if pair.planes else None,
          level="function", views=(), sections=frozenset({"headline", "dynamics", "trends"}),
          comparison=("trained", "init", "random")),
    Score("act_match_weighted", "activation match, energy-weighted", "weighted activation match", 3,
          "**Energy-weighted activation match**: each latent's best Pearson correlation over all inputs with any "
          "latent of the other seed, weighted by its share of the reconstruction energy (sum_n f_ni^2 ||d_i||^2 "
          "over all latents' total); the mean of the two directions.",
          lambda pair, view, tau: pair.activation["max_weighted"],
          level="function", views=(), sections=frozenset({"headline", "dynamics", "trends"}),
          comparison=FUNCTION_COMPARISON),
    Score("partner_energy", f"energy with a one-to-one partner above {PARTNER_CORRELATION}", "partner energy", 3,
          f"**Partner energy**: the share of the reconstruction energy held by latents whose one-to-one (Hungarian, "
          f"on correlations) partner correlates above {PARTNER_CORRELATION}; the mean of the two directions.",
          lambda pair, view, tau: pair.activation["partner_energy"],
          level="function", views=(), one_to_one=True, sections=frozenset({"headline"}), comparison=("trained",)),
    Score("act_hungarian_weighted", "activation match, one-to-one, energy-weighted", "weighted one-to-one match", 3,
          "**Energy-weighted one-to-one activation match**: as the energy-weighted match, with each latent's "
          "correlation to its Hungarian partner instead of its best.",
          lambda pair, view, tau: pair.activation["hungarian_weighted"],
          level="function", views=(), one_to_one=True),
    Score("act_match", "activation match, unweighted (alive latents)", "activation match", 3,
          "**Activation match (unweighted)**: each alive latent's best correlation in the other seed, averaged "
          "with equal weights: hundreds of rarely firing latents decide it.",
          lambda pair, view, tau: pair.activation["max"], level="function", views=()),
    Score("act_hungarian", "activation match, one-to-one, unweighted (alive latents)", "one-to-one match", 3,
          "**One-to-one activation match (unweighted)**: each alive latent's correlation to its Hungarian partner.",
          lambda pair, view, tau: pair.activation["hungarian"], level="function", views=(), one_to_one=True),
    Score("mmcs", "MMCS", "MMCS", 3,
          "**MMCS(A -> B)** = (1/m_A) sum_i max_j C_ij (Sharkey et al. 2022) on cosines C of unit directions, "
          "reported both ways.",
          lambda pair, view, tau: (mmcs(pair.best[view].best_a), mmcs(pair.best[view].best_b)), directional=True),
    Score("pwmcc", "PWMCC (max-based)", "PWMCC", 3,
          "**PWMCC** (max-based) = (MMCS(A -> B) + MMCS(B -> A)) / 2. A latent may be matched more than once, so "
          "PWMCC >= the Hungarian score.",
          lambda pair, view, tau: pwmcc(pair.best[view]),
          sections=frozenset({"headline", "dynamics", "trends"}), comparison=("trained", "init", "normalised")),
    Score("hungarian", "Hungarian mean cosine (one-to-one)", "Hungarian mean cosine", 3,
          "**Hungarian mean cosine** (one-to-one): the assignment maximising the total cosine, mean cosine over "
          "matched pairs. (Song et al. 2025 call this PW-MCC; it is kept apart from PWMCC here.)",
          lambda pair, view, tau: hungarian_mean_cosine(pair.matchings[view]),
          one_to_one=True, sections=frozenset({"headline"})),
    Score("shared_fraction", "shared fraction at tau = {tau} (one matching, decoder AND encoder)", "shared fraction",
          3, "**Shared fraction at tau = {tau}** (Paulo & Belrose 2025): ONE Hungarian matching on the mean of the "
          "decoder and encoder cosine matrices; a latent is shared when its partner in that matching has cosine "
          "> tau in the decoder AND in the encoder.",
          lambda pair, view, tau: shared_fraction(pair.shared, tau),
          views=(), one_to_one=True, sections=frozenset({"headline"}), curve="shared_curve"),
)
PARETO_SCORE = "act_match_weighted"   # its normalised value is the stability axis of the Pareto frontier


class ScoreName(NamedTuple):
    """One number of a score: the score for one view (or for both, when it reads both)."""
    name: str               # report.json key: "decoder.pwmcc", "plane_agreement"
    score: Score
    view: str | None


def places(score: Score) -> set[str]:
    """Where a score appears: "directional" or "group" (the score table, reruns and summaries), its
    SECTIONS, and "comparison" when it has comparison statistics."""
    return ({"directional" if score.directional else "group"} | set(score.sections)
            | ({"comparison"} if score.comparison else set()))


def score_names(where: str, level: str | None = None) -> list[ScoreName]:
    """The numbers shown `where` (a place of places(), or "all": the group's scores, then the directional
    ones), of one level or of both, in a fixed order: the functional scores, then view by view, then the
    direction scores that read both views. The headline, the comparison and the trends figure show the
    primary view only; a one-to-one score exists in the matched views only."""
    if where == "all":
        return score_names("group", level) + score_names("directional", level)
    views = [PRIMARY_VIEW] if where in ("headline", "comparison", "trends") else list(VIEWS)
    chosen = [score for score in SCORES if where in places(score) and level in (None, score.level)]
    return ([ScoreName(score.key, score, None) for score in chosen if score.level == "function"]
            + [ScoreName(f"{view}.{score.key}", score, view) for view in views for score in chosen
               if view in score.views and (view in MATCHED_VIEWS or not score.one_to_one)]
            + [ScoreName(score.key, score, None) for score in chosen if not score.views and score.level != "function"])


def nulls_of(score: Score, view: str | None) -> tuple[str, ...]:
    """The nulls a score is read against: the initialisation always; random TopK SAEs for a functional
    score; random directions in the subspace for a direction score computed inside one."""
    if score.level == "function":
        return ("init", "random")
    return ("init", "subspace") if view in PROJECTED_VIEWS else ("init",)


def comparison_key(score: Score, statistic: str) -> str:
    """The comparison row's key for one statistic of a score: "pwmcc", "pwmcc_init", ..."""
    return score.key if statistic == "trained" else f"{score.key}_{statistic}"


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 3: cross-seed stability of SAE latents, against nulls and the "
                                   "transformer's Fourier features.")
    add = parser.add_argument
    add("inputs", nargs="*", help=f"SAE files, folders or globs (default: {DEFAULT_INPUTS})")
    add("--out", default="runs/analysis", help="folder for report.md, report.json and figures/")
    add("--tau", type=float, default=SHARED_TAU, help="matched cosine above which a latent counts as shared")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where SAE latents and the max-cosine blocks are computed (auto: the GPU when there is one)")
    add("--force", action="store_true", help="replace an existing report in --out, whole")
    return parser


# ==================================================================================================
# COMPUTE
# --------------------------------------------------------------------------------------------------
# Directions: how alike two dictionaries' latent directions are.


class Dictionary(NamedTuple):
    """One SAE's latent directions as unit rows [m, d'] per view (VIEWS: decoder rows, encoder columns,
    decoder rows inside each principal subspace), and which latents fire on the dataset (alive [m], bool).
    A null may carry some views only."""
    rows: dict[str, torch.Tensor]
    alive: torch.Tensor


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows [m, d] scaled to unit length in float64, returned as float32 (a zero row stays zero); cosines are
    then plain dot products."""
    rows = rows.double()
    return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()


def project_rows(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows [m, d] expressed in an orthonormal basis [d, r] of a subspace and renormalised to unit length
    [m, r]: cosines between them are cosines inside the subspace. (How much of each row was inside is the
    squared norm of rows @ basis for unit rows: subspace_share.)"""
    if rows.shape[1] != basis.shape[0]:
        raise HusaiError(f"rows of dimension {rows.shape[1]} and a basis of R^{basis.shape[0]}")
    return unit_rows(rows.double() @ basis.to(rows.device).double())


def make_dictionary(W_dec: torch.Tensor, W_enc: torch.Tensor, alive: torch.Tensor,
                    bases: dict[float, torch.Tensor]) -> Dictionary:
    """From SAELens-shaped weights W_dec [m, d] and W_enc [d, m]: every view of VIEWS, the projected ones
    through the principal bases (bases[share] [d, r])."""
    W_dec, W_enc = W_dec.cpu(), W_enc.cpu()
    rows = {"decoder": unit_rows(W_dec), "encoder": unit_rows(W_enc.T)}
    rows |= {view: project_rows(W_dec, bases[share]) for view, share in PROJECTED_VIEWS.items()}
    return Dictionary(rows, alive.bool().cpu())


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


def one_to_one(C: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching maximising the total of C [m_A, m_B] (Hungarian, scipy
    linear_sum_assignment; it needs C whole, as float64). Returns each A row's partner column and each
    B column's partner row, -1 where unmatched (unequal sizes). The float64 cost -C is made once, in
    place (maximize=True would make a second [m_A, m_B] float64 copy: 2 GiB at 16,384 latents)."""
    cost = C.double().neg_()
    rows, cols = linear_sum_assignment(cost.numpy())
    del cost
    partner_a, partner_b = np.full(C.shape[0], -1), np.full(C.shape[1], -1)
    partner_a[rows], partner_b[cols] = cols, rows
    return partner_a, partner_b


def partner_values(C: torch.Tensor, partner_a: np.ndarray, partner_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C at each latent's partner, [m_A] and [m_B] float64, NaN where a latent has none."""
    C = C.double().numpy()
    at_a, at_b = np.full(C.shape[0], np.nan), np.full(C.shape[1], np.nan)
    rows = np.nonzero(partner_a >= 0)[0]
    at_a[rows] = C[rows, partner_a[rows]]
    cols = np.nonzero(partner_b >= 0)[0]
    at_b[cols] = C[partner_b[cols], cols]
    return at_a, at_b


class Matching(NamedTuple):
    """A one-to-one matching of the rows of A [m_A, d] and B [m_B, d]."""
    partner_a: np.ndarray   # [m_A] index in B of latent i's partner, -1 when unmatched (m_A > m_B)
    cos_a: np.ndarray       # [m_A] cosine with the partner, NaN when unmatched
    cos_b: np.ndarray       # [m_B]


def hungarian_match(A: torch.Tensor, B: torch.Tensor, absolute: bool = False) -> Matching:
    """The one-to-one assignment maximising the total cosine (C = A B^T, or |C|). It needs C whole, so
    callers keep m <= HUNGARIAN_MAX_LATENTS."""
    C = A.cpu() @ B.cpu().T
    if absolute:
        C = C.abs()
    partner_a, partner_b = one_to_one(C)
    return Matching(partner_a, *partner_values(C, partner_a, partner_b))


def hungarian_mean_cosine(matching: Matching) -> float:
    """Mean cosine over the min(m_A, m_B) one-to-one matched pairs. Song et al. 2025 call this PW-MCC;
    here it keeps its own name so that it is never confused with the max-based PWMCC."""
    return float(np.nanmean(matching.cos_a))


class SharedMatching(NamedTuple):
    """ONE one-to-one matching on the mean of the decoder and encoder cosine matrices, and each latent's
    decoder and encoder cosine with its partner in it (NaN when unmatched)."""
    decoder_a: np.ndarray   # [m_A]
    encoder_a: np.ndarray
    decoder_b: np.ndarray   # [m_B]
    encoder_b: np.ndarray


def shared_matching(decoder: torch.Tensor, encoder: torch.Tensor) -> SharedMatching:
    """Paulo & Belrose 2025's matching, from the decoder and encoder cosine matrices [m_A, m_B]."""
    if decoder.shape != encoder.shape:
        raise HusaiError(f"decoder cosines {tuple(decoder.shape)} and encoder cosines {tuple(encoder.shape)} differ")
    partner_a, partner_b = one_to_one((decoder.double() + encoder.double()) / 2)
    decoder_a, decoder_b = partner_values(decoder, partner_a, partner_b)
    encoder_a, encoder_b = partner_values(encoder, partner_a, partner_b)
    return SharedMatching(decoder_a, encoder_a, decoder_b, encoder_b)


def shared_fraction(shared: SharedMatching, tau: float | np.ndarray) -> float | np.ndarray:
    """Paulo & Belrose 2025: a latent is shared when its partner in the ONE matching has decoder cosine
    > tau AND encoder cosine > tau (an unmatched latent never is). The fraction of shared latents of each
    SAE, averaged over the two; tau may be an array of thresholds (the curve)."""
    tau = np.asarray(tau, dtype=float)[..., None]
    def fraction(dec_cos, enc_cos):   # NaN (unmatched) compares False: never shared
        return ((dec_cos > tau) & (enc_cos > tau)).mean(axis=-1)
    return (fraction(shared.decoder_a, shared.encoder_a) + fraction(shared.decoder_b, shared.encoder_b)) / 2


class PairMatches(NamedTuple):
    """What every direction score of one pair of dictionaries is computed from."""
    best: dict[str, MaxCosine]        # view -> the best cosines both ways
    matchings: dict[str, Matching]    # matched view -> the one-to-one matching; empty when none was made
    shared: SharedMatching | None     # the one matching of the shared fraction; None when none was made


def available(score: Score, view: str | None, pair: PairMatches) -> bool:
    """Whether a pair has what a direction score needs (its view, and a matching when it needs one)."""
    if view is not None:
        return view in pair.best and (not score.one_to_one or view in pair.matchings)
    return not score.one_to_one or pair.shared is not None


def compare_pair(a: Dictionary, b: Dictionary, variant: Variant, device: torch.device,
                 tau: float) -> tuple[dict, MaxCosine | None]:
    """Every direction score of SCORES for one pair of dictionaries, under its report.json name, and the
    curves over TAU_GRID of the scores that have one. Returns (scores, the decoder MaxCosine or None); a
    score is absent where the pair lacks its view or latents, or where it needs a one-to-one matching
    and the variant makes none or m is too large for Hungarian."""
    if variant.alive_only:
        a = Dictionary({view: rows[a.alive] for view, rows in a.rows.items()}, a.alive[a.alive])
        b = Dictionary({view: rows[b.alive] for view, rows in b.rows.items()}, b.alive[b.alive])
    if not len(a.alive) or not len(b.alive):
        return {}, None
    views = [view for view in VIEWS if view in a.rows and view in b.rows]
    matched = variant.hungarian and max(len(a.alive), len(b.alive)) <= HUNGARIAN_MAX_LATENTS
    best = {view: max_cosine(a.rows[view], b.rows[view], variant.absolute, device) for view in views}
    matchings = {view: hungarian_match(a.rows[view], b.rows[view], variant.absolute)
                 for view in views if matched and view in MATCHED_VIEWS}
    shared = (shared_matching(a.rows["decoder"] @ b.rows["decoder"].T, a.rows["encoder"] @ b.rows["encoder"].T)
              if matched and {"decoder", "encoder"} <= set(views) else None)
    pair = PairMatches(best, matchings, shared)
    scores = {name: score.compute(pair, view, tau) for name, score, view in score_names("all", "direction")
              if available(score, view, pair)}
    for score in SCORES:
        view = PRIMARY_VIEW if score.views else None
        if score.curve and score.level == "direction" and available(score, view, pair):
            scores[score.curve] = score.compute(pair, view, np.array(TAU_GRID))
    return scores, best.get("decoder")


def in_threads(compute: Callable, items: list, workers: int | None = None) -> list:
    """[compute(item) for item in items], side by side on the CPU's threads (torch's kernels, scipy's
    matching and sparse products release the GIL; no result depends on the order), torch at one thread per
    item instead of a team per item. workers: at most this many at once (default: torch's thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, workers or threads))) as pool:
            return list(pool.map(compute, items))
    finally:
        torch.set_num_threads(threads)


def run_pairs(compute: Callable[[int, int], object], pairs: list[tuple[int, int]]) -> list:
    """compute(i, j) for every pair, side by side on the CPU's threads (in_threads)."""
    return in_threads(lambda ij: compute(*ij), pairs)


def pair_matrices(S: int, pairs: list[tuple[int, int]], outcomes: list[dict]) -> dict[str, np.ndarray]:
    """One [S, S] matrix (or [S, S, ...] for an array value) per name from one dict of values per pair
    (i, j): a tuple (i -> j, j -> i) fills the two directions, anything else both cells. The diagonal and
    a pair without the value stay NaN."""
    matrices = {}
    for (i, j), outcome in zip(pairs, outcomes):
        for name, value in outcome.items():
            if value is None:
                continue
            if isinstance(value, tuple):
                matrix = matrices.setdefault(name, np.full((S, S), np.nan))
                matrix[i, j], matrix[j, i] = value
            else:
                value = np.asarray(value, dtype=float)
                matrix = matrices.setdefault(name, np.full((S, S) + value.shape, np.nan))
                matrix[i, j] = matrix[j, i] = value
    return matrices


def direction_stability(dictionaries: list[Dictionary], device: torch.device, tau: float,
                        variants: dict[str, Variant] = VARIANTS) -> dict:
    """compare_pair on every pair of seeds (i < j), for each variant. Returns
        scores[variant][name]   [S, S] matrix per score name (directional: entry (i, j) is i -> j; the others
                                symmetric), [S, S, len(TAU_GRID)] per curve; absent when no pair has it
        latent_match            per seed [m]: each latent's best decoder cosine in another seed (signed, all
                                latents), averaged over the other seeds
        first_pair              the decoder MaxCosine of seeds 0 and 1 (signed, all latents), for a heat map
    Variants that coincide (alive-only when no latent is dead) are computed once."""
    S = len(dictionaries)
    everything_alive = all(bool(dictionary.alive.all()) for dictionary in dictionaries)
    pairs = list(combinations(range(S), 2))
    computed, scores = {}, {}
    latent_match = [torch.zeros(len(dictionary.alive), dtype=torch.float64) for dictionary in dictionaries]
    first_pair = None
    for name_of_variant, variant in variants.items():
        effective = variant._replace(alive_only=variant.alive_only and not everything_alive)
        if effective not in computed:
            outcomes = run_pairs(lambda i, j: compare_pair(dictionaries[i], dictionaries[j], effective, device, tau),
                                 pairs)
            computed[effective] = pair_matrices(S, pairs, [pair for pair, _ in outcomes])
            if not effective.absolute and not effective.alive_only:
                for (i, j), (_, best) in zip(pairs, outcomes):
                    if best is not None:
                        latent_match[i] += best.best_a.double()
                        latent_match[j] += best.best_b.double()
                first_pair = outcomes[0][1] if outcomes else None
        scores[name_of_variant] = computed[effective]
    return {"scores": scores, "latent_match": [m / max(1, S - 1) for m in latent_match], "first_pair": first_pair}


def null_pairs(dictionaries: list[Dictionary], device: torch.device, tau: float,
               variants: dict[str, Variant] = VARIANTS) -> dict[str, dict[str, list]]:
    """A random null's direction scores: compare_pair on its independent pairs (dictionaries 2i and 2i + 1).
    Returns {variant: {name: [one value per pair]}}."""
    pairs = [(i, i + 1) for i in range(0, len(dictionaries) - 1, 2)]
    result = {}
    for name_of_variant, variant in variants.items():
        outcomes = run_pairs(lambda i, j: compare_pair(dictionaries[i], dictionaries[j], variant, device, tau)[0],
                             pairs)
        result[name_of_variant] = values_by_name(outcomes)
    return result


def values_by_name(outcomes: list[dict]) -> dict[str, list]:
    """{name: [value per outcome]} from one dict per outcome (a name missing from one is None there)."""
    names = dict.fromkeys(name for outcome in outcomes for name in outcome)
    return {name: [outcome.get(name) for outcome in outcomes] for name in names}


# --------------------------------------------------------------------------------------------------
# Statistics: seed pairs share seeds, so intervals come from resampling seeds, never the list of pairs.


def mean_and_ci(values: np.ndarray | None) -> dict | None:
    """Mean and percentile confidence interval (CI_LEVEL) from BOOTSTRAP_RESAMPLES resamples of the seeds.

    values [S]: one number per seed; the statistic is their mean. values [S, S]: one number per ordered
    pair of seeds (diagonal ignored); the statistic is the mean over the pairs of DISTINCT seeds in the
    resample (a seed drawn twice is not paired with itself). None when a value is missing (NaN)."""
    if values is None:
        return None
    values = np.asarray(values, dtype=float)
    S = len(values)
    off_diagonal = ~np.eye(S, dtype=bool) if values.ndim == 2 else None
    if S == 0 or np.isnan(values[off_diagonal] if values.ndim == 2 else values).any():
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


def mean_curve(curve: np.ndarray | None) -> list[float] | None:
    """A curve's mean over the pairs of seeds, from [S, S, len(TAU_GRID)]; None when a pair lacks it."""
    if curve is None:
        return None
    off_diagonal = ~np.eye(len(curve), dtype=bool)
    if np.isnan(curve[off_diagonal]).any() or not off_diagonal.any():
        return None
    return curve[off_diagonal].mean(axis=0).tolist()


def null_spread(values: list | None) -> dict | None:
    """A random null's independent draws: mean, standard deviation (n - 1), min and max; None without a
    value (or when a draw lacks it)."""
    if not values or any(v is None for v in values):
        return None
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": len(x)}


def normalised(score: dict | None, null: dict | None) -> float | None:
    """(S - S_init) / (1 - S_init): 0 at the initialisation's score, 1 at perfect agreement."""
    if score is None or null is None or null["mean"] >= 1:
        return None
    return (score["mean"] - null["mean"]) / (1 - null["mean"])


def upper_end(null: dict) -> float:
    """The highest value a null reaches: its CI's upper end (the initialisation) or its largest draw."""
    return null["ci"][1] if "ci" in null else null["max"]


def above_nulls(score: dict | None, nulls: dict[str, dict | None]) -> dict[str, bool] | None:
    """Per null: whether the trained score is above it, i.e. the lower end of its CI exceeds the highest
    value the null reaches (upper_end). None without a trained score."""
    if score is None:
        return None
    return {kind: score["ci"][0] > upper_end(null) for kind, null in nulls.items() if null is not None}


def summarise(matrices: dict[str, np.ndarray], names: list[ScoreName]) -> dict:
    """{score name: mean and CI, curve name: mean per tau} over the pairs of seeds."""
    summary = {name: mean_and_ci(matrices.get(name)) for name, _, _ in names}
    return summary | {score.curve: mean_curve(matrices.get(score.curve)) for score in SCORES
                      if score.curve and any(s is score for _, s, _ in names)}


def mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------------
# Latents on every input, kept sparse; the (a, b) grid and its Fourier functions
#
# Inputs are the p^2 pairs (a, b) in the order n = a p + b (train_transformer.make_dataset). For each
# variable v of VARIABLES and frequency w = 1..(p-1)/2, the grid functions cos(2 pi w v / p) and
# sin(2 pi w v / p), scaled to unit norm over the grid, are orthonormal, orthogonal to the constant and to
# each other across variables: a function of one variable projects onto that variable's functions only.


def sparse_matrix(f: torch.Tensor) -> scipy.sparse.csr_matrix:
    """Latents f [N, m] as a float64 CSR matrix of their non-zeros (TopK latents are 1-6% non-zero here)."""
    f = f.detach().cpu()
    rows, cols = torch.nonzero(f, as_tuple=True)
    values = f[rows, cols].double().numpy()
    return scipy.sparse.csr_matrix((values, (rows.numpy(), cols.numpy())), shape=tuple(f.shape))


def column_moments(x: scipy.sparse.spmatrix | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of x [N, k] (a sparse matrix or a dense tensor): mean and root of the centred sum of
    squares, float64. Sparse: from the non-zeros alone, sum_n (x_n - mu)^2 = sum_n x_n^2 - N mu^2 (no
    cancellation to fear in float64 for latents that are mostly zero)."""
    n = x.shape[0]
    if scipy.sparse.issparse(x):
        mean = torch.from_numpy(np.asarray(x.sum(axis=0), dtype=float).ravel()) / n
        squares = torch.from_numpy(np.asarray(x.multiply(x).sum(axis=0), dtype=float).ravel())
        return mean, (squares - n * mean * mean).clamp_min(0).sqrt()
    x = x.detach().cpu().double()
    mean = x.mean(dim=0)
    return mean, (x - mean).pow(2).sum(dim=0).sqrt()


def grid_side(n_inputs: int) -> int:
    """p for N = p^2 inputs, p odd; anything else is not the full grid of a modular-arithmetic task."""
    p = math.isqrt(n_inputs)
    if p * p != n_inputs or p % 2 == 0 or p < 3:
        raise HusaiError(f"{n_inputs} inputs: the plane measures need all p^2 pairs (a, b) for an odd p >= 3")
    return p


def grid_variables(p: int, op: str = "add") -> torch.Tensor:
    """[4, p^2] long: the values of VARIABLES on input n = a p + b: the answer c, a, b, and the other
    combination of a and b (c = (a + b) mod p and other = (a - b) mod p for add; swapped for sub)."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    plus, minus = (a + b) % p, (a - b) % p
    return torch.stack([minus, a, b, plus] if op == "sub" else [plus, a, b, minus])


def class_sums(x: scipy.sparse.spmatrix | torch.Tensor, labels: np.ndarray, p: int) -> list[np.ndarray]:
    """For each row of labels [V, N] (values in 0..p-1), the sums of the columns of x [N, k] over the inputs
    of each label: V arrays [p, k] float64. Sparse x: one bincount over its non-zeros per variable."""
    k = x.shape[1]
    if scipy.sparse.issparse(x):
        coo = x.tocoo()
        return [np.bincount(label[coo.row] * k + coo.col, weights=coo.data, minlength=p * k).reshape(p, k)
                for label in labels]
    x = x.detach().cpu().double()
    return [torch.zeros(p, k, dtype=torch.float64).index_add_(0, torch.from_numpy(label), x).numpy()
            for label in labels]


class GridFourier(NamedTuple):
    """Columns x [N, k] on the grid, projected onto each variable's Fourier functions."""
    coefficients: torch.Tensor   # [4, n_freq, 2, k] float64: <x_col - mean, g> for g = cos, sin(2 pi w v / p)
                                 # scaled to unit norm; variable v in VARIABLES order, w = 1..n_freq
    variance: torch.Tensor       # [k] float64: sum_n (x_nk - mean_k)^2, the total the energies are shares of

    def energy(self) -> torch.Tensor:
        """[4, n_freq, k]: squared length of each column in each (variable, frequency) plane."""
        return self.coefficients.pow(2).sum(dim=2)


def grid_fourier(x: scipy.sparse.spmatrix | torch.Tensor, p: int, op: str = "add") -> GridFourier:
    """Project every column of x [p^2, k] (latents as a sparse matrix, or a dense tensor) onto the
    orthonormal grid functions of the four variables.

    A grid function of variable v is h(v_n) / sqrt(p) for h a non-constant row of the orthonormal basis on
    Z_p; it sums to zero over the grid, so <x - mean, g> = <x, g> = sqrt(p) sum_u h(u) M_v(u) with M_v(u)
    the mean of x over the p inputs where v = u (class_sums / p)."""
    if x.shape[0] != p * p:
        raise HusaiError(f"{x.shape[0]} rows: expected p^2 = {p * p}, one per input (a, b)")
    k, n_freq = x.shape[1], (p - 1) // 2
    F = fourier_basis(p)[0].double()[1:]                                    # [p - 1, p]: cos_1, sin_1, cos_2, ...
    coefficients = torch.stack([p**-0.5 * F @ torch.from_numpy(sums)
                                for sums in class_sums(x, grid_variables(p, op).numpy(), p)])
    _, norm = column_moments(x)
    return GridFourier(coefficients.view(4, n_freq, 2, k), norm.pow(2))


# --------------------------------------------------------------------------------------------------
# What each latent is: energy share, firing rate, type, fundamental frequency, harmonic purity


def energy_shares(f: scipy.sparse.spmatrix, W_dec: torch.Tensor) -> torch.Tensor:
    """Each latent's share of the reconstruction energy [m] (float64, sums to 1 unless all are dead):
    e_i = sum_n f_ni^2 ||W_dec_i||^2 / sum_j sum_n f_nj^2 ||W_dec_j||^2, the squared Frobenius norm of
    latent i's rank-one contribution f_:i W_dec_i to the reconstruction, over all latents' total."""
    if f.shape[1] != W_dec.shape[0]:
        raise HusaiError(f"{f.shape[1]} latents but {W_dec.shape[0]} decoder rows")
    squares = torch.from_numpy(np.asarray(f.multiply(f).sum(axis=0), dtype=float).ravel())
    energy = squares * W_dec.detach().cpu().double().pow(2).sum(dim=1)
    return energy / energy.sum().clamp_min(1e-300)


def firing_rates(f: scipy.sparse.spmatrix) -> torch.Tensor:
    """Share of inputs on which each latent is non-zero [m] (float64)."""
    return torch.from_numpy(np.asarray(f.getnnz(axis=0), dtype=float)) / f.shape[0]


def variable_shares(fourier: GridFourier) -> torch.Tensor:
    """[4, k]: the share of each column's variance that is a function of c, a, b and the other
    combination. The four function spaces are orthogonal, so the shares add up to at most 1; the rest is
    interaction."""
    return fourier.energy().sum(dim=1) / fourier.variance.clamp_min(1e-300)


def frequency_energy(fourier: GridFourier) -> torch.Tensor:
    """[n_freq, k]: energy of each column at each frequency, the four variables together: the 2-D Fourier
    block {1, cos w, sin w} x {1, cos w, sin w} of a and b without its constant (cos w a cos w b, ... are
    combinations of cos/sin w (a + b) and w (a - b)), the block of sae_core's neuron purity."""
    return fourier.energy().sum(dim=0)


def latent_types(fourier: GridFourier) -> torch.Tensor:
    """[k] long index into LATENT_TYPES: the variable holding >= TYPE_SHARE of the latent's variance (at
    most one can); else "frequency" when one frequency (frequency_energy) holds that share, as an MLP
    neuron of the grokked model does; "unexplained" when neither; "dead" when it never varies on the grid."""
    best_share, best = variable_shares(fourier).max(dim=0)
    one_frequency = frequency_energy(fourier).max(dim=0).values / fourier.variance.clamp_min(1e-300)
    types = torch.where(best_share >= TYPE_SHARE, best,
                        torch.where(one_frequency >= TYPE_SHARE, LATENT_TYPES.index("frequency"),
                                    LATENT_TYPES.index("unexplained")))
    dead = fourier.variance <= 1e-12 * fourier.variance.max().clamp_min(1e-300)
    return torch.where(dead, LATENT_TYPES.index("dead"), types)


def c_energy(fourier: GridFourier) -> torch.Tensor:
    """[n_freq, k]: energy of each column at each frequency of the answer c."""
    return fourier.energy()[0]


def fundamental_frequencies(fourier: GridFourier, types: torch.Tensor) -> torch.Tensor:
    """[k]: a latent's fundamental (1..n_freq): the frequency of c holding the most of its energy, or for
    a frequency-latent the frequency holding the most of the four variables' energy together."""
    of_c = c_energy(fourier).argmax(dim=0) + 1
    return torch.where(types == LATENT_TYPES.index("frequency"), frequency_energy(fourier).argmax(dim=0) + 1, of_c)


def harmonic_table(p: int, harmonics: int = HARMONICS) -> torch.Tensor:
    """[n_freq, J] long: for fundamental w (row w - 1) the frequencies j w mod p, j = 1..J, folded into
    1..n_freq (w and p - w are one frequency), as 0-based rows; J = min(harmonics, n_freq)."""
    n_freq = (p - 1) // 2
    j = torch.arange(1, min(harmonics, n_freq) + 1)
    multiples = (torch.arange(1, n_freq + 1)[:, None] * j) % p
    return torch.minimum(multiples, p - multiples) - 1


def harmonic_purity(fourier: GridFourier, p: int) -> torch.Tensor:
    """Density-independent purity [k]: the share of a column's variance that is a function of c and
    lies in one harmonic family, max over fundamentals w of sum_{j <= HARMONICS} E_c(j w) / variance.

    An arc relu(cos(w c - phi) - t) is a function of c whose spectrum is w's harmonics, so it scores
    ~1 whatever its firing rate (>= 0.99 from ~15% of inputs up; the neuron purity of sae_core, one
    frequency's block only, gives a half circle 0.84 and a 20% arc 0.37). A latent that is a function
    of a, b or the other combination, or of no single variable, scores low."""
    in_family = c_energy(fourier)[harmonic_table(p)].sum(dim=1)            # [n_freq, k]
    return in_family.max(dim=0).values / fourier.variance.clamp_min(1e-300)


def type_summary(types: torch.Tensor, energy: torch.Tensor) -> dict:
    """Per latent type: how many latents and what share of the reconstruction energy they hold."""
    return {name: {"count": int((types == t).sum()), "energy": float(energy[types == t].sum())}
            for t, name in enumerate(LATENT_TYPES)}


# --------------------------------------------------------------------------------------------------
# Planes: the true planes, harmonic families, and the plane each family writes


def orthonormal_span(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [d, r] of the column span of vectors [d, k] (float64); directions whose
    singular value is below rtol times the largest are dropped, so a degenerate plane stays a line."""
    if vectors.numel() == 0:
        return torch.zeros(vectors.shape[0], 0, dtype=torch.float64)
    U, S, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    return U[:, S > rtol * S.max()] if S.max() > 0 else U[:, :0]


def principal_cosines(P: torch.Tensor | None, Q: torch.Tensor | None) -> list[float]:
    """Cosines of the two principal angles between two planes given by orthonormal bases [d, <= 2]
    (singular values of P^T Q), largest first, padded with 0 where a basis has fewer than two columns
    or is missing (None)."""
    cosines = [0.0, 0.0]
    if P is not None and Q is not None and P.shape[1] and Q.shape[1]:
        values = torch.linalg.svdvals(P.T.double() @ Q.double()).clamp(max=1).tolist()
        cosines[:len(values)] = values[:2]
    return cosines


def plane_similarity(P: torch.Tensor | None, Q: torch.Tensor | None) -> float:
    """The smaller principal-angle cosine of two planes: every direction of either plane lies within
    arccos of it of the other plane. 1 for the same plane; 0 when they share no direction, when either
    is missing (no latent writes it), or when either is only a line."""
    return min(principal_cosines(P, Q))


def centred_gram(f: scipy.sparse.spmatrix, latents: torch.Tensor) -> torch.Tensor:
    """X^T X [k, k] float64 for X the chosen latents' centred activations: F^T F - N mu mu^T, with F^T F a
    sparse product when the chosen columns are sparse (density < SPARSE_DENSITY), else dense float64 products
    over blocks of at most CHUNK_ELEMENTS numbers of F (plane carriers are often denser than that, and a
    dense product is several times faster there; the two differ by summation order only)."""
    X = f[:, latents.numpy()]
    n, k = X.shape
    mean = np.asarray(X.mean(axis=0), dtype=float).ravel()
    if X.nnz < SPARSE_DENSITY * n * k:
        product = torch.from_numpy(np.asarray((X.T @ X).todense(), dtype=float))
    else:
        product = torch.zeros(k, k, dtype=torch.float64)
        rows = max(1, CHUNK_ELEMENTS // max(1, k))
        for start in range(0, n, rows):
            block = torch.from_numpy(X[start:start + rows].toarray())
            product += block.T @ block
    return product - n * torch.from_numpy(np.outer(mean, mean))


def frequency_r2(f: scipy.sparse.spmatrix, fourier: GridFourier, latents: torch.Tensor,
                 gram: torch.Tensor | None = None) -> torch.Tensor:
    """[n_freq]: for every frequency w, the R^2 of decoding the unit grid functions cos(w c), sin(w c)
    linearly (with intercept) from the chosen latents of f [N, m] (sparse), averaged over the two. With X
    [N, k] the latents' centred activations and q = X^T g their coefficients, R^2(g) = q^T (X^T X)^+ q:
    the targets are centred and unit length, so the intercept adds nothing and the total sum of squares
    is 1. One Gram matrix (centred_gram, or its slice when given) and pseudo-inverse serve every w. With k
    latents and N inputs, chance alone gives about k / N."""
    if len(latents) == 0:
        return torch.zeros(fourier.coefficients.shape[1], dtype=torch.float64)
    gram = centred_gram(f, latents) if gram is None else gram
    inverse = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10)
    q = fourier.coefficients[0][:, :, latents]                                 # [n_freq, 2, k]
    return torch.einsum("wik,kl,wil->w", q, inverse, q).div(2).clamp(0, 1)


def plane_carriers(types: torch.Tensor) -> torch.Tensor:
    """[k] bool: the latents of PLANE_TYPES."""
    return torch.isin(types, torch.tensor([LATENT_TYPES.index(t) for t in PLANE_TYPES]))


def latent_gram(f: scipy.sparse.spmatrix, chosen: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """One centred_gram of the chosen latents (mask [m]); returns the function that slices it for any
    subset of them (a group or a family)."""
    latents = torch.nonzero(chosen).squeeze(1)
    gram = centred_gram(f, latents)
    position = torch.full((len(chosen),), -1, dtype=torch.long)
    position[latents] = torch.arange(len(latents))

    def of(subset: torch.Tensor) -> torch.Tensor:
        rows = position[subset]
        return gram[rows][:, rows]
    return of


class Family(NamedTuple):
    """A harmonic family: groups of plane-carrying latents (PLANE_TYPES; one group per fundamental
    frequency) linked by decoding."""
    root: int                    # the fundamental of the family's group holding the most energy
    frequencies: list[int]       # root first, then the other members in increasing order
    latents: torch.Tensor        # [k] long: the latents of every group in the family
    links: dict                  # member w -> the best R^2 of decoding cos/sin(w c) from another member's group


def harmonic_families(f: scipy.sparse.spmatrix, fourier: GridFourier, types: torch.Tensor, energy: torch.Tensor,
                      candidates: list[int], gram: Callable | None = None) -> list[Family]:
    """Group the plane-carrying latents (c- and frequency-latents) by fundamental frequency and merge the
    groups into harmonic families.

    Groups w and w' are linked when cos/sin(w' c) decode from w's group, or cos/sin(w c) from w''s, with
    R^2 >= FAMILY_R2; families are the linked components. Both directions are tried because a harmonic
    decodes from its fundamental's arcs and not the reverse (arcs of w carry j w; those of j w cannot
    make w). For p prime every w' is +-j w mod p for some j, so the relation alone says nothing: decoding
    is the test. A candidate frequency with no group of its own joins the family whose group decodes it
    best, when that R^2 >= FAMILY_R2; otherwise it stays unplaced (no plane). gram: latent_gram of the
    plane-carrying latents, when the caller has it."""
    carries = plane_carriers(types)
    fundamental = fundamental_frequencies(fourier, types)
    groups = {int(w): torch.nonzero(carries & (fundamental == w)).squeeze(1) for w in fundamental[carries].unique()}
    gram = gram or latent_gram(f, carries)
    decodes = {w: frequency_r2(f, fourier, latents, gram(latents)) for w, latents in groups.items()}   # group -> R^2 of every w'
    parent = {w: w for w in groups}

    def find(w: int) -> int:
        while parent[w] != w:
            w = parent[w]
        return w

    for w in groups:
        for other in groups:
            if other != w and float(decodes[w][other - 1]) >= FAMILY_R2:
                parent[find(other)] = find(w)
    members = {}
    for w in groups:
        members.setdefault(find(w), []).append(w)
    for w in sorted(set(candidates) - set(groups)):
        r2, best = max((float(decodes[g][w - 1]), g) for g in groups) if groups else (0.0, None)
        if r2 >= FAMILY_R2:
            members[find(best)].append(w)
    families = []
    for ws in members.values():
        in_groups = [w for w in ws if w in groups]
        root = max(in_groups, key=lambda w: (float(energy[groups[w]].sum()), -w))
        links = {w: max((float(decodes[g][w - 1]) for g in in_groups if g != w), default=0.0) for w in ws}
        families.append(Family(root, [root] + sorted(set(ws) - {root}),
                               torch.cat([groups[w] for w in in_groups]).sort().values, links))
    return sorted(families, key=lambda family: (-float(energy[family.latents].sum()), family.root))


class PlaneFit(NamedTuple):
    """What one SAE does with the plane of frequency w."""
    family: int | None           # root of the family that holds w, None when no family does
    frequencies: list[int]       # that family's frequencies (empty when none)
    latents: int                 # how many latents that family has
    basis: torch.Tensor | None   # [d, <= 2] orthonormal: the plane the family's reconstruction writes at w
    cosines_to_truth: list[float] | None   # principal-angle cosines between that plane and the true plane
                                           # (None for a family frequency whose true plane was not given)
    r2: float                    # R^2 of decoding cos/sin(w c) from the family's latents


def written_plane(fourier: GridFourier, W_dec: torch.Tensor, latents: torch.Tensor, w: int) -> torch.Tensor:
    """The plane a group of latents writes at frequency w: the regression of the group's reconstruction
    x_hat_n = sum_{i in group} f_ni W_dec_i on the unit grid functions cos(w c), sin(w c). Its two
    coefficient vectors are sum_i <f_i, g> W_dec_i (no [N, d] reconstruction is formed); orthonormalised."""
    coefficients = fourier.coefficients[0, w - 1][:, latents]             # [2, k]
    return orthonormal_span(W_dec[latents].detach().double().cpu().T @ coefficients.T)


class PlaneAnalysis(NamedTuple):
    """One SAE's latents seen through the planes: per latent, per family and per frequency."""
    types: torch.Tensor          # [m] index into LATENT_TYPES
    fundamental: torch.Tensor    # [m] fundamental frequency (fundamental_frequencies; meaningful for c- and
                                 # frequency-latents)
    purity: torch.Tensor         # [m] harmonic purity
    families: list[Family]       # largest energy first
    planes: dict                 # w -> PlaneFit, for every requested and every family frequency
    types_summary: dict          # type -> {"count", "energy"}


class Grid(NamedTuple):
    """The (a, b) grid of a transformer whose answer has Fourier planes, and the true planes."""
    p: int
    op: str                              # add or sub
    frequencies: list[int]               # the key frequencies
    truth: dict[int, torch.Tensor]       # w -> [d, 2] orthonormal: the activations' plane of cos/sin(w c)


def true_planes(acts: torch.Tensor, frequencies: list[int], op: str = "add") -> dict[int, torch.Tensor]:
    """For each frequency w, the plane in activation space that carries w of c: the activations'
    regression on the unit grid functions cos(w c) and sin(w c) (two vectors of R^d), orthonormalised
    [d, 2]."""
    fourier = grid_fourier(acts, grid_side(len(acts)), op)
    return {w: orthonormal_span(fourier.coefficients[0, w - 1].T) for w in frequencies}


def plane_analysis(f: scipy.sparse.spmatrix, energy: torch.Tensor, W_dec: torch.Tensor, grid: Grid) -> PlaneAnalysis:
    """Everything the plane-level measures need from one SAE (trained or null alike): latents f [p^2, m]
    on the whole grid (sparse), their energy shares, decoder rows W_dec [m, d] and the grid with its true
    planes. Classifies the latents, builds the harmonic families and fits every plane."""
    p, frequencies = grid.p, grid.frequencies
    if f.shape[0] != p * p:
        raise HusaiError(f"latents on {f.shape[0]} inputs: the plane measures need all {p * p} pairs (a, b)")
    if f.shape[1] != W_dec.shape[0]:
        raise HusaiError(f"{f.shape[1]} latents but {W_dec.shape[0]} decoder rows")
    if not set(frequencies) <= set(grid.truth):
        raise HusaiError(f"frequencies {sorted(set(frequencies) - set(grid.truth))} have no true plane")
    if any(not 1 <= w <= (p - 1) // 2 for w in frequencies):
        raise HusaiError(f"frequencies {frequencies}: each must lie in 1..{(p - 1) // 2} for p = {p}")
    fourier = grid_fourier(f, p, grid.op)
    types = latent_types(fourier)
    gram = latent_gram(f, plane_carriers(types))
    families = harmonic_families(f, fourier, types, energy, frequencies, gram)
    planes = {w: PlaneFit(None, [], 0, None, [0.0, 0.0], 0.0) for w in frequencies}
    for family in families:
        r2 = frequency_r2(f, fourier, family.latents, gram(family.latents))
        for w in family.frequencies:
            basis = written_plane(fourier, W_dec, family.latents, w)
            to_truth = principal_cosines(basis, grid.truth[w]) if w in grid.truth else None
            planes[w] = PlaneFit(family.root, family.frequencies, len(family.latents), basis, to_truth,
                                 float(r2[w - 1]))
    return PlaneAnalysis(types, fundamental_frequencies(fourier, types), harmonic_purity(fourier, p), families,
                         dict(sorted(planes.items())), type_summary(types, energy))


def plane_agreement(A: PlaneAnalysis, B: PlaneAnalysis, frequencies: list[int]) -> dict[int, float]:
    """Plane-level stability of two SAEs: for each frequency w, the plane_similarity of the planes their
    families write at w (0 when either writes none)."""
    return {w: plane_similarity(A.planes[w].basis, B.planes[w].basis) for w in frequencies}


class Profile(NamedTuple):
    """One SAE's latents on every input and the per-latent numbers every functional measure reads."""
    f: scipy.sparse.csr_matrix       # [N, m] float64: the latents' non-zeros
    mean: torch.Tensor               # [m] float64
    norm: torch.Tensor               # [m] root of the centred sum of squares
    firing: torch.Tensor             # [m] share of inputs on which the latent is non-zero
    energy: torch.Tensor             # [m] share of the reconstruction energy
    planes: PlaneAnalysis | None     # with a Grid


def latent_profile(f: torch.Tensor, W_dec: torch.Tensor, grid: Grid | None = None) -> Profile:
    """A Profile from latents f [N, m] on every input (dense, any device) and decoder rows W_dec [m, d];
    the plane analysis too when there is a grid."""
    sparse = sparse_matrix(f)
    mean, norm = column_moments(sparse)
    energy = energy_shares(sparse, W_dec)
    planes = plane_analysis(sparse, energy, W_dec, grid) if grid is not None else None
    return Profile(sparse, mean, norm, firing_rates(sparse), energy, planes)


# --------------------------------------------------------------------------------------------------
# Activation-based matching: latents compared by what they do on the dataset, not by direction


def inverse_or_zero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, 1 / norm.clamp_min(1e-300), 0.0)


def standardised(f: scipy.sparse.spmatrix, columns: slice | np.ndarray, mean: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
    """The chosen columns of f [N, m] (sparse), centred and scaled to unit norm, dense float32 [N, k]
    (computed in float64); a constant column (norm 0) is 0."""
    block = torch.from_numpy(f[:, columns].toarray())
    return ((block - mean[columns]) * inverse_or_zero(norm[columns])).float()


def latent_correlations(A: Profile, B: Profile) -> torch.Tensor:
    """Pearson correlation [m_A, m_B] (float32) of every latent of A with every latent of B over the N
    inputs: C_ij = sum_n (f_ni - mu_i)(g_nj - nu_j) / (||f_i - mu_i|| ||g_j - nu_j||); 0 for a constant
    latent. Sparse latents (density < SPARSE_DENSITY) go through an exact float64 sparse product
    S = f^T g and C = (S - N mu nu^T) / (norms), written into C in row blocks; denser ones are
    standardised and multiplied in float32 blocks of rows of C. Only C itself is ever [m_A, m_B]."""
    n = A.f.shape[0]
    if B.f.shape[0] != n:
        raise HusaiError(f"latents over {n} and {B.f.shape[0]} inputs: compare them on the same inputs")
    m_a, m_b = A.f.shape[1], B.f.shape[1]
    C = torch.empty(m_a, m_b, dtype=torch.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, m_b))
    density = max(A.f.nnz / max(1, n * m_a), B.f.nnz / max(1, n * m_b))
    if density < SPARSE_DENSITY:
        S = (A.f.T.tocsr() @ B.f).tocsr()
        inv_a, inv_b = inverse_or_zero(A.norm), inverse_or_zero(B.norm)
        for start in range(0, m_a, rows):
            stop = min(start + rows, m_a)
            block = torch.from_numpy(S[start:stop].toarray()) - n * A.mean[start:stop, None] * B.mean[None]
            C[start:stop] = (block * inv_a[start:stop, None] * inv_b[None]).float()
    else:
        zB = standardised(B.f, slice(None), B.mean, B.norm)
        for start in range(0, m_a, rows):
            C[start:start + rows] = standardised(A.f, slice(start, start + rows), A.mean, A.norm).T @ zB
    return C.clamp_(-1, 1)


def matching_scores(C: torch.Tensor, energy_a: torch.Tensor, energy_b: torch.Tensor, alive_a: torch.Tensor,
                    alive_b: torch.Tensor, matched: bool = True) -> dict:
    """Scores of one pair from its latent-to-latent similarity C [m_A, m_B] (correlations here).

    Per latent: best = its max over the other SAE; matched = its value with its Hungarian partner (0 when
    unmatched). Each score is the mean of the A -> B and B -> A sides:
      max / hungarian:            unweighted mean over the alive latents of best / matched;
      max_weighted / hungarian_weighted: sum_i e_i best_i (e the energy shares, which sum to 1);
      partner_energy:             energy share of the latents whose matched value > PARTNER_CORRELATION.
    Without `matched` (or above HUNGARIAN_MAX_LATENTS) the one-to-one scores are None."""
    best_a = C.max(dim=1).values.double() if C.shape[1] else torch.zeros(C.shape[0], dtype=torch.float64)
    best_b = C.max(dim=0).values.double() if C.shape[0] else torch.zeros(C.shape[1], dtype=torch.float64)

    def both(score_a: float, score_b: float) -> float:
        return (score_a + score_b) / 2

    def mean_alive(values: torch.Tensor, alive: torch.Tensor) -> float:
        return float(values[alive].mean()) if alive.any() else 0.0

    scores = {"max": both(mean_alive(best_a, alive_a), mean_alive(best_b, alive_b)),
              "max_weighted": both(float(energy_a @ best_a), float(energy_b @ best_b)),
              "hungarian": None, "hungarian_weighted": None, "partner_energy": None,
              "best_a": best_a, "best_b": best_b}
    if matched and max(C.shape) <= HUNGARIAN_MAX_LATENTS:
        matched_a, matched_b = (torch.from_numpy(np.nan_to_num(values)) for values in partner_values(C, *one_to_one(C)))
        scores |= {"hungarian": both(mean_alive(matched_a, alive_a), mean_alive(matched_b, alive_b)),
                   "hungarian_weighted": both(float(energy_a @ matched_a), float(energy_b @ matched_b)),
                   "partner_energy": both(float(energy_a[matched_a > PARTNER_CORRELATION].sum()),
                                          float(energy_b[matched_b > PARTNER_CORRELATION].sum())),
                   "matched_a": matched_a, "matched_b": matched_b}
    return scores


def activation_matching(A: Profile, B: Profile, matched: bool = True) -> dict:
    """Activation-based matching of two SAEs on the same inputs: matching_scores on the latents' Pearson
    correlations. With plane analyses, also each latent type's stability ("by_type"): the energy-weighted
    (within the type) mean best correlation of A's and of B's latents of that type with any latent of the
    other SAE, averaged over the sides that have such latents (None when neither has)."""
    scores = matching_scores(latent_correlations(A, B), A.energy, B.energy, A.firing > 0, B.firing > 0, matched)
    if A.planes is not None and B.planes is not None:
        scores["by_type"] = {}
        for t, name in enumerate(LATENT_TYPES[:-1]):
            sides = [(profile.energy[profile.planes.types == t], best[profile.planes.types == t])
                     for profile, best in ((A, scores["best_a"]), (B, scores["best_b"]))]
            weighted = [float(e @ b / e.sum()) for e, b in sides if e.sum() > 0]
            scores["by_type"][name] = sum(weighted) / len(weighted) if weighted else None
    return scores


# --------------------------------------------------------------------------------------------------
# The phase question: do c-latents match because they are the same arcs, or only because they tile alike?


def rotation_spectra(z: torch.Tensor, p: int) -> torch.Tensor:
    """[(p+1)/2, p, m] complex: standardised latents z [p^2, m] laid out on the [a, b] grid, Fourier
    transformed along a (rfft: real signals need only frequencies 0..(p-1)/2)."""
    return torch.fft.rfft(z.double().view(p, p, -1), dim=0)


def shifted_correlations(FA: torch.Tensor, FB: torch.Tensor, p: int) -> torch.Tensor:
    """[p, m_A, m_B] float64 from rotation_spectra: R[s, i, j] = Pearson correlation of A's latent i with
    B's latent j read at (a + s, b), i.e. with B's c rotated by s (a with it, b fixed). A rotation
    permutes the inputs, so means and norms are unchanged and R[s] is a circular cross-correlation along
    a: R[s] = irfft_k(sum_b conj(FA[k, b]) FB[k, b]) at s, for all s at once."""
    cross = torch.einsum("kbi,kbj->kij", FA.conj(), FB)
    return torch.fft.irfft(cross, n=p, dim=0).clamp(-1, 1)


def phase_question(A: Profile, B: Profile, p: int, draws: int = PHASE_DRAWS) -> dict:
    """c-latent matching (matching_scores on correlations, energy shares renormalised within the
    c-latents) three ways: as trained; with each of B's c-latents rotated by its own random shift of c
    (its phase shuffled; `draws` independent shuffles, generator seeds GENERATOR_SEEDS["phase"] + i); under
    a common rotation of all of B's c-latents, the best of the p shifts and the mean over them (by
    max_weighted; the best of p is biased upwards by the choice). If shuffled phases score as high as
    trained ones, the arcs' phases are arbitrary and per-latent identity is not what makes two SAEs
    agree. A's c-latents are taken in blocks, so no [p, m_A, m_B] array is held whole."""
    c = LATENT_TYPES.index("c")
    ca = torch.nonzero(A.planes.types == c).squeeze(1).numpy()
    cb = torch.nonzero(B.planes.types == c).squeeze(1).numpy()
    if len(ca) == 0 or len(cb) == 0:
        return {"latents": [len(ca), len(cb)], "trained": None, "shuffled": None, "best_rotation": None,
                "mean_over_rotations": None}
    energy_a, energy_b = A.energy[ca] / A.energy[ca].sum(), B.energy[cb] / B.energy[cb].sum()
    alive_a, alive_b = A.firing[ca] > 0, B.firing[cb] > 0
    zA, zB = standardised(A.f, ca, A.mean, A.norm), standardised(B.f, cb, B.mean, B.norm)
    FA, FB = rotation_spectra(zA, p), rotation_spectra(zB, p)
    shifts = [torch.randint(p, (len(cb),), generator=torch.Generator().manual_seed(GENERATOR_SEEDS["phase"] + i))
              for i in range(draws)]
    columns = torch.arange(len(cb))
    trained = torch.empty(len(ca), len(cb))
    shuffled = [torch.empty(len(ca), len(cb)) for _ in shifts]
    row_max = torch.empty(p, len(ca), dtype=torch.float64)
    col_max = torch.full((p, len(cb)), -math.inf, dtype=torch.float64)
    rows = max(1, CHUNK_ELEMENTS // (2 * p * len(cb)))
    for start in range(0, len(ca), rows):
        R = shifted_correlations(FA[:, :, start:start + rows], FB, p)                # [p, c, m_B]
        trained[start:start + rows] = R[0]
        for matrix, shift in zip(shuffled, shifts):
            matrix[start:start + rows] = R[shift, :, columns].T
        row_max[:, start:start + rows] = R.max(dim=2).values
        col_max = torch.maximum(col_max, R.max(dim=1).values)
    weighted = (row_max @ energy_a + col_max @ energy_b) / 2                          # [p]: max_weighted per shift
    best = int(weighted.argmax())
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    rotated = zB[((a + best) % p) * p + b]                                           # B read at c + best

    def scores(C: torch.Tensor) -> dict:
        return {name: value for name, value in matching_scores(C, energy_a, energy_b, alive_a, alive_b).items()
                if not torch.is_tensor(value)}

    drawn = [scores(matrix) for matrix in shuffled]
    return {"latents": [len(ca), len(cb)], "trained": scores(trained),
            "shuffled": {name: null_spread([d[name] for d in drawn]) for name in drawn[0]} if drawn else None,
            "best_rotation": {"shift": best, **scores((zA.T @ rotated).clamp(-1, 1))},
            "mean_over_rotations": float(weighted.mean())}


# --------------------------------------------------------------------------------------------------
# Are the stable latents the pure ones, or only the ones that fire often?


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float | None:
    """Spearman correlation of x and y with z controlled: the partial correlation of their ranks,
    (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)), r the Pearson correlation of ranks. None when a
    variable is constant or z explains x or y completely."""
    ranks = [rankdata(np.asarray(v, dtype=float)) for v in (x, y, z)]
    if len(ranks[0]) < 4 or any(np.ptp(r) == 0 for r in ranks):
        return None
    r = np.corrcoef(np.stack(ranks))
    denominator = (1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2)
    return float((r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt(denominator)) if denominator > 1e-12 else None


def match_purity_correlation(match: torch.Tensor, purity: torch.Tensor, firing: torch.Tensor,
                             alive: torch.Tensor) -> dict:
    """Over the alive latents: Spearman correlation of each latent's cross-seed match with its purity,
    and the same with the firing rate controlled (partial_spearman), beside each one's correlation with
    the firing rate (a purity that tracks density makes the raw correlation a density effect)."""
    x, y, z = (t[alive].double().numpy() for t in (match, purity, firing))
    ranks = [rankdata(v) for v in (x, y, z)]
    ok = len(x) >= 4 and all(np.ptp(r) > 0 for r in ranks)
    r = np.corrcoef(np.stack(ranks)) if ok else None
    return {"latents": len(x), "spearman": float(r[0, 1]) if ok else None,
            "partial_spearman": partial_spearman(x, y, z) if ok else None,
            "match_vs_firing": float(r[0, 2]) if ok else None, "purity_vs_firing": float(r[1, 2]) if ok else None}


# --------------------------------------------------------------------------------------------------
# The data: its principal subspaces and, on the (a, b) grid, its true planes


def principal_basis(acts: torch.Tensor, share: float) -> torch.Tensor:
    """Orthonormal basis [d, r] (float64) of the top-r principal directions of acts [N, d], r the smallest
    number whose eigenvalues hold at least `share` of the variance."""
    if not 0 < share <= 1:
        raise HusaiError(f"variance share {share}: must lie in (0, 1]")
    X = acts.detach().double().cpu()
    X = X - X.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(X.T @ X)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    held = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
    rank = min(int((held < share - 1e-12).sum()) + 1, len(eigenvalues))
    return eigenvectors[:, :rank]


def subspace_share(rows: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean over unit rows [m, d] of the share of their squared length inside the subspace of basis [d, r]:
    1 for directions in it, r / d on average for isotropic ones."""
    return float((rows.double() @ basis.double()).pow(2).sum(dim=1).mean())


class DataSpace(NamedTuple):
    """What a group's activations are, computed once per group."""
    bases: dict[float, torch.Tensor]     # variance share -> orthonormal basis [d, r] of the principal subspace
    grid: Grid | None                    # with a transformer whose answer has Fourier planes (add, sub)
    variance: dict | None                # shares of the activations' variance in known planes (variance_in_planes)


def data_space(source: Source) -> DataSpace:
    """Principal subspaces of a source's activations; with a transformer whose answer has planes (add or
    sub; mul's Fourier structure lives in discrete logarithms), its key frequencies (KEY_FREQUENCY_RULE,
    from the embedding of the exact checkpoint) and the true planes."""
    bases = {share: principal_basis(source.acts, share) for share in VARIANCE_SHARES}
    model = source.model
    if model is None or model.cfg.op not in ("add", "sub") or len(source.acts) != model.cfg.p ** 2:
        return DataSpace(bases, None, None)
    p, op = model.cfg.p, model.cfg.op
    keys = embedding_spectrum(model.W_E[:p].detach().cpu())[1]
    fourier = grid_fourier(source.acts, p, op)
    truth = {w: orthonormal_span(fourier.coefficients[0, w - 1].T) for w in keys}
    return DataSpace(bases, Grid(p, op, keys, truth), variance_in_planes(fourier, keys))


def variance_in_planes(fourier: GridFourier, keys: list[int]) -> dict:
    """Shares of the activations' total variance (over all d dimensions) in known planes: for each
    variable, its planes at the key frequencies together; for each key frequency, the answer's plane."""
    total = float(fourier.variance.sum())
    energy = fourier.energy().sum(dim=2) / max(total, 1e-300)                # [4, n_freq]
    rows = [w - 1 for w in keys]
    return {"by_variable": {v: float(energy[i, rows].sum()) for i, v in enumerate(VARIABLES)},
            "answer_plane": {w: float(energy[0, w - 1]) for w in keys}}


# --------------------------------------------------------------------------------------------------
# One SAE, trained or a null, as every measure reads it


class SAEData(NamedTuple):
    """One SAE (trained, or a null) as the measures read it."""
    dictionary: Dictionary | None    # None for the random TopK null (functional scores only)
    profile: Profile


def read_sae(weights: dict, config: dict, acts: torch.Tensor, space: DataSpace, with_dictionary: bool = True,
             with_metrics: bool = False) -> tuple[SAEData, dict | None]:
    """An SAE's latents on every row of acts [N, d] (on acts' device), its Profile and Dictionary (alive =
    fires on some input), and with_metrics its reconstruction numbers (sae_core.reconstruction_metrics).
    The dense latents [N, m] are freed before the next SAE's are made: at m = 65,536 they take 3 GiB."""
    weights = {name: t.to(acts.device) for name, t in weights.items()}
    with torch.no_grad():
        latents = sae_latents(weights, config, acts)
    metrics = reconstruction_metrics(weights, config, acts, latents) if with_metrics else None
    profile = latent_profile(latents, weights["W_dec"], space.grid)
    del latents
    dictionary = (make_dictionary(weights["W_dec"], weights["W_enc"], profile.firing > 0, space.bases)
                  if with_dictionary else None)
    return SAEData(dictionary, profile), metrics


def read_saes(weights: list[dict], config: dict, acts: torch.Tensor, space: DataSpace, with_dictionary: bool = True,
              with_metrics: bool = False) -> list[tuple[SAEData, dict | None]]:
    """read_sae for several SAEs, side by side on the CPU's threads, as many at once as keep their dense
    latents [N, m] float32 within DENSE_LATENTS_BYTES."""
    workers = DENSE_LATENTS_BYTES // max(1, 4 * acts.shape[0] * int(weights[0]["W_dec"].shape[0])) if weights else 1
    return in_threads(lambda w: read_sae(w, config, acts, space, with_dictionary, with_metrics), weights, workers)


def random_topk_weights(acts: torch.Tensor, width: int, k: int, basis: torch.Tensor, seed: int) -> dict:
    """A random TopK SAE of the same shape, inside the data: decoder rows uniform on the unit sphere of
    the principal subspace `basis` [d, r], encoder W_enc = W_dec^T, b_dec = the mean activation, b_enc = 0.
    Its latents are sae_core.sae_latents(weights, {"arch": "topk", "k": k}, acts): the k largest
    positive projections of (x - mean) on the rows."""
    if not 1 <= k <= width:
        raise HusaiError(f"random TopK null: k {k} must lie between 1 and the width {width}")
    generator = torch.Generator().manual_seed(seed)
    rows = unit_rows(torch.randn(width, basis.shape[1], generator=generator, dtype=torch.float64) @ basis.T.cpu())
    return {"W_dec": rows, "W_enc": rows.T.clone(), "b_enc": torch.zeros(width),
            "b_dec": acts.detach().double().mean(dim=0).float().cpu()}


def random_null_seeds(pairs: int = NULL_PAIRS) -> list[int]:
    """Generator seeds of the random TopK null's dictionaries, two per pair (no dictionary is reused)."""
    return [GENERATOR_SEEDS["random"] + i for i in range(2 * pairs)]


def null_k(config: dict, per_seed: list[dict]) -> int:
    """k of the random TopK null: the group's k for TopK and BatchTopK, the trained seeds' mean L0 for the
    penalised architectures."""
    if "k" in config and ARCHITECTURES[config["arch"]].sparsity == "k":
        return int(config["k"])
    return max(1, round(float(np.mean([row["l0"] for row in per_seed]))))


def random_topk_null(acts: torch.Tensor, space: DataSpace, width: int, k: int) -> list[SAEData]:
    """NULL_PAIRS pairs of random TopK SAEs (random_topk_weights, in the first principal subspace), read
    like the trained ones: 2 NULL_PAIRS SAEData, pair i being entries 2i and 2i + 1."""
    basis = space.bases[VARIANCE_SHARES[0]]
    weights = [random_topk_weights(acts, width, min(k, width), basis, seed) for seed in random_null_seeds()]
    return [sae for sae, _ in read_saes(weights, {"arch": "topk", "k": k}, acts, space, with_dictionary=False)]


def subspace_null(space: DataSpace, width: int) -> list[Dictionary]:
    """NULL_PAIRS pairs of dictionaries of random directions for the projected views: rows uniform on the
    unit sphere of each view's principal subspace, in its basis' coordinates (as projected rows are).
    Generator seed GENERATOR_SEEDS["subspace"] + i for dictionary i."""
    dictionaries = []
    for i in range(2 * NULL_PAIRS):
        generator = torch.Generator().manual_seed(GENERATOR_SEEDS["subspace"] + i)
        rows = {view: unit_rows(torch.randn(width, space.bases[share].shape[1], generator=generator))
                for view, share in PROJECTED_VIEWS.items()}
        dictionaries.append(Dictionary(rows, torch.ones(width, dtype=torch.bool)))
    return dictionaries


class SourceCache(dict):
    """What depends only on a group's activations (and shape) is computed once for all the groups that
    share them: the data space (key ("space", id of the activations)) and the random nulls (key (id, width,
    k) or (id, width))."""

    def once(self, key: tuple, make: Callable[[], object]):
        """self[key], made by make() the first time."""
        if key not in self:
            self[key] = make()
        return self[key]


# --------------------------------------------------------------------------------------------------
# Functional scores of a pair of SAEs


class PairFunctions(NamedTuple):
    """What every functional score of one pair of SAEs is computed from."""
    activation: dict                 # activation_matching's scores
    planes: dict[int, float] | None  # plane agreement per key frequency; None without a grid


def compare_functions(A: Profile, B: Profile, grid: Grid | None, tau: float, matched: bool = True,
                      phase: bool = False) -> dict:
    """Every functional score of SCORES for one pair of SAEs (a one-to-one score only when `matched`),
    and the details behind the plane, type and phase tables: plane agreement per key frequency
    ("plane.<w>"), each latent type's stability ("type.<type>"), and with `phase` the phase question
    ("phase.<statistic>"); "best" holds each latent's best correlation both ways (tensors, for the
    per-latent match)."""
    activation = activation_matching(A, B, matched)
    planes = (plane_agreement(A.planes, B.planes, grid.frequencies)
              if grid is not None and A.planes is not None and B.planes is not None else None)
    pair = PairFunctions(activation, planes)
    outcome = {name: score.compute(pair, view, tau) for name, score, view in score_names("all", "function")}
    outcome |= {f"plane.{w}": value for w, value in (planes or {}).items()}
    outcome |= {f"type.{name}": value for name, value in activation.get("by_type", {}).items()}
    if phase and planes is not None:
        q = phase_question(A, B, grid.p)
        if q["trained"] is not None:
            outcome |= {"phase.latents": float(np.mean(q["latents"])),
                        "phase.trained": q["trained"]["max_weighted"],
                        "phase.shuffled": q["shuffled"]["max_weighted"]["mean"],
                        "phase.best_rotation": q["best_rotation"]["max_weighted"],
                        "phase.mean_over_rotations": q["mean_over_rotations"],
                        "phase.trained_one_to_one": q["trained"]["hungarian_weighted"],
                        "phase.shuffled_one_to_one": q["shuffled"]["hungarian_weighted"]["mean"]}
    outcome["best"] = (activation["best_a"], activation["best_b"])
    return outcome


def function_stability(saes: list[SAEData], grid: Grid | None, tau: float, phase: bool = False,
                       matched: bool = True) -> dict:
    """compare_functions on every pair of seeds. Returns {"matrices": [S, S] per name, "latent_match": per
    seed [m], each latent's best activation correlation in another seed averaged over the other seeds}."""
    S = len(saes)
    pairs = list(combinations(range(S), 2))
    outcomes = run_pairs(lambda i, j: compare_functions(saes[i].profile, saes[j].profile, grid, tau, matched, phase),
                         pairs)
    latent_match = [torch.zeros(sae.profile.f.shape[1], dtype=torch.float64) for sae in saes]
    for (i, j), outcome in zip(pairs, outcomes):
        best_a, best_b = outcome.pop("best")
        latent_match[i] += best_a
        latent_match[j] += best_b
    return {"matrices": pair_matrices(S, pairs, outcomes), "latent_match": [m / max(1, S - 1) for m in latent_match]}


def function_null(saes: list[SAEData], grid: Grid | None, tau: float) -> dict[str, list]:
    """A random null's functional scores on its independent pairs (2i, 2i + 1): {name: [value per pair]}."""
    pairs = [(i, i + 1) for i in range(0, len(saes) - 1, 2)]
    outcomes = run_pairs(lambda i, j: compare_functions(saes[i].profile, saes[j].profile, grid, tau), pairs)
    for outcome in outcomes:
        del outcome["best"]
    return values_by_name(outcomes)


# --------------------------------------------------------------------------------------------------
# The analysis of one group, section by section


def analyse_group(group: Group, source: Source, device: torch.device, tau: float,
                  cache: SourceCache) -> tuple[dict, dict]:
    """Everything about one configuration. Returns (numbers for report.json, data for the figures)."""
    result = describe_group(group)
    config = group.first.config
    space = cache.once(("space", id(source.acts)), lambda: data_space(source))
    acts = source.acts.to(device)
    trained, result["per_seed"] = analyse_seeds(group.files, acts, space)
    result["reconstruction"] = summarise_reconstruction(result["per_seed"])
    result["activations"] = summarise_activations(source.acts, space, trained)
    snapshots, snapshot_problem = load_snapshots(group.files)
    if snapshot_problem:
        result["notes"].append(f"{snapshot_problem}; no initialisation null and no dynamics")
    initial = [sae for sae, _ in read_saes(snapshots["weights"][0], config, acts, space)] if snapshots else None
    k = null_k(config, result["per_seed"])
    random = cache.once((id(source.acts), group.key.width, k),
                        lambda: random_topk_null(acts, space, group.key.width, k))
    result["null_k"] = k
    if space.grid is None:
        result["notes"].append("activations from a file, or a transformer whose answer has no Fourier planes (mul): "
                               "no planes and no latent types")

    plots, details = {}, {}
    if len(group.files) < 2:
        result["stability"] = None
        result["notes"].append(f"only one seed ({group.first.seed}): stability needs at least two seeds of one "
                               "configuration")
    else:
        result["notes"] += stability_notes(group)
        subspace = cache.once((id(source.acts), group.key.width), lambda: subspace_null(space, group.key.width))
        numbers, plots, details = analyse_stability(trained, initial, random, subspace, space.grid, device, tau)
        result |= numbers
    result["planes"] = plane_summary(trained, initial, random, space, details)
    result["latent_types"] = type_summary_of_group(trained, initial, random, details) if space.grid else None
    result["phase"] = {statistic.removeprefix("phase."): mean_and_ci(matrix)
                       for statistic, matrix in (details or {}).get("trained", {}).items()
                       if statistic.startswith("phase.")} or None   # None without c-latents in every pair
    result["match_vs_purity"] = match_vs_purity(trained, plots) if space.grid and details else None
    result["reruns"] = [rerun_similarity(a, b, acts, space, device, tau) for a, b in group.reruns]
    result["latents"] = latent_table(group.files, trained, plots)
    result["dynamics"] = (dynamics(snapshots, [f.tensors for f in group.files], details, config, acts, space, device,
                                   tau)
                          if snapshots is not None and len(group.files) > 1 else None)
    plots["purity"] = purity_plot_data(trained, initial, random) if space.grid else None
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


def analyse_seeds(files: list[SAEFile], acts: torch.Tensor, space: DataSpace) -> tuple[list[SAEData], list[dict]]:
    """Per seed, on every input acts [N, d]: its SAEData, and its reconstruction with the downstream numbers
    train_sae.py recorded."""
    read = read_saes([sae_file.tensors for sae_file in files], files[0].config, acts, space, with_metrics=True)
    per_seed = [{"seed": sae_file.seed, **metrics, **{k: sae_file.metrics.get(k) for k in DOWNSTREAM}}
                for sae_file, (_, metrics) in zip(files, read)]
    return [sae for sae, _ in read], per_seed


def summarise_reconstruction(per_seed: list[dict]) -> dict:
    """Mean and CI over seeds of each per-seed number; None where a seed lacks it."""
    return {name: mean_and_ci(values) if None not in values else None
            for name in per_seed[0] if name != "seed"
            for values in [[row[name] for row in per_seed]]}


def summarise_activations(acts: torch.Tensor, space: DataSpace, saes: list[SAEData]) -> dict:
    """The activations' size, principal ranks and known planes, and how much of each unit decoder row and
    encoder column lies in each principal subspace."""
    return {"n": len(acts), "d": acts.shape[1], "ranks": {share: basis.shape[1] for share, basis in space.bases.items()},
            **{f"{view}_in_subspace": {share: mean_and_ci([subspace_share(sae.dictionary.rows[view], basis)
                                                           for sae in saes])
                                       for share, basis in space.bases.items()}
               for view in MATCHED_VIEWS},
            "variance_in_planes": space.variance}


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


def all_scores(saes: list[SAEData], grid: Grid | None, device: torch.device, tau: float,
               phase: bool = False) -> tuple[dict, dict]:
    """Every pair score of a set of SAEs (trained, or the initialisation): {variant: {name: [S, S] matrix}}
    with the functional scores and their details (plane.<w>, type.<t>, phase.<s>) under the primary
    variant; and the per-latent matches {"decoder": per seed [m], "activation": per seed [m]} and the
    first pair's decoder MaxCosine."""
    directions = direction_stability([sae.dictionary for sae in saes], device, tau)
    functions = function_stability(saes, grid, tau, phase=phase)
    matrices = dict(directions["scores"])
    matrices[PRIMARY_VARIANT] = functions["matrices"] | matrices[PRIMARY_VARIANT]
    return matrices, {"decoder": directions["latent_match"], "activation": functions["latent_match"],
                      "first_pair": directions["first_pair"]}


def variant_names(variant: str) -> list[ScoreName]:
    """The group scores a variant has: every one for the primary variant, direction scores for the others."""
    return score_names("group") if variant == PRIMARY_VARIANT else score_names("group", "direction")


def analyse_stability(trained: list[SAEData], initial: list[SAEData] | None, random: list[SAEData],
                      subspace: list[Dictionary], grid: Grid | None, device: torch.device,
                      tau: float) -> tuple[dict, dict, dict]:
    """The trained seeds' scores and every null's, the trained scores normalised against the
    initialisation, and whether each is above each of its nulls. Returns (numbers for report.json, data
    for the figures, the primary variant's pair matrices of every score and detail {"trained": [S, S] per
    name, "init": [S, S] per name, "random": [value per pair] per name})."""
    matrices, matches = all_scores(trained, grid, device, tau, phase=True)
    numbers = {"stability": {variant: summarise(m, variant_names(variant)) for variant, m in matrices.items()},
               "pair_matrices": {variant: {name: matrices[variant][name].tolist()
                                           for name, _, _ in score_names("all") if name in matrices[variant]}
                                 for variant in matrices}}
    details = {"trained": matrices[PRIMARY_VARIANT]}
    nulls = {}
    heatmaps = {"trained": heatmap_matrix(trained[0].dictionary, trained[1].dictionary, matches["first_pair"])}
    if initial is not None:
        init_matrices, init_matches = all_scores(initial, grid, device, tau)
        nulls["init"] = {variant: summarise(m, variant_names(variant)) for variant, m in init_matrices.items()}
        details["init"] = init_matrices[PRIMARY_VARIANT]
        heatmaps["initialisation"] = heatmap_matrix(initial[0].dictionary, initial[1].dictionary,
                                                    init_matches["first_pair"])
    random_values = function_null(random, grid, tau)
    nulls["random"] = {PRIMARY_VARIANT: {name: null_spread(random_values.get(name))
                                         for name, _, _ in score_names("group", "function")}}
    details["random"] = random_values
    subspace_values = null_pairs(subspace, device, tau)
    nulls["subspace"] = {variant: {name: null_spread(values.get(name)) for name, score, view in variant_names(variant)
                                   if "subspace" in nulls_of(score, view)}
                         for variant, values in subspace_values.items()}
    numbers["nulls"] = nulls
    numbers["null_generator_seeds"] = {"random": random_null_seeds(),
                                       "subspace": [GENERATOR_SEEDS["subspace"] + i for i in range(2 * NULL_PAIRS)]}
    numbers["normalised"], numbers["above_nulls"] = {}, {}
    for variant, summary in numbers["stability"].items():
        init = nulls.get("init", {}).get(variant, {})
        numbers["normalised"][variant] = {name: normalised(summary[name], init.get(name))
                                          for name, _, _ in variant_names(variant)}
        numbers["above_nulls"][variant] = {
            name: above_nulls(summary[name], {kind: nulls.get(kind, {}).get(variant, {}).get(name)
                                              for kind in nulls_of(score, view)})
            for name, score, view in variant_names(variant)}
    return numbers, {"heatmaps": heatmaps, "matches": matches}, details


def heatmap_matrix(a: Dictionary, b: Dictionary, best: MaxCosine) -> np.ndarray:
    """FIGURE_LATENTS latents of A, evenly spaced in the order of their best cosine in B (best first),
    against their best partners in B: decoder cosines [n, n] whose diagonal holds each latent's max cosine."""
    order = torch.argsort(best.best_a, descending=True, stable=True)
    chosen = order[torch.linspace(0, len(order) - 1, min(FIGURE_LATENTS, len(order))).long()]
    return (a.rows["decoder"][chosen] @ b.rows["decoder"][best.index_a[chosen]].T).numpy()


def family_consensus(families: list[list[int]]) -> dict:
    """The family (its frequencies, root first) that holds a frequency in most seeds, and in how many."""
    counts = Counter(tuple(frequencies) for frequencies in families)
    (frequencies, seeds), = counts.most_common(1)
    return {"frequencies": list(frequencies), "seeds": seeds, "of": len(families)}


def plane_summary(trained: list[SAEData], initial: list[SAEData] | None, random: list[SAEData], space: DataSpace,
                  details: dict) -> dict | None:
    """Per key frequency: the family that writes it (the most common over seeds), the family's size,
    its written plane's recovery of the true plane (plane_similarity) and the R^2 of decoding cos/sin(w c)
    from it, each for the trained seeds [CI], the initialisation [CI] and the random null (spread over
    its dictionaries); and cross-seed plane agreement (from the pair details; None with one seed). Also
    every seed's families. None without a grid."""
    grid = space.grid
    if grid is None:
        return None

    def per_sae(saes: list[SAEData] | None, read: Callable[[PlaneFit, int], float]) -> list[float] | None:
        return [read(sae.profile.planes.planes[w], w) for sae in saes] if saes else None

    def recovery(fit: PlaneFit, w: int) -> float:
        return plane_similarity(fit.basis, grid.truth[w])

    per_frequency = {}
    for w in grid.frequencies:
        agreement = {"trained": mean_and_ci(details.get("trained", {}).get(f"plane.{w}")),
                     "init": mean_and_ci(details.get("init", {}).get(f"plane.{w}")),
                     "random": null_spread(details.get("random", {}).get(f"plane.{w}"))} if details else None
        per_frequency[w] = {
            "variance_share": space.variance["answer_plane"][w],
            "family": family_consensus([sae.profile.planes.planes[w].frequencies for sae in trained]),
            "latents": mean_and_ci(per_sae(trained, lambda fit, w: fit.latents)),
            "agreement": agreement,
            "recovery": {"trained": mean_and_ci(per_sae(trained, recovery)),
                         "init": mean_and_ci(per_sae(initial, recovery)),
                         "random": null_spread(per_sae(random, recovery))},
            "r2": {"trained": mean_and_ci(per_sae(trained, lambda fit, w: fit.r2)),
                   "init": mean_and_ci(per_sae(initial, lambda fit, w: fit.r2)),
                   "random": null_spread(per_sae(random, lambda fit, w: fit.r2))},
            "per_seed": [{"family": fit.frequencies, "latents": fit.latents, "cosines_to_truth": fit.cosines_to_truth,
                          "r2": fit.r2} for fit in (sae.profile.planes.planes[w] for sae in trained)]}
    families = {kind: [[{"root": family.root, "frequencies": family.frequencies, "latents": len(family.latents),
                         "energy": float(sae.profile.energy[family.latents].sum()),
                         "links": {str(w): r2 for w, r2 in family.links.items()}}
                        for family in sae.profile.planes.families] for sae in saes]
                for kind, saes in (("trained", trained), ("init", initial)) if saes}
    return {"frequencies": grid.frequencies, "variance_in_planes": space.variance, "per_frequency": per_frequency,
            "families": families}


def type_summary_of_group(trained: list[SAEData], initial: list[SAEData] | None, random: list[SAEData],
                          details: dict) -> dict:
    """Per latent type: count and share of the reconstruction energy for the trained seeds [CI], the
    initialisation [CI] and the random null (spread over its dictionaries); and each type's stability
    (activation_matching's by_type) across seeds, trained [CI], init [CI], random (spread over pairs)."""
    def per_sae(saes, t, what):
        return [sae.profile.planes.types_summary[t][what] for sae in saes] if saes else None

    table = {}
    for t in LATENT_TYPES:
        table[t] = {what: {"trained": mean_and_ci(per_sae(trained, t, what)),
                           "init": mean_and_ci(per_sae(initial, t, what)),
                           "random": null_spread(per_sae(random, t, what))} for what in ("count", "energy")}
        if details and t != "dead":
            table[t]["stability"] = {"trained": mean_and_ci(details["trained"].get(f"type.{t}")),
                                     "init": mean_and_ci(details.get("init", {}).get(f"type.{t}")),
                                     "random": null_spread(details["random"].get(f"type.{t}"))}
    return table


def match_vs_purity(trained: list[SAEData], plots: dict) -> dict:
    """Are the stable latents the pure ones? Over the alive latents of all seeds, harmonic purity against
    each latent's cross-seed match, by activations (best correlation) and by decoder direction (best
    cosine), each averaged over the other seeds: raw Spearman and with the firing rate controlled."""
    purity = torch.cat([sae.profile.planes.purity for sae in trained])
    firing = torch.cat([sae.profile.firing for sae in trained])
    alive = firing > 0
    return {kind: match_purity_correlation(torch.cat(plots["matches"][kind]), purity, firing, alive)
            for kind in ("activation", "decoder")}


def purity_plot_data(trained: list[SAEData], initial: list[SAEData] | None, random: list[SAEData]) -> dict:
    """Harmonic purity of the alive latents of each set, for the purity figure."""
    def alive_purity(saes):
        return torch.cat([sae.profile.planes.purity[sae.profile.firing > 0] for sae in saes]) if saes else None
    return {"trained": alive_purity(trained), "init": alive_purity(initial), "random": alive_purity(random)}


def rerun_similarity(a: SAEFile, b: SAEFile, acts: torch.Tensor, space: DataSpace, device: torch.device,
                     tau: float) -> dict:
    """Two files of one seed and configuration. Identical bits, or how far apart rounding alone (another
    thread count, machine or library version) carried one training run: the ceiling that no cross-seed
    stability can be read above. Scores as for a pair of seeds (signed, all latents)."""
    A, B = (read_sae(f.tensors, f.config, acts, space)[0] for f in (a, b))
    scores, _ = compare_pair(A.dictionary, B.dictionary, VARIANTS[PRIMARY_VARIANT], device, tau)
    scores |= compare_functions(A.profile, B.profile, space.grid, tau)
    identical = same_weights(a.tensors, b.tensors)
    return {"seed": a.seed, "files": [str(a.path), str(b.path)], "identical": identical,
            **{name: scores.get(name) for name, _, _ in score_names("group")}}


def latent_table(files: list[SAEFile], saes: list[SAEData], plots: dict) -> list[dict]:
    """Per seed and latent: the numbers behind the figures and the correlations."""
    matches = plots.get("matches")
    rows = []
    for i, (sae_file, sae) in enumerate(zip(files, saes)):
        profile, planes = sae.profile, sae.profile.planes
        rows.append({"seed": sae_file.seed, "alive": (profile.firing > 0).int().tolist(),
                     "firing": profile.firing.tolist(), "energy": profile.energy.tolist(),
                     "activation_match": matches["activation"][i].tolist() if matches else None,
                     "decoder_match": matches["decoder"][i].tolist() if matches else None,
                     "type": [LATENT_TYPES[t] for t in planes.types.tolist()] if planes else None,
                     "fundamental": planes.fundamental.tolist() if planes else None,
                     "harmonic_purity": planes.purity.tolist() if planes else None})
    return rows


def dynamics(snapshots: dict, final: list[dict], known: dict[str, dict], config: dict, acts: torch.Tensor,
             space: DataSpace, device: torch.device, tau: float) -> dict:
    """Stability across seeds at each snapshot step (the scores of the "dynamics" section, signed, all
    latents, without matching: no m x m assignment) beside the full-dataset FVU at that step. Functional
    scores need every seed's latents at every step, so they are computed up to DYNAMICS_LATENT_LIMIT
    latents; direction scores at every width. Step 0 is the initialisation and a step whose weights are
    the trained files' (final [per seed]) is the trained SAEs: neither is read or compared again, their
    pair matrices are the ones already computed (known["init"], known["trained"]: analyse_stability's
    primary variant, whose max-based scores are the same with or without matching)."""
    width = int(config["width"])
    functional = width <= DYNAMICS_LATENT_LIMIT
    names = [n for n in score_names("dynamics") if functional or n.score.level != "function"]
    variant = {PRIMARY_VARIANT: VARIANTS[PRIMARY_VARIANT]._replace(hungarian=False)}
    rows = []
    for step, weights in snapshots["weights"].items():
        if step == 0:
            matrices = known["init"]
        elif all(same_weights(w, f) for w, f in zip(weights, final)):
            matrices = known["trained"]
        else:
            matrices = snapshot_stability(weights, config, acts, space, device, tau, variant, functional)
        rows.append({"step": step, **{name: mean_and_ci(matrices.get(name)) for name, _, _ in names},
                     "fvu": mean_and_ci(snapshots["fvu"][step])})
    shown = " and ".join(dict.fromkeys(n.score.short for n in names))
    return {"what": f"{shown} ({PRIMARY_VARIANT}) and FVU at each snapshot step; step 0 is the initialisation"
                    + ("" if functional else f"; functional scores only up to width {DYNAMICS_LATENT_LIMIT}"),
            "names": [name for name, _, _ in names], "steps": rows}


def snapshot_stability(weights: list[dict], config: dict, acts: torch.Tensor, space: DataSpace, device: torch.device,
                       tau: float, variant: dict[str, Variant], functional: bool) -> dict[str, np.ndarray]:
    """The seeds' pair matrices at one snapshot step (weights: one SAE per seed): direction scores under
    `variant`, and with `functional` the functional scores without matching. Without `functional` no
    latents are computed (every latent counts as alive: the signed all-latents scores do not read it)."""
    width = int(config["width"])
    if functional:
        saes = [sae for sae, _ in read_saes(weights, config, acts, space)]
    else:
        saes = [SAEData(make_dictionary(w["W_dec"], w["W_enc"], torch.ones(width, dtype=torch.bool), space.bases), None)
                for w in weights]
    matrices = direction_stability([sae.dictionary for sae in saes], device, tau, variant)["scores"][PRIMARY_VARIANT]
    if functional:
        matrices = matrices | function_stability(saes, space.grid, tau, matched=False)["matrices"]
    return matrices


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(t, b[name]) for name, t in a.items())


# --------------------------------------------------------------------------------------------------
# Across groups


def analyse(inputs: Inputs, device: torch.device, tau: float) -> Analysis:
    """Every group that could be loaded, the comparison across them, and each transformer's spectrum."""
    results, plots, cache = [], [], SourceCache()
    for group, source in inputs.groups:
        print(f"group {group.name}: {len(group.files)} seed(s)")
        result, group_plots = analyse_group(group, source, device, tau, cache)
        results.append(result)
        plots.append(group_plots)
    rows, pareto = comparison(results)
    transformers = {s.transformer_id: s for s in inputs.sources.values() if s.model is not None}
    spectra = {transformer_id: describe_transformer(source) for transformer_id, source in sorted(transformers.items())}
    return Analysis(results, plots, rows, pareto, stability_map(rows), spectra)


def comparison(results: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per group, and the names of the groups on the Pareto frontier of stability (PARETO_SCORE
    normalised against the initialisation: higher is better) against FVU (lower is better)."""
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
    signed, all latents; None with one seed), and the answer's share of the energy and plane recovery."""
    rec = result["reconstruction"]
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
    config = result["settings"]["shared"]
    row["kind"] = sae_kind(dict(config, vary_data_order=False))
    row["data_order"] = "varied" if config.get("vary_data_order") else "same"
    row["activations"] = f"{result['hook']}-{result['source_sha256'][:8]}"   # a map never mixes two sources
    row |= {f"map_{measure.key}": measure.read(result) for measure in MAP_MEASURES}
    types, planes = result["latent_types"], result["planes"]
    for kind in ("trained", *NULLS):
        carried = [types[t]["energy"].get(kind) for t in PLANE_TYPES] if types else [None]
        row[f"plane_energy_{kind}"] = sum(stat["mean"] for stat in carried) if None not in carried else None
        recovered = [entry["recovery"].get(kind) for entry in planes["per_frequency"].values()] if planes else []
        row[f"recovery_{kind}"] = (float(np.mean([r["mean"] for r in recovered]))
                                   if recovered and None not in recovered else None)
    return row


def comparison_statistic(result: dict, name: str, statistic: str) -> float | None:
    """One statistic of a score of a group with two or more seeds: the trained mean, a null's mean or the
    normalised score (signed, all latents); None where it was not computed."""
    if statistic == "normalised":
        return result["normalised"][PRIMARY_VARIANT].get(name)
    summary = result["stability"] if statistic == "trained" else result["nulls"].get(statistic)
    return ((summary or {}).get(PRIMARY_VARIANT, {}).get(name) or {}).get("mean")


class MapMeasure(NamedTuple):
    """One headline measure of the stability map: a panel of each architecture's width x sparsity heat map,
    and a column (mean [CI], seeds resampled) of the map's table."""
    key: str                                # report.json: comparison rows' "map_<key>"
    label: str                              # panel title and column header
    digits: int
    read: Callable[[dict], dict | None]     # a group's result -> {"mean", "ci"} over its seeds or seed pairs
    log: bool = False                       # coloured on a log scale


def stability_of(name: str) -> Callable[[dict], dict | None]:
    return lambda result: ((result["stability"] or {}).get(PRIMARY_VARIANT) or {}).get(name)


def phase_of(statistic: str) -> Callable[[dict], dict | None]:
    return lambda result: (result["phase"] or {}).get(statistic)


def plane_recovery(result: dict) -> dict | None:
    """Per seed, the mean over the key frequencies of the smaller principal cosine between the plane its
    family writes and the true plane (plane_similarity); mean and CI over seeds."""
    planes = result["planes"]
    if not planes or not planes["per_frequency"]:
        return None
    per_seed = [[min(fit["cosines_to_truth"]) for fit in entry["per_seed"]] for entry in planes["per_frequency"].values()]
    return mean_and_ci(np.mean(per_seed, axis=0))


def reconstruction_of(name: str) -> Callable[[dict], dict | None]:
    return lambda result: result["reconstruction"].get(name)


MAP_MEASURES = (
    MapMeasure("plane_agreement", "plane agreement across seeds", 3, stability_of("plane_agreement")),
    MapMeasure("plane_recovery", "plane recovery (to the true plane)", 3, plane_recovery),
    MapMeasure("act_match_weighted", "energy-weighted activation match", 3, stability_of("act_match_weighted")),
    MapMeasure("latent_match", "c-latent one-to-one match, as trained", 3, phase_of("trained_one_to_one")),
    MapMeasure("latent_match_shuffled", "c-latent one-to-one match, phases shuffled", 3,
               phase_of("shuffled_one_to_one")),
    MapMeasure("fvu", "FVU", 4, reconstruction_of("fvu"), log=True),
    MapMeasure("dead_frac", "dead fraction", 3, reconstruction_of("dead_frac")),
)


def map_name(row: dict, rows: list[dict]) -> str:
    """The map a group belongs to: its kind, and its activations (hook and source) when the rows have several."""
    several = len({r["activations"] for r in rows}) > 1
    return f"{row['kind']}-{row['activations']}" if several else row["kind"]


def stability_map(rows: list[dict]) -> dict:
    """The map's verdicts from the comparison rows: the frontier (groups stable and true at a stated FVU:
    plane agreement's and plane recovery's CIs above FRONTIER_LEVEL and above their random nulls, mean FVU
    at most FRONTIER_FVU), the groups whose c-latents match one to one beyond their shuffled phases (the
    trained CI above the shuffled one), and each configuration trained with the same and with varied data orders (twins)."""
    def low(row, key):
        stat = row[f"map_{key}"]
        return stat["ci"][0] if stat else -math.inf

    def beyond(row, key, null_key):
        """The lower CI end above FRONTIER_LEVEL and above the random null's mean (random TopK atoms in the
        data's subspace): at large k they write the planes as well, and agreement there is no finding."""
        null = row.get(null_key)
        return low(row, key) > FRONTIER_LEVEL and null is not None and low(row, key) > null

    frontier = [row["name"] for row in rows if row["data_order"] == "same" and row["fvu"] <= FRONTIER_FVU
                and beyond(row, "plane_agreement", "plane_agreement_random")
                and beyond(row, "plane_recovery", "recovery_random")]
    latents = [row["name"] for row in rows if row["map_latent_match"] and row["map_latent_match_shuffled"]
               and row["map_latent_match"]["ci"][0] > row["map_latent_match_shuffled"]["ci"][1]]
    by_configuration = defaultdict(dict)
    for row in rows:
        by_configuration[(map_name(row, rows), row["width"], row["sparsity"])][row["data_order"]] = row["name"]
    twins = [{"kind": kind, "width": width, "sparsity": sparsity_text, **orders}
             for (kind, width, sparsity_text), orders in by_configuration.items() if len(orders) == 2]
    return {"frontier": frontier, "latents_beyond_phase": latents, "twins": twins,
            "frontier_rule": f"plane agreement and plane recovery with CI above {FRONTIER_LEVEL} and above "
                             f"the random null, FVU at most {FRONTIER_FVU}, same data order for every seed"}


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
    map: dict                       # stability_map's verdicts
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
    arch: str               # with its variant settings: see sae_kind()
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


def is_sae(path: Path) -> bool:
    """A seed's SAE: a folder seed<N> holding cfg.json, or an earlier run's file seed<N>.safetensors."""
    match = SAE_FILE.fullmatch(path.name)
    return bool(match) and (path.is_file() if match.group(2) else (path / SAELENS_CONFIG).is_file())


def find_sae_files(inputs: list[str]) -> list[Path]:
    """SAEs (seed folders, or files of earlier runs) from files, folders (searched recursively) and globs,
    sorted; the default glob without inputs. A seed folder or a file named explicitly is taken as it is;
    other folders and globs yield seed<N> folders and seed<N>.safetensors files only. Nothing inside a
    RUN_DIR (.husai) folder is taken: those are runs being written or set aside.
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
            if match.is_dir() and not is_sae(match):
                found |= {c for c in match.rglob("seed*") if is_sae(c) and RUN_DIR not in c.relative_to(match).parts}
            elif is_sae(match) or not glob.has_magic(pattern):
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


def sae_kind(config: dict) -> str:
    """The architecture, with the value of each of its variant settings (archetypal-shared,
    archetypal-per-seed), and varied-order when each seed had its own data order: SAEs of two kinds are
    never compared as seeds of one configuration."""
    arch = config["arch"]
    return "-".join([arch] + [str(config[name]) for name in ARCHITECTURES[arch].variant_settings]
                    + ["varied-order"] * bool(config.get("vary_data_order")))


def sparsity(config: dict) -> tuple[str, float]:
    """(parameter name, value): k for TopK and BatchTopK, the penalty coefficient for ReLU and JumpReLU, or
    target_l0 when the coefficient was steered to it."""
    name = ARCHITECTURES[config["arch"]].sparsity_setting(config)
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
        key = GroupKey(sae_kind(sae_file.config), sae_file.config["width"], *sparsity(sae_file.config),
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
    hook, at the `=` position; or the activation file or shard folder), after checking it is the one the
    SAEs were trained on (sha256). A HusaiError explains a group that cannot be analysed."""
    provenance = group.first.provenance
    kind, path, sha = source_of(provenance)
    checkpoint, hook = provenance.get("checkpoint"), provenance.get("hook")
    eval_rows = group.first.config.get("eval_rows")
    if provenance.get("position") not in ("eq", None):
        raise HusaiError(f"position {provenance['position']!r}: this analysis reads activations at `=` (eq) only")
    key = (kind, path, sha, checkpoint, hook, eval_rows if kind == "acts" else None)
    if key in cache:
        return cache[key]
    if not Path(path).exists():
        raise HusaiError(f"the {kind} file {path} named in the SAEs' provenance does not exist")
    if kind == "acts":
        cache[key] = Source(evaluation_rows(path, sha, eval_rows), None, None, path, None)
        return cache[key]
    if file_sha256(path) != sha:
        raise HusaiError(f"{path} has changed since the SAEs were trained (sha256 differs from the provenance)")
    data = activations_from(provenance)
    transformer_id = path + (f" (epoch {checkpoint})" if checkpoint is not None else "")
    cache[key] = Source(data.acts, data.model, transformer_id, path, read_training_log(training_log_path(path)))
    return cache[key]


def evaluation_rows(path: str, sha: str, eval_rows: int | None) -> torch.Tensor:
    """The rows [eval_rows, d] of an activation file or shard folder that train_sae.py evaluated the SAEs
    on: its last eval_rows rows (all of a small set; all of them for runs that predate the setting), read
    through the shard reader, after checking the set is the one in the provenance (acts_sha256)."""
    shards = ActivationShards(path, flag="the provenance's acts")
    if shards.provenance()["acts_sha256"] != sha:
        raise HusaiError(f"{path} has changed since the SAEs were trained (sha256 differs from the provenance)")
    rows = shards.rows if eval_rows is None else min(int(eval_rows), shards.rows)
    return shards.read(shards.rows - rows, shards.rows)


def read_training_log(path: Path) -> list[dict] | None:
    """Stage 1's training log (one JSON object per logged epoch), or None where there is none."""
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_snapshots(files: list[SAEFile]) -> tuple[dict | None, str | None]:
    """Each seed's snapshot file, over the steps all seeds share: ({"weights": {step: [the SAE's tensors per
    seed]}, "fvu": {step: [FVU per seed]}}, None), step 0 being the initialisation; or (None, why not)."""
    try:
        loaded = []
        for sae_file in files:
            path = seed_files(sae_file.path).snapshots
            tensors, meta = load_tensors(path, SNAPSHOT_FORMAT, SAE_VERSION, required=("step0.W_enc", "step0.W_dec"))
            bad = non_finite_tensors(tensors) + [f"FVU at step {t}" for t, v in zip(meta["steps"], meta["fvu"])
                                                 if not math.isfinite(v)]
            if bad:
                raise HusaiError(f"{path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} not finite")
            loaded.append((tensors, dict(zip(meta["steps"], meta["fvu"], strict=True))))
        steps = sorted(set.intersection(*(set(fvu) for _, fvu in loaded)))
        if 0 not in steps:
            raise KeyError("step 0, the initialisation, is not in every file's steps")
        weights = {t: [step_weights(tensors, t) for tensors, _ in loaded] for t in steps}
        snapshots = {"weights": weights, "fvu": {t: [fvu[t] for _, fvu in loaded] for t in steps}}
    except HusaiError as e:
        return None, f"snapshots unusable: {e}"
    except (KeyError, TypeError, ValueError) as e:
        return None, f"snapshots unusable: their steps, FVUs and tensors do not agree ({e!r})"
    return snapshots, None


def step_weights(tensors: dict, step: int) -> dict:
    """One step's tensors of a snapshot file ("step<t>.W_dec", ...), named as in an SAE file; a KeyError
    when W_dec or W_enc is missing."""
    prefix = f"step{step}."
    weights = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    missing = [name for name in ("W_dec", "W_enc") if name not in weights]
    if missing:
        raise KeyError(f"{prefix}{missing[0]}")
    return weights




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


def fmt_stat(stat: dict | None, digits: int = 3) -> str:
    """A mean with its CI (`mean [low, high]`, seeds resampled) or a random null's spread (`mean ± sd`)."""
    if stat is None:
        return "n/a"
    return fmt_ci(stat, digits) if "ci" in stat else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def fixed(digits: int) -> Callable[[float | None], str]:
    """A cell format: the number with `digits` decimals."""
    return lambda value: fmt(value, digits)


def with_ci(digits: int) -> Callable[[dict | None], str]:
    """A cell format: `mean [low, high]` with `digits` decimals."""
    return lambda stat: fmt_ci(stat, digits)


def stat_cell(digits: int) -> Callable[[dict | None], str]:
    """A cell format: fmt_stat with `digits` decimals."""
    return lambda stat: fmt_stat(stat, digits)


def beside_nulls(*values: float | None) -> str:
    """A cell format: the trained number, its nulls' after a slash each."""
    return " / ".join(fmt(value) for value in values)


def above_cell(above: dict[str, bool] | None) -> str:
    """A cell format: per null, whether the trained score is above it; NOT in capitals where it is not."""
    if not above:
        return "n/a"
    return ", ".join(f"{kind}: {'yes' if is_above else 'NOT above'}" for kind, is_above in above.items())


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
        return column.format(*(row.get(k) for k in keys))
    return (["| " + " | ".join(column.header for column in columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(column, row) for column in columns) + " |" for row in rows])


def score_label(score: Score, view: str | None, tau: float) -> str:
    """A score's full name in report.md: "PWMCC (max-based), decoder rows"."""
    label = score.label.format(tau=tau)
    return f"{label}, {VIEWS[view]}" if view else label


def score_short(score: Score, view: str | None) -> str:
    """A score's short name with its view: "decoder PWMCC"."""
    return f"{view} {score.short}" if view else score.short


def null_columns(kinds: list[str], digits_key: str = "digits") -> list[Column]:
    return [Column(kind, (kind, digits_key), lambda stat, digits: fmt_stat(stat, digits)) for kind in kinds]


RECONSTRUCTION_COLUMNS = [
    Column("seed", "seed", str), Column("FVU", "fvu", fixed(4)), Column("L0", "l0", fixed(1)),
    Column("dead", "dead_frac", fixed(3)), Column("acc clean", "acc_clean", fixed(4)),
    Column("acc SAE", "acc_sae", fixed(4)), Column("loss recovered (zero)", "loss_recovered_zero", fixed(3)),
    Column("(mean)", "loss_recovered_mean", fixed(3))]
COMPARISON_COLUMNS = [
    Column("group", "name", str), Column("arch", "arch", str), Column("width", "width", str),
    Column("sparsity", "sparsity", str), Column("seeds", "seeds", str), Column("FVU", "fvu", fixed(4)),
    Column("L0", "l0", fixed(1)), Column("dead", "dead_frac", fixed(3)), Column("acc (SAE)", "acc_sae", fixed(4))]
PLANE_COMPARISON_COLUMNS = [
    Column("c- and frequency-latent energy (init / random)", ("plane_energy_trained", "plane_energy_init",
                                                                "plane_energy_random"), beside_nulls),
    Column("plane recovery (init / random)", ("recovery_trained", "recovery_init", "recovery_random"), beside_nulls)]
PLANE_COLUMNS = [
    Column("w", "w", str), Column("variance share", "variance_share", fixed(3)),
    Column("family (seeds)", "family", lambda f: f"{'+'.join(map(str, f['frequencies'])) or 'none'} ({f['seeds']}/{f['of']})"),
    Column("latents", "latents", with_ci(1)),
    Column("agreement: trained", "agreement_trained", with_ci(3)), Column("init", "agreement_init", stat_cell(3)),
    Column("random", "agreement_random", stat_cell(3)),
    Column("recovery: trained", "recovery_trained", with_ci(3)), Column("init", "recovery_init", stat_cell(3)),
    Column("random", "recovery_random", stat_cell(3)),
    Column("R^2: trained", "r2_trained", with_ci(3)), Column("init", "r2_init", stat_cell(3)),
    Column("random", "r2_random", stat_cell(3))]
TYPE_COLUMNS = [
    Column("type", "type", str),
    Column("count: trained", "count_trained", with_ci(1)), Column("init", "count_init", stat_cell(1)),
    Column("random", "count_random", stat_cell(1)),
    Column("energy: trained", "energy_trained", with_ci(3)), Column("init", "energy_init", stat_cell(3)),
    Column("random", "energy_random", stat_cell(3)),
    Column("stability: trained", "stability_trained", with_ci(3)), Column("init", "stability_init", stat_cell(3)),
    Column("random", "stability_random", stat_cell(3))]


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
        "settings": {"tau": tau, "tau_grid": list(TAU_GRID), "variance_shares": list(VARIANCE_SHARES),
                     "hungarian_max_latents": HUNGARIAN_MAX_LATENTS, "type_share": TYPE_SHARE,
                     "family_r2": FAMILY_R2, "harmonics": HARMONICS, "partner_correlation": PARTNER_CORRELATION,
                     "sparse_density": SPARSE_DENSITY, "null_pairs": NULL_PAIRS, "phase_draws": PHASE_DRAWS,
                     "dynamics_latent_limit": DYNAMICS_LATENT_LIMIT, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                     "ci_level": CI_LEVEL, "generator_seeds": GENERATOR_SEEDS},
        "nulls": NULLS, "choices": dict(CHOICES), "skipped_files": inputs.skipped, "refused": inputs.refused,
        "failed_groups": inputs.failed,
        "transformers": plot_transformers(analysis.transformers, figures),
        "groups": analysis.results, "comparison": analysis.comparison, "pareto": analysis.pareto,
        "comparison_figure": plot_comparison(analysis.comparison, figures), "map": analysis.map,
    }
    report = rounded(report)
    report["map"]["figures"] = plot_maps(report["comparison"], report["map"]["frontier"], figures)
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


NULL_STYLES = {"init": "--", "random": ":", "subspace": "-."}   # how each null is drawn beside trained (solid)


def plot_group(result: dict, plots: dict, tau: float, folder: Path) -> dict[str, str]:
    """The group's figures: planes and latent types (with a grid), stability (with two seeds or more),
    purity (with a grid), dynamics (with snapshots); returns {what: file name}."""
    names = {}
    if result["planes"] is not None:
        names["planes"] = f"{result['name']}-planes.png"
        plot_planes(result, folder / names["planes"])
    if "heatmaps" in plots:
        names["stability"] = f"{result['name']}-stability.png"
        plot_stability(result, plots["heatmaps"], tau, folder / names["stability"])
    if plots.get("purity"):
        names["purity"] = f"{result['name']}-purity.png"
        plot_purity(plots["purity"], result, folder / names["purity"])
    if result.get("dynamics"):
        names["dynamics"] = f"{result['name']}-dynamics.png"
        plot_dynamics(result, folder / names["dynamics"])
    return names


def bars(ax, labels: list[str], series: dict[str, list[dict | None]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per label, one bar per series (trained, then its nulls), with the CI or
    +- one standard deviation as an error bar."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    def error(stat: dict | None) -> tuple[float, float]:
        if stat is None:
            return 0.0, 0.0
        low, high = stat["ci"] if "ci" in stat else (stat["mean"] - stat["std"], stat["mean"] + stat["std"])
        return stat["mean"] - low, high - stat["mean"]

    for i, (name, stats) in enumerate(series.items()):
        means = [stat["mean"] if stat else np.nan for stat in stats]
        errors = np.array([error(stat) for stat in stats]).T
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(x, labels)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def plot_planes(result: dict, path: Path) -> None:
    """Per key frequency, plane agreement across seeds and recovery of the true plane, trained beside its
    nulls; and each latent type's share of the reconstruction energy."""
    planes, types = result["planes"], result["latent_types"]
    frequencies = [str(w) for w in planes["per_frequency"]]
    entries = list(planes["per_frequency"].values())
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    kinds = ("trained", "init", "random")
    if all(entry["agreement"] for entry in entries):
        bars(axes[0], frequencies, {kind: [entry["agreement"][kind] for entry in entries] for kind in kinds},
             "smaller principal cosine", "plane agreement across seeds")
    else:
        axes[0].text(0.5, 0.5, "one seed: no agreement", ha="center", transform=axes[0].transAxes)
    bars(axes[1], frequencies, {kind: [entry["recovery"][kind] for entry in entries] for kind in kinds},
         "smaller principal cosine", "recovery of the true plane")
    for ax in axes[:2]:
        ax.set(xlabel="key frequency w", ylim=(0, 1.05))
    shown = [t for t in LATENT_TYPES if t != "dead"]
    bars(axes[2], shown, {kind: [types[t]["energy"][kind] for t in shown] for kind in kinds},
         "share of the reconstruction energy", "latent types")
    fig.suptitle(f"{result['name']}: the planes the SAEs write (error bars: CI over seeds; random: +- 1 sd)")
    finish(fig, path)


def plot_stability(result: dict, heatmaps: dict[str, np.ndarray], tau: float, path: Path) -> None:
    """Decoder cosines of the first two dictionaries, trained and initialisation, as heat maps; then
    each curve over tau (trained solid, nulls dashed)."""
    curved = [score for score in SCORES if score.curve]
    fig, axes = plt.subplots(1, len(heatmaps) + len(curved), figsize=(5 * (len(heatmaps) + len(curved)), 4.5))
    for ax, (label, matrix) in zip(axes, heatmaps.items()):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set(title=f"{label}: decoder cosines, first two seeds\n{FIGURE_LATENTS} latents sorted by "
                     "best match, vs their best partners",
               xlabel="partner in seed 2", ylabel="latent of seed 1")
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax, score in zip(axes[len(heatmaps):], curved):
        sets = [("trained", result["stability"])] + [(kind, nulls) for kind, nulls in result["nulls"].items()]
        for label, summary in sets:
            curve = summary.get(PRIMARY_VARIANT, {}).get(score.curve)
            if curve is not None:
                ax.plot(TAU_GRID, curve, "-" if label == "trained" else NULL_STYLES[label], label=label)
        ax.axvline(tau, color="k", lw=0.8, ls=":")   # the --tau of this report
        ax.set(xlabel="tau", ylabel=score.short, ylim=(0, 1.02), title=f"{score.short} vs tau ({PRIMARY_VARIANT})")
        ax.legend()
    finish(fig, path)


def plot_purity(data: dict, result: dict, path: Path) -> None:
    """Histogram of the harmonic purity of alive latents, trained beside its nulls, and (with two seeds or
    more) each latent's cross-seed activation match against its purity."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = np.linspace(0, 1, 41)
    for kind, purity in data.items():
        if purity is not None:
            axes[0].hist(purity.numpy(), bins=bins, density=True, alpha=0.5, label=kind)
    axes[0].set(xlabel="harmonic purity", ylabel="density", title="harmonic purity of alive latents")
    axes[0].legend()
    rows, correlation = result["latents"], result["match_vs_purity"]
    if correlation:
        match = np.concatenate([np.asarray(row["activation_match"])[np.asarray(row["alive"], bool)] for row in rows])
        purity = np.concatenate([np.asarray(row["harmonic_purity"])[np.asarray(row["alive"], bool)] for row in rows])
        axes[1].scatter(match, purity, s=4, alpha=0.4)
        stat = correlation["activation"]
        axes[1].set(title=f"activation match vs purity (Spearman {fmt(stat['spearman'])}, firing rate controlled "
                          f"{fmt(stat['partial_spearman'])})")
    axes[1].set(xlabel="mean best activation correlation in the other seeds", ylabel="harmonic purity")
    finish(fig, path)


def dynamics_names(result: dict) -> list[ScoreName]:
    """The dynamics scores the group has (functional ones only up to DYNAMICS_LATENT_LIMIT)."""
    return [n for n in score_names("dynamics") if n.name in result["dynamics"]["names"]]


def null_mean(result: dict, kind: str, name: str) -> float | None:
    """A null's mean score (primary variant), None where that null was not computed."""
    return ((result["nulls"].get(kind) or {}).get(PRIMARY_VARIANT, {}).get(name) or {}).get("mean")


def plot_dynamics(result: dict, path: Path) -> None:
    """Each dynamics score (mean and CI band) against the training step, beside its random null where it
    has one (dotted; the initialisation is step 0), and FVU on a second axis."""
    rows = result["dynamics"]["steps"]
    steps = [row["step"] for row in rows]
    names = dynamics_names(result)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colors = [f"C{i}" for i in range(10) if i != 3]   # C3 (red) is FVU's
    for i, (name, score, view) in enumerate(names):
        color = colors[i % len(colors)]
        values = [row[name] for row in rows]
        shown = [(step, v) for step, v in zip(steps, values) if v is not None]
        ax.plot([s for s, _ in shown], [v["mean"] for _, v in shown], "o-", color=color, label=score_short(score, view))
        ax.fill_between([s for s, _ in shown], [v["ci"][0] for _, v in shown], [v["ci"][1] for _, v in shown],
                        color=color, alpha=0.2)
        for kind in nulls_of(score, view):
            mean = null_mean(result, kind, name) if kind != "init" else None
            if mean is not None:
                ax.axhline(mean, color=color, ls=NULL_STYLES[kind], lw=1, label=f"{kind} null ({score_short(score, view)})")
    ax.set(xscale="symlog", xlabel="training step (0: the initialisation)", ylabel="score across seeds",
           ylim=(0, 1.02))
    twin = ax.twinx()
    twin.plot(steps, [row["fvu"]["mean"] for row in rows], "s-", color="C3", label="FVU")
    twin.set(ylabel="FVU (full dataset)", yscale="log")
    ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=7)
    twin.legend(loc="lower left", bbox_to_anchor=(1.12, 0), fontsize=7)
    ax.set_title(f"{result['name']}: stability and FVU during training")
    finish(fig, path)


def plot_comparison(rows: list[dict], folder: Path) -> str:
    """For each trends score (primary view, signed, all latents), one row of panels: stability vs width at
    fixed sparsity, vs k at fixed width, and vs the penalty at fixed width, each with its nulls (init dashed,
    random dotted)."""
    names = score_names("trends")
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.5 * len(names)), squeeze=False)
    def at_width(r): return f"{r['arch']} w{r['width']}"
    def sparsity_value(r): return r["sparsity_value"]
    panels = [("width", lambda r: f"{r['arch']} {r['sparsity']}", lambda r: r["width"], lambda r: True),
              ("k", at_width, sparsity_value, lambda r: r["sparsity_parameter"] == "k"),
              ("penalty (relu: l1, jumprelu: l0)", at_width, sparsity_value, lambda r: r["sparsity_parameter"] != "k")]
    for row_axes, (_, score, view) in zip(axes, names):
        trained = comparison_key(score, "trained")
        nulls = [kind for kind in NULLS if kind in score.comparison]
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
                for kind in nulls:
                    ax.plot(x, [r[comparison_key(score, kind)] for r in members], "x" + NULL_STYLES[kind], color=color,
                            lw=1)
            ax.set(xlabel=x_name, ylabel=score_short(score, view), ylim=(0, 1.02),
                   title=f"stability vs {x_name.split()[0]}\n(solid: trained; "
                         + ", ".join(f"{NULL_STYLES[kind]} {kind} null" for kind in nulls) + ")")
            if series:
                ax.set_xscale("log")
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no groups", ha="center", transform=ax.transAxes)
    name = "stability-vs-width-k.png"
    finish(fig, folder / name)
    return name


def map_axes(rows: list[dict]) -> tuple[list[int], list[float]]:
    """The widths (x) and sparsity values (y: k, or the penalty coefficient) of an architecture's map."""
    return sorted({row["width"] for row in rows}), sorted({row["sparsity_value"] for row in rows})


def plot_maps(rows: list[dict], frontier: list[str], folder: Path) -> dict[str, str]:
    """Per kind of SAE with two or more configurations (same data order), one figure: a width x sparsity
    heat map per MAP_MEASURES entry, each cell its mean (blank where nothing was trained or measured),
    frontier cells outlined in red. Drawn from report.json's comparison rows. Returns {kind: file}."""
    from matplotlib.colors import LogNorm, Normalize
    by_kind = defaultdict(list)
    for row in rows:
        if row["data_order"] == "same":
            by_kind[map_name(row, rows)].append(row)
    names = {}
    for kind, members in sorted(by_kind.items()):
        if len(members) < 2:
            continue
        widths, values = map_axes(members)
        columns = 4
        fig, axes = plt.subplots(math.ceil(len(MAP_MEASURES) / columns), columns, squeeze=False,
                                 figsize=(4 * columns, 0.5 * len(values) + 2.5 + 3.2 * (len(MAP_MEASURES) > columns)))
        for ax, measure in zip(axes.flat, MAP_MEASURES):
            grid = np.full((len(values), len(widths)), np.nan)
            for row in members:
                stat = row[f"map_{measure.key}"]
                if stat is not None:
                    grid[values.index(row["sparsity_value"]), widths.index(row["width"])] = stat["mean"]
            positive = grid[np.isfinite(grid) & (grid > 0)]
            norm = (LogNorm(positive.min(), max(positive.max(), positive.min() * 1.01)) if measure.log and positive.size
                    else Normalize(0, 1) if not measure.log else None)
            image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis", norm=norm)
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    ax.text(j, i, f"{value:.{min(measure.digits, 2) if not measure.log else 3}f}", ha="center",
                            va="center", fontsize=8, color="w" if norm is None or norm(value) < 0.6 else "k")
            if not np.isfinite(grid).any():
                ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes)
            for row in members:
                if row["name"] in frontier:
                    ax.add_patch(plt.Rectangle((widths.index(row["width"]) - 0.5, values.index(row["sparsity_value"]) - 0.5),
                                               1, 1, fill=False, edgecolor="red", lw=2))
            ax.set(xticks=range(len(widths)), xticklabels=widths, yticks=range(len(values)),
                   yticklabels=[f"{v:g}" for v in values], xlabel="width", ylabel=members[0]["sparsity_parameter"],
                   title=measure.label)
            ax.title.set_fontsize(9)
            fig.colorbar(image, ax=ax, fraction=0.046)
        for ax in list(axes.flat)[len(MAP_MEASURES):]:
            ax.axis("off")
        fig.suptitle(f"{kind}: the stability map (mean over seeds or seed pairs; red: the frontier)")
        names[kind] = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"map-{kind}.png")
        finish(fig, folder / names[kind])
    return names


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
    ("what is compared", "functional scores (the latents' activations on every input, and the planes their "
                         "families write) lead; decoder rows and encoder columns follow"),
    ("energy weighting", "functional scores weight each latent by its share of the reconstruction energy "
                         "(sum_n f_ni^2 \\|\\|d_i\\|\\|^2); the unweighted means are reported beside them"),
    ("signed vs \\|cos\\|", "signed cosine is primary (latents are non-negative, so direction sign is meaningful); "
                           "\\|cos\\| is a check on the max-based direction scores"),
    ("decoder vs encoder", "both, each normalised to unit length; decoder rows also inside the principal subspaces"),
    ("dead latents", "all latents and alive-only (alive = fires on at least one of the dataset's inputs) for the "
                     "direction scores; the functional scores weight dead latents by zero"),
    ("max-matching vs Hungarian", "both, named apart: max-based scores may reuse a latent; one-to-one ones "
                                  "(scipy linear_sum_assignment) are computed for the primary variant, raw views and "
                                  f"correlations only, and skipped above HUNGARIAN_MAX_LATENTS = {HUNGARIAN_MAX_LATENTS}"),
    ("width mismatch", "none: stability is only computed between SAEs of the same configuration, hence width"),
    ("nulls", "the initialisation of the same seeds for every score (normalised scores use it); random TopK SAEs in "
              "the data's subspace for the functional scores; random directions in a subspace for the direction "
              f"scores computed in it; random nulls are {NULL_PAIRS} independent pairs, shown as mean ± sd"),
    ("hook and position", "those recorded in each SAE's provenance; activations are recomputed at the `=` position"),
    ("activation normalisation", "none here: saved weights are in raw activation units and cosines and "
                                 "correlations ignore scale; the training-time setting (`normalize`) is listed per group"),
    ("key frequencies K", f"{KEY_FREQUENCY_RULE}, recomputed from the embedding of the exact checkpoint analysed"),
    ("latent types and families", f"a v-latent holds >= {TYPE_SHARE} of its variance as a function of v, a "
                                  f"frequency-latent as much at one frequency; groups of c- and frequency-latents "
                                  f"form one family when either's frequency decodes from the other's with R^2 >= "
                                  f"{FAMILY_R2}"),
    ("tau", "shared-fraction threshold; the curve over tau is in report.json and the stability figures"),
    ("number of seeds", f"{RECOMMENDED_SEEDS} or more recommended; confidence intervals resample seeds "
                        f"({BOOTSTRAP_RESAMPLES} resamples, {CI_LEVEL:.0%} percentile), never the list of pairs"),
    ("data order", "per group: the `vary_data_order` and `data_seed` settings below"),
]


DEFINITIONS = """## What the numbers are

Every score compares two SAEs of one configuration trained with different seeds and is averaged over all
pairs of seeds. Functional scores read each latent's activations f_i over all N inputs; direction scores
read unit decoder rows d_i and encoder columns, with cosines C = A B^T.

{scores}
- **Latent types**: a latent's activation over the p^2 inputs (a, b) splits into parts that are
  functions of c (the answer), of a, of b, of the other combination of a and b, and the rest (their
  interaction). A latent is a v-latent when >= {type_share} of its variance is a function of v (at most
  one can be); else a frequency-latent when >= {type_share} lies at one frequency w of the four variables
  together (the block {{1, cos w, sin w}}^2 of a and b, where an MLP neuron of this model lives);
  unexplained when neither; dead when it never varies. Per type: count, share of the reconstruction
  energy, and stability (its latents' energy-weighted best correlation in the other seed).
- **Harmonic families and planes**: c- and frequency-latents are grouped by fundamental frequency (the
  frequency of c, or for a frequency-latent of the four variables, holding most of their energy); two
  groups are one family when cos/sin of either's frequency decode linearly from the other's group with
  R^2 >= {family_r2}. At each key frequency w, the family holding w writes a plane: the regression of the
  family's reconstruction on cos(w c) and sin(w c). **Recovery** = the smaller principal-angle cosine
  between that plane and the true one (the activations' own regression on cos(w c), sin(w c)); **R^2** =
  how well cos/sin(w c) decode linearly from the family.
- **Harmonic purity** of a latent: the share of its variance that is a function of c at the harmonics
  j w (j <= {harmonics}) of one fundamental w. An arc relu(cos(w c - phi) - t) scores ~1 at any firing
  rate (the neuron rule, one frequency's block, gives a half circle 0.84).
- **Phase question**: c-latents matched as trained, with each latent's phase shuffled (B's c-latents
  each rotated by its own random shift of c; {draws} draws), and under the best common rotation of c.
- **Confidence intervals**: {ci} percentile intervals from {resamples} resamples of the seeds (the pair
  mean is recomputed over distinct resampled seeds; pairs share seeds, so they are not independent
  samples). Written `mean [low, high]`; a random null's spread over its independent pairs is written
  `mean ± sd`.
- **Nulls**, computed by the same code on SAEs of the same shape:
{nulls}
- **Normalised** = (S - S_init) / (1 - S_init): 0 = no more alike than the same seeds before training,
  1 = identical. **Above a null**: the lower end of the trained CI exceeds the highest value the null
  reaches (the initialisation's CI upper end; a random null's largest draw). A score close to its
  ceiling under every null says nothing: read the distance between the nulls first.
- **Principal subspaces**: the top principal directions of the activations holding {shares} of the
  variance; decoder rows are projected onto each and renormalised for the projected views.
- **FVU** = sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all inputs (sae_core.fvu, centred); L0 =
  mean active latents per input; dead = never fires on the dataset. Downstream accuracy is as recorded
  by train_sae.py (reconstruction spliced in at the hook).
"""


def write_report(report: dict, path: Path) -> None:
    """report.md: written from report.json's numbers only, so the two never disagree."""
    tau = report["settings"]["tau"]
    lines = (report_header(report) + definitions_section(report) + choices_section(report["settings"])
             + inputs_section(report) + transformers_section(report["transformers"]))
    for g in report["groups"]:
        lines += group_section(g, tau)
    lines += comparison_section(report, tau)
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def report_header(report: dict) -> list[str]:
    return ["# HUSAI analysis: do SAEs trained with different seeds learn the same features?", "",
            f"Generated by `{report['command']}` from the files listed below; rerunning it on the same files "
            "gives this report again, byte for byte.", "",
            "Each configuration leads with the measures that fit this model's features (circles in planes, tiled "
            "by arcs at arbitrary phases): the planes the SAEs write, the energy-weighted activation match and "
            "the latent types, each beside its nulls. Raw decoder and encoder cosines follow them.", ""]


def definitions_section(report: dict) -> list[str]:
    """What every number is: one line per score of SCORES, then the types, planes, statistics and nulls."""
    settings = report["settings"]
    scores = "\n".join(f"- {score.definition.format(tau=settings['tau'])}" for score in SCORES)
    return DEFINITIONS.format(scores=scores, ci=f"{CI_LEVEL:.0%}", resamples=BOOTSTRAP_RESAMPLES,
                              type_share=TYPE_SHARE, family_r2=FAMILY_R2, harmonics=HARMONICS, draws=PHASE_DRAWS,
                              nulls="\n".join(f"  - *{kind}*: {what}" for kind, what in report["nulls"].items()),
                              shares=" and ".join(percent(share) for share in VARIANCE_SHARES)).split("\n")


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
    """One group: what it is; the measures that fit (scores, planes, latent types, phase, purity); its
    reconstruction; the direction scores; reruns; dynamics; each where there is something to show."""
    return (group_header(g) + function_section(g, tau) + planes_section(g) + types_section(g) + phase_section(g)
            + purity_section(g) + reconstruction_section(g) + direction_section(g, tau) + reruns_section(g, tau)
            + dynamics_section(g))


def group_header(g: dict) -> list[str]:
    """Configuration, source and files; training settings; notes; the activations' subspaces and planes."""
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
    ranks = ", ".join(f"{percent(float(share))} in r = {rank}" for share, rank in acts["ranks"].items())
    lines += [f"Activations: {acts['n']} inputs x d = {acts['d']}; variance held by the top principal directions: "
              f"{ranks}."]
    planes = acts["variance_in_planes"]
    if planes:
        by_variable = ", ".join(f"{v} {fmt(share)}" for v, share in planes["by_variable"].items())
        lines[-1] += (f" Share of the variance in the key frequencies' planes, per variable: {by_variable} "
                      f"(together {fmt(sum(planes['by_variable'].values()))}).")
    return lines + [""]


def function_rows(g: dict, tau: float) -> list[dict]:
    """The functional scores of a group, each beside its nulls, normalised and whether it is above them."""
    return [{"score": score_label(score, view, tau), "digits": score.digits,
             "trained": g["stability"][PRIMARY_VARIANT].get(name),
             **{kind: (g["nulls"].get(kind) or {}).get(PRIMARY_VARIANT, {}).get(name) for kind in NULLS},
             "normalised": g["normalised"][PRIMARY_VARIANT].get(name),
             "above": g["above_nulls"][PRIMARY_VARIANT].get(name)}
            for name, score, view in score_names("group", "function")]


def score_columns(kinds: list[str]) -> list[Column]:
    return ([Column("score", "score", str), Column("trained", ("trained", "digits"), fmt_ci)]
            + null_columns(kinds) + [Column("normalised (vs init)", ("normalised", "digits"), fmt),
                                     Column("above the nulls?", "above", above_cell)])


def function_section(g: dict, tau: float) -> list[str]:
    """The functional scores beside their nulls, led by one sentence per headline score."""
    if not g["stability"]:
        return []
    lines = ["### Measures that fit: planes, activations, latent types", "",
             verdict(g, "function"), "",
             f"Trained: mean over seed pairs [CI]. Nulls: the initialisation of the same seeds [CI], random TopK "
             f"SAEs (k = {g['null_k']}) in the data's subspace (mean ± sd over {NULL_PAIRS} pairs). Primary "
             "variant (signed, all latents).", ""]
    return lines + table(score_columns(["init", "random"]), function_rows(g, tau)) + [""]


def verdict(g: dict, level: str) -> str:
    """One sentence per headline score of a level, each with its numbers: above each of its nulls or not."""
    sentences = []
    for name, score, view in score_names("headline", level):
        trained = g["stability"][PRIMARY_VARIANT].get(name)
        above = g["above_nulls"][PRIMARY_VARIANT].get(name)
        if trained is None or not above:
            continue
        nulls = "; ".join(f"{kind} {fmt_stat(g['nulls'][kind][PRIMARY_VARIANT][name], score.digits)} -> "
                          + ("above" if is_above else f"NOT above the {kind} null") for kind, is_above in above.items())
        sentences.append(f"{score_short(score, view)}: trained {fmt_ci(trained, score.digits)} vs {nulls}.")
    return f"Headline ({PRIMARY_VARIANT}): " + " ".join(sentences) if sentences else "Headline: n/a."


def planes_section(g: dict) -> list[str]:
    """Per key frequency: which family writes it, agreement across seeds, recovery of the true plane and
    decoding R^2, each beside the nulls; every seed's families; a plain sentence for each frequency whose
    agreement or recovery is not above the random null."""
    planes = g["planes"]
    if not planes:
        return []
    rows = []
    for w, entry in planes["per_frequency"].items():
        row = {"w": w, "variance_share": entry["variance_share"], "family": entry["family"],
               "latents": entry["latents"]}
        for what in ("agreement", "recovery", "r2"):
            row |= {f"{what}_{kind}": (entry[what] or {}).get(kind) for kind in ("trained", "init", "random")}
        rows.append(row)
    lines = ["#### Planes, per key frequency", "",
             "Variance share: of the activations' variance, in the answer's plane at w. Family: the frequencies of "
             "the harmonic family that writes w in most seeds (in how many). Agreement: across seeds; recovery: of "
             "the true plane (both the smaller principal cosine); R^2: cos/sin(w c) decoded from the family.", ""]
    lines += table(PLANE_COLUMNS, rows) + [""]
    lines += saturation_sentences(planes["per_frequency"])
    for kind, per_sae in planes["families"].items():
        described = "; ".join(f"seed {seed}: " + ", ".join(
            f"{'+'.join(map(str, family['frequencies']))} ({family['latents']} latents, energy "
            f"{fmt(family['energy'], 2)})" for family in families if family["latents"] > 1 or
            set(family["frequencies"]) & set(planes["frequencies"])) for seed, families in zip(g["seeds"], per_sae))
        lines += [f"Families ({kind}; families of one latent that hold no key frequency left out): {described}.", ""]
    if "planes" in g["figures"]:
        lines += [f"![planes](figures/{g['figures']['planes']})", ""]
    return lines


def saturation_sentences(per_frequency: dict) -> list[str]:
    """Plain sentences for the plane numbers that do not separate trained SAEs from the random null, saying
    why where the null itself writes the plane (its mean >= 0.5)."""
    sentences = []
    for what, label in (("agreement", "agreement across seeds"), ("recovery", "recovery of the true plane")):
        below = {w: entry[what]["random"]["mean"] for w, entry in per_frequency.items()
                 if entry[what] and entry[what]["trained"] and entry[what]["random"]
                 and not entry[what]["trained"]["ci"][0] > entry[what]["random"]["max"]}
        if below:
            sentences.append(f"Plane {label} is NOT above the random null at w = {', '.join(map(str, below))}.")
        written = [str(w) for w, mean in below.items() if mean >= 0.5]
        if written:
            sentences.append(f"At w = {', '.join(written)} random TopK dictionaries in the data's subspace write the "
                             "plane as well (any dictionary that reconstructs the answer's part of the activations "
                             "does): there the number separates trained SAEs from their initialisation only.")
    return [" ".join(sentences), ""] if sentences else []


def types_section(g: dict) -> list[str]:
    types = g["latent_types"]
    if not types:
        return []
    rows = [{"type": t, **{f"{what}_{kind}": stats.get(what, {}).get(kind)
                           for what in ("count", "energy", "stability") for kind in ("trained", "init", "random")}}
            for t, stats in types.items()]
    return (["#### Latent types", "",
             "What each latent's activation is a function of, its share of the reconstruction energy, and (two seeds "
             "or more) how stable the type is across seeds. Trained and init: mean over seeds [CI]; random: over its "
             f"{2 * NULL_PAIRS} dictionaries (stability: its {NULL_PAIRS} pairs).", ""]
            + table(TYPE_COLUMNS, rows) + [""])


def phase_section(g: dict) -> list[str]:
    phase = g["phase"]
    if not phase:
        return []
    return ["#### The phase question", "",
            f"c-latents (about {fmt(phase['latents']['mean'], 0)} per seed), energy-weighted activation match within "
            f"them, mean over seed pairs [CI]: as trained {fmt_ci(phase['trained'])}; each latent's phase shuffled "
            f"{fmt_ci(phase['shuffled'])}; under the best common rotation of c {fmt_ci(phase['best_rotation'])} "
            f"(biased upwards: the best of p); mean over all p rotations {fmt_ci(phase['mean_over_rotations'])}. "
            f"One-to-one: as trained {fmt_ci(phase['trained_one_to_one'])}, phases shuffled "
            f"{fmt_ci(phase['shuffled_one_to_one'])}. Where shuffling costs nothing, the arcs' phases are arbitrary: "
            "the seeds agree on the planes, not on the latents.", ""]


def purity_section(g: dict) -> list[str]:
    correlation = g["match_vs_purity"]
    if not correlation:
        return []
    sentences = [f"by {kind} (its best {'correlation' if kind == 'activation' else 'decoder cosine'} in the other "
                 f"seeds) rho = {fmt(c['spearman'])}, with the firing rate controlled {fmt(c['partial_spearman'])} "
                 f"(match vs firing rate {fmt(c['match_vs_firing'])})" for kind, c in correlation.items()]
    first = next(iter(correlation.values()))
    lines = ["#### Are the stable latents the pure ones?", "",
             f"Over {first['latents']} alive latents of all seeds, Spearman correlation of a latent's cross-seed match "
             f"with its harmonic purity: " + "; ".join(sentences) + f". Purity vs firing rate: "
             f"{fmt(first['purity_vs_firing'])}. A correlation that vanishes with the firing rate controlled says "
             "that latents which fire often are both stable and pure, not that purity makes a latent stable.", ""]
    if "purity" in g["figures"]:
        lines += [f"![purity](figures/{g['figures']['purity']})", ""]
    return lines


def reconstruction_section(g: dict) -> list[str]:
    return ["### Reconstruction", ""] + table(RECONSTRUCTION_COLUMNS, g["per_seed"]) + [""]


def why_directions_mislead(g: dict) -> str:
    """One sentence, with this group's numbers, on why raw decoder scores mislead for this model."""
    acts = g["activations"]
    share, rank = next(iter(acts["ranks"].items()))
    inside = acts["decoder_in_subspace"][share]
    sentence = (f"Why raw decoder scores mislead here: a trained unit decoder row has only {fmt_ci(inside, 2)} of its "
                f"squared length in the r = {rank} principal directions that hold {percent(float(share))} of the "
                f"activations' variance (r / d = {fmt(rank / acts['d'], 2)} for a random direction), so a raw cosine "
                "mostly compares each seed's leftover initialisation in directions the data never visits")
    for name, score, _ in score_names("trends", "direction"):
        projected = [f"{view}.{score.key}" for view in PROJECTED_VIEWS]
        numbers = [(g["stability"][PRIMARY_VARIANT].get(n), (g["nulls"].get("subspace") or {})
                    .get(PRIMARY_VARIANT, {}).get(n), (g["nulls"].get("init") or {}).get(PRIMARY_VARIANT, {}).get(n))
                   for n in projected]
        if all(trained and subspace for trained, subspace, _ in numbers):
            sentence += (f"; and inside the subspaces {score.short} saturates: "
                         + ", ".join(f"{VIEWS[view]} trained {fmt(trained['mean'])}, init "
                                     f"{fmt((init or {}).get('mean'))}, random directions {fmt(subspace['mean'])}"
                                     for view, (trained, subspace, init) in zip(PROJECTED_VIEWS, numbers)))
        break
    return sentence + "."


def direction_section(g: dict, tau: float) -> list[str]:
    """Every direction score under every variant beside its nulls, the directional scores seed by seed,
    the direction headline and the stability figure; nothing for a group of one seed."""
    if not g["stability"]:
        return []
    directional = score_names("directional")
    lines = ["### Direction scores: decoder rows and encoder columns", "", why_directions_mislead(g), "",
             "Trained: mean over seed pairs [CI]. Nulls: the initialisation [CI]; random directions in the subspace "
             f"(mean ± sd over {NULL_PAIRS} pairs) for the projected views. Normalised against the initialisation. "
             + " and ".join(dict.fromkeys(score.short for _, score, _ in directional))
             + ": one number per direction, in the matrix below.", ""]
    rows = [{"score": score_label(score, view, tau), "variant": variant, "digits": score.digits,
             "trained": summary.get(name),
             **{kind: (g["nulls"].get(kind) or {}).get(variant, {}).get(name) for kind in ("init", "subspace")},
             "normalised": g["normalised"][variant].get(name), "above": g["above_nulls"][variant].get(name)}
            for variant, summary in g["stability"].items()
            for name, score, view in score_names("group", "direction")
            if summary.get(name) is not None or VARIANTS[variant].hungarian or not score.one_to_one]
    columns = score_columns(["init", "subspace"])
    lines += table(columns[:1] + [Column("variant", "variant", str)] + columns[1:], rows)
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
    return lines + ["", verdict(g, "direction"), "", f"![stability](figures/{g['figures']['stability']})", ""]


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


def dynamics_section(g: dict) -> list[str]:
    if not g["dynamics"]:
        return []
    names = dynamics_names(g)
    random = "; ".join(f"{score_short(score, view)} {fmt(null_mean(g, 'random', name), score.digits)}"
                       for name, score, view in names if "random" in nulls_of(score, view))
    lines = ["### Training dynamics", "",
             g["dynamics"]["what"] + (f". The random nulls do not depend on the step: {random}." if random else "."),
             ""]
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
    score_columns_ = [Column(score.short if statistic == "trained" else f"{score.short} {statistic}",
                             comparison_key(score, statistic), fixed(score.digits))
                      for _, score, _ in score_names("comparison") for statistic in score.comparison]
    lines = ["## Comparison across configurations", "",
             f"Means over seeds (pairs of seeds for the scores), primary variant ({PRIMARY_VARIANT}), decoder view for "
             f"the direction scores, tau = {tau}. A column named after a null holds that null's mean; normalised is "
             "against the initialisation. c- and frequency-latent energy: the share of the reconstruction energy "
             "held by the latents that carry the planes; plane recovery: the mean over the key frequencies of the written "
             "plane's smaller principal cosine to the true plane (trained / init / random).", ""]
    lines += table(COMPARISON_COLUMNS + score_columns_ + PLANE_COMPARISON_COLUMNS, report["comparison"])
    return lines + ["", f"Pareto frontier ({pareto.short} normalised against the initialisation higher, FVU lower; "
                    "groups with two or more seeds): " + (", ".join(report["pareto"]) or "none (no group has two seeds)")
                    + ".", "", f"![stability vs width and k](figures/{report['comparison_figure']})", ""] + map_section(report)


MAP_COLUMNS = ([Column("group", "name", str), Column("L0", "l0", fixed(1))]
               + [Column(measure.label, f"map_{measure.key}", with_ci(measure.digits)) for measure in MAP_MEASURES])
TWIN_COLUMNS = [Column("configuration", ("kind", "width", "sparsity"), lambda kind, width, s: f"{kind} w{width} {s}")] + [
    Column(f"{measure.label}: same / varied order", ("same", "varied"), lambda a, b, key=measure.key, digits=measure.digits:
           f"{fmt_ci(a.get(key), digits)} / {fmt_ci(b.get(key), digits)}")
    for measure in MAP_MEASURES[:4]]


def map_section(report: dict) -> list[str]:
    """The stability map: per kind its heat-map figure, the table of every group's map measures with CIs,
    the frontier, where latents match beyond their phases, and same versus varied data order."""
    rows, found = report["comparison"], report["map"]
    if len(rows) < 2:
        return []
    lines = ["### The stability map", "",
             "Per kind of SAE, each headline measure on width x sparsity (k, or the penalty coefficient: its L0 is in "
             "the table), mean [CI] over seeds or seed pairs, seeds resampled. Plane agreement and recovery: the "
             "planes the harmonic families write (the invariant of a circle); energy-weighted activation match: the "
             "latents' functions; c-latent one-to-one match as trained against each latent's phase shuffled: where "
             "the two are alike, the latents agree only as a tiling of the circle, not one by one.", ""]
    lines += [f"![{kind}](figures/{name})" for kind, name in found["figures"].items()] + [""]
    order = sorted(rows, key=lambda row: (row["kind"], row["data_order"], row["sparsity_value"], row["width"]))
    lines += table(MAP_COLUMNS, order)
    lines += ["", f"Frontier ({found['frontier_rule']}): " + (", ".join(found["frontier"]) or "none") + ".", "",
              "c-latents matched one to one beyond their shuffled phases (trained CI above the shuffled CI): "
              + (", ".join(found["latents_beyond_phase"]) or "none") + ".", ""]
    if found["twins"]:
        by_name = {row["name"]: {measure.key: row[f"map_{measure.key}"] for measure in MAP_MEASURES} for row in rows}
        twins = [dict(twin, same=by_name[twin["same"]], varied=by_name[twin["varied"]]) for twin in found["twins"]]
        lines += ["Same versus varied data order (every seed its own batches, --vary-data-order):", ""]
        lines += table(TWIN_COLUMNS, twins) + [""]
    return lines


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
