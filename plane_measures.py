"""Measures that fit circular features: planes, harmonic families, energy-weighted activation matching.

The grokked model's residual stream at `=` carries, for each key frequency w, a circle: the plane of
cos(w c) and sin(w c), c = (a + b) mod p. A sparse code tiles a circle with arcs (latents whose activation
is roughly relu(cos(w c - phi))), and over the whole p x p grid every phase phi is as good as any other,
so two seeds' arcs need not match one to one even when both write the same plane. The measures here
compare SAEs where the features live: the plane a group of latents writes, each latent's activations
over the dataset weighted by its share of the reconstruction, and purity that does not depend on how
often a latent fires. Each measure is one function, applied alike to trained SAEs and to their nulls
(the untrained initialisation of the same seeds, random TopK dictionaries inside the data's subspace).

Conventions. Inputs are the p^2 pairs (a, b) in the order n = a p + b (train_transformer.make_dataset),
p odd. Latents f [N, m] on every input, activations acts [N, d], decoder rows W_dec [m, d], encoder
W_enc [d, m]. The four variables of an input are c = (a + b) mod p, a, b and (a - b) mod p. For each
variable v and frequency w = 1..(p-1)/2 the grid functions cos(2 pi w v / p) and sin(2 pi w v / p),
scaled to unit norm over the grid, are orthonormal, orthogonal to the constant and to each other
across variables: a function of one variable projects onto that variable's functions only.

The measures (issue 11), each one function for trained SAEs and nulls alike:
    principal-subspace direction scores   principal_basis, project_rows (then PWMCC / Hungarian as usual)
    activation-based matching             activation_matching (latent_correlations, matching_scores)
    ground truth as planes                true_planes, plane_analysis (latent types, harmonic families,
                                          written planes, decoding R^2), plane_agreement across seeds
    density-independent purity            harmonic_purity, match_purity_correlation (partial Spearman)
    the phase question                    phase_question
    shared fraction, one matching         shared_fraction (on cosines, raw or projected)
    nulls                                 initial_weights (step 0 of the snapshots), random_topk_weights
                                          with random_null_seeds, null_spread
What the plane measures can and cannot say: any dictionary whose latents reconstruct the c-part of the
activations writes the true planes, so random TopK dictionaries inside the data's 11-D subspace score
about as high on plane agreement as trained SAEs (one family holds all their planes). Plane agreement
separates trained SAEs from their initialisation, not from that null; the family structure (which
frequencies share a family) and the energy-weighted activation match are what the random null lacks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from sae_core import SAE_VERSION, SNAPSHOT_FORMAT, HusaiError, fourier_basis, load_tensors

# --------------------------------------------------------------------------------------------------
# Settings. Each one changes the numbers, so a report that uses these measures lists them.

VARIANCE_SHARES = (0.99, 0.999)   # direction scores are repeated inside the principal subspaces holding these
VARIABLES = ("c", "a", "b", "a-b")   # c = (a + b) mod p; "a-b" = (a - b) mod p
LATENT_TYPES = VARIABLES + ("unexplained", "dead")
TYPE_SHARE = 0.5                  # a latent is a v-latent when >= this share of its variance is a function of v
FAMILY_R2 = 0.9                   # two groups are one harmonic family when either's cos/sin decode from the other's
                                  # group this well (grokked model: harmonic pairs 0.88-0.98, other pairs <= 0.84)
HARMONICS = 10                    # harmonic purity counts a latent's c-energy at j w, j = 1..HARMONICS: an arc
                                  # firing on 20% of inputs keeps 0.997 of its variance there, on 10% 0.98
PARTNER_CORRELATION = 0.9         # a latent "has a partner" when its one-to-one partner correlates above this
SHARED_TAU = 0.7                  # shared fraction: decoder AND encoder cosine above this (Paulo & Belrose 2025)
SPARSE_DENSITY = 0.1              # latents non-zero on fewer than this share of (input, latent) pairs correlate
                                  # through a sparse product (exact, float64; its cost scales as the density
                                  # squared); denser ones in float32 blocks
CHUNK_ELEMENTS = 1 << 24          # float32 elements per block (64 MiB) in the dense correlation and Fourier sums
NULL_PAIRS = 5                    # random null: this many independent pairs of random dictionaries
PHASE_DRAWS = 5                   # phase question: this many independent per-latent phase shuffles
NULL_SEED = 5000                  # random null pair i uses generator seeds NULL_SEED + 2i and NULL_SEED + 2i + 1
PHASE_SEED = 6000                 # phase shuffle draw i uses generator seed PHASE_SEED + i

# --------------------------------------------------------------------------------------------------
# The grid and its Fourier functions


def grid_side(n_inputs: int) -> int:
    """p for N = p^2 inputs, p odd; anything else is not the full grid of a modular-arithmetic task."""
    p = math.isqrt(n_inputs)
    if p * p != n_inputs or p % 2 == 0 or p < 3:
        raise HusaiError(f"{n_inputs} inputs: the plane measures need all p^2 pairs (a, b) for an odd p >= 3")
    return p


def grid_variables(p: int) -> torch.Tensor:
    """[4, p^2] long: the values of c = (a + b) mod p, a, b and (a - b) mod p on input n = a p + b."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    return torch.stack([(a + b) % p, a, b, (a - b) % p])


def column_blocks(x: torch.Tensor):
    """Yield (start, block) over the columns of x [N, k], each block a float64 copy of at most
    CHUNK_ELEMENTS / 2 elements, so that no whole float64 copy of a wide [N, k] is ever made."""
    columns = max(1, CHUNK_ELEMENTS // (2 * max(1, len(x))))
    for start in range(0, x.shape[1], columns):
        yield start, x[:, start:start + columns].double()


class GridFourier(NamedTuple):
    """Columns x [N, k] on the grid, projected onto each variable's Fourier functions."""
    coefficients: torch.Tensor   # [4, n_freq, 2, k] float64: <x_col - mean, g> for g = cos, sin(2 pi w v / p)
                                 # scaled to unit norm; variable v in VARIABLES order, w = 1..n_freq
    variance: torch.Tensor       # [k] float64: sum_n (x_nk - mean_k)^2, the total the energies are shares of

    def energy(self) -> torch.Tensor:
        """[4, n_freq, k]: squared length of each column in each (variable, frequency) plane."""
        return self.coefficients.pow(2).sum(dim=2)


def grid_fourier(x: torch.Tensor, p: int) -> GridFourier:
    """Project every column of x [p^2, k] onto the orthonormal grid functions of the four variables.

    A grid function of variable v is h(v_n) / sqrt(p) for h a row of the orthonormal basis on Z_p, so
    <x, g> = sqrt(p) sum_u h(u) M_v(u) with M_v(u) the mean of x over the p inputs where v = u. Class means
    cost O(N k); the [N, k] columns are read in float64 blocks, never copied whole."""
    if x.shape[0] != p * p:
        raise HusaiError(f"{x.shape[0]} rows: expected p^2 = {p * p}, one per input (a, b)")
    F = fourier_basis(p)[0].double()[1:]                                 # [p - 1, p]: cos_1, sin_1, cos_2, ...
    values = grid_variables(p).to(x.device)
    n_freq, k = (p - 1) // 2, x.shape[1]
    coefficients = torch.zeros(4, p - 1, k, dtype=torch.float64)
    variance = torch.zeros(k, dtype=torch.float64)
    for start, block in column_blocks(x):
        centred = block - block.mean(dim=0)
        stop = start + block.shape[1]
        variance[start:stop] = centred.pow(2).sum(dim=0).cpu()
        for v in range(4):
            means = torch.zeros(p, block.shape[1], dtype=torch.float64, device=x.device)
            means.index_add_(0, values[v], centred).div_(p)
            coefficients[v, :, start:stop] = (p**0.5 * F.to(x.device) @ means).cpu()
    return GridFourier(coefficients.view(4, n_freq, 2, k), variance)


# --------------------------------------------------------------------------------------------------
# What each latent is: energy share, firing rate, type, fundamental frequency, harmonic purity


def energy_shares(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Each latent's share of the reconstruction energy [m] (float64, sums to 1 unless all are dead):
    e_i = sum_n f_ni^2 ||W_dec_i||^2 / sum_j sum_n f_nj^2 ||W_dec_j||^2, the squared Frobenius norm of
    latent i's rank-one contribution f_:i W_dec_i to the reconstruction, over all latents' total."""
    if f.shape[1] != W_dec.shape[0]:
        raise HusaiError(f"{f.shape[1]} latents but {W_dec.shape[0]} decoder rows")
    squares = torch.cat([block.pow(2).sum(dim=0).cpu() for _, block in column_blocks(f)])
    energy = squares * W_dec.double().pow(2).sum(dim=1).cpu()
    return energy / energy.sum().clamp_min(1e-300)


def firing_rates(f: torch.Tensor) -> torch.Tensor:
    """Share of inputs on which each latent is non-zero [m]."""
    return ((f != 0).float().sum(dim=0).double() / len(f)).cpu()   # float32 counts are exact below 2^24 inputs


def variable_shares(fourier: GridFourier) -> torch.Tensor:
    """[4, k]: the share of each column's variance that is a function of c, a, b and a - b. The four
    function spaces are orthogonal, so the shares add up to at most 1; the rest is interaction."""
    return fourier.energy().sum(dim=1) / fourier.variance.clamp_min(1e-300)


def latent_types(fourier: GridFourier) -> torch.Tensor:
    """[k] long index into LATENT_TYPES: the variable holding >= TYPE_SHARE of the latent's variance (at
    most one can), "unexplained" when none does, "dead" when the latent never varies on the grid."""
    shares = variable_shares(fourier)
    best_share, best = shares.max(dim=0)
    types = torch.where(best_share >= TYPE_SHARE, best, LATENT_TYPES.index("unexplained"))
    dead = fourier.variance <= 1e-12 * fourier.variance.max().clamp_min(1e-300)
    return torch.where(dead, LATENT_TYPES.index("dead"), types)


def c_energy(fourier: GridFourier) -> torch.Tensor:
    """[n_freq, k]: energy of each column at each frequency of c."""
    return fourier.energy()[0]


def fundamental_frequencies(fourier: GridFourier) -> torch.Tensor:
    """[k]: the frequency of c (1..n_freq) holding the most energy, a latent's fundamental."""
    return c_energy(fourier).argmax(dim=0) + 1


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
    of a, b or a - b, or of no single variable, scores low."""
    table = harmonic_table(p)
    in_family = c_energy(fourier)[table].sum(dim=1)                      # [n_freq, k]
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


def true_planes(acts: torch.Tensor, frequencies: list[int]) -> dict[int, torch.Tensor]:
    """For each frequency w, the plane in activation space that carries w of c: the activations'
    regression on the unit grid functions cos(w c) and sin(w c) (two vectors of R^d), orthonormalised
    [d, 2]."""
    fourier = grid_fourier(acts, grid_side(len(acts)))
    return {w: orthonormal_span(fourier.coefficients[0, w - 1].T) for w in frequencies}


def frequency_r2(f: torch.Tensor, fourier: GridFourier, latents: torch.Tensor) -> torch.Tensor:
    """[n_freq]: for every frequency w, the R^2 of decoding the unit grid functions cos(w c), sin(w c)
    linearly (with intercept) from the chosen latents, averaged over the two. With X [N, k] the latents'
    centred activations and q = X^T g their coefficients, R^2(g) = q^T (X^T X)^+ q: the targets are
    centred and unit length, so the intercept adds nothing and the total sum of squares is 1. One
    float64 Gram matrix and pseudo-inverse serve every w, at O(N k^2 + k^3): fine for groups of
    hundreds of latents, the slowest step for a null whose c-group holds thousands. With k latents and
    N inputs, chance alone gives about k / N."""
    if len(latents) == 0:
        return torch.zeros(fourier.coefficients.shape[1], dtype=torch.float64)
    X = f[:, latents].double()
    X = X - X.mean(dim=0)
    inverse = torch.linalg.pinv((X.T @ X).cpu(), hermitian=True, rtol=1e-10)
    q = fourier.coefficients[0][:, :, latents]                                 # [n_freq, 2, k]
    return torch.einsum("wik,kl,wil->w", q, inverse, q).div(2).clamp(0, 1)


class Family(NamedTuple):
    """A harmonic family: groups of c-latents (one per fundamental frequency) linked by decoding."""
    root: int                    # the fundamental of the family's group holding the most energy
    frequencies: list[int]       # root first, then the other members in increasing order
    latents: torch.Tensor        # [k] long: the c-latents of every group in the family
    links: dict                  # member w -> the best R^2 of decoding cos/sin(w c) from another member's group


def harmonic_families(f: torch.Tensor, fourier: GridFourier, types: torch.Tensor, energy: torch.Tensor,
                      candidates: list[int]) -> list[Family]:
    """Group the c-latents by fundamental frequency and merge the groups into harmonic families.

    Groups w and w' are linked when cos/sin(w' c) decode from w's group, or cos/sin(w c) from w''s, with
    R^2 >= FAMILY_R2; families are the linked components. Both directions are tried because a harmonic
    decodes from its fundamental's arcs and not the reverse (arcs of w carry j w; those of j w cannot
    make w). For p prime every w' is +-j w mod p for some j, so the relation alone says nothing: decoding
    is the test. A candidate frequency with no group of its own joins the family whose group decodes it
    best, when that R^2 >= FAMILY_R2; otherwise it stays unplaced (no plane)."""
    is_c = types == LATENT_TYPES.index("c")
    fundamental = fundamental_frequencies(fourier)
    groups = {int(w): torch.nonzero(is_c & (fundamental == w)).squeeze(1) for w in fundamental[is_c].unique()}
    decodes = {w: frequency_r2(f, fourier, latents) for w, latents in groups.items()}   # group -> R^2 of every w'
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
    return orthonormal_span(W_dec[latents].double().cpu().T @ coefficients.T)


class PlaneAnalysis(NamedTuple):
    """One SAE's latents seen through the planes: per latent, per family and per frequency."""
    types: torch.Tensor          # [m] index into LATENT_TYPES
    fundamental: torch.Tensor    # [m] fundamental frequency of c (meaningful for c-latents)
    purity: torch.Tensor         # [m] harmonic purity
    energy: torch.Tensor         # [m] share of the reconstruction energy
    firing: torch.Tensor         # [m] share of inputs on which the latent fires
    families: list[Family]       # largest energy first
    planes: dict                 # w -> PlaneFit, for every requested and every family frequency
    types_summary: dict          # type -> {"count", "energy"}


def plane_analysis(f: torch.Tensor, W_dec: torch.Tensor, truth: dict[int, torch.Tensor],
                   frequencies: list[int]) -> PlaneAnalysis:
    """Everything the plane-level measures need from one SAE (trained or null alike): latents f [p^2, m]
    on the whole grid, decoder rows W_dec [m, d], the true planes (true_planes) of the requested
    frequencies. Classifies the latents, builds the harmonic families and fits every plane."""
    p = grid_side(len(f))
    if f.shape[1] != W_dec.shape[0]:
        raise HusaiError(f"{f.shape[1]} latents but {W_dec.shape[0]} decoder rows")
    if not set(frequencies) <= set(truth):
        raise HusaiError(f"frequencies {sorted(set(frequencies) - set(truth))} have no true plane")
    if any(not 1 <= w <= (p - 1) // 2 for w in frequencies):
        raise HusaiError(f"frequencies {frequencies}: each must lie in 1..{(p - 1) // 2} for p = {p}")
    fourier = grid_fourier(f, p)
    types, energy = latent_types(fourier), energy_shares(f, W_dec)
    families = harmonic_families(f, fourier, types, energy, frequencies)
    planes = {w: PlaneFit(None, 0, None, [0.0, 0.0], 0.0) for w in frequencies}
    for family in families:
        r2 = frequency_r2(f, fourier, family.latents)
        for w in family.frequencies:
            basis = written_plane(fourier, W_dec, family.latents, w)
            to_truth = principal_cosines(basis, truth[w]) if w in truth else None
            planes[w] = PlaneFit(family.root, len(family.latents), basis, to_truth, float(r2[w - 1]))
    return PlaneAnalysis(types, fundamental_frequencies(fourier), harmonic_purity(fourier, p), energy,
                         firing_rates(f), families, dict(sorted(planes.items())), type_summary(types, energy))


def plane_agreement(A: PlaneAnalysis, B: PlaneAnalysis, frequencies: list[int]) -> dict[int, float]:
    """Plane-level stability of two SAEs: for each frequency w, the plane_similarity of the planes their
    families write at w (0 when either writes none)."""
    return {w: plane_similarity(A.planes[w].basis, B.planes[w].basis) for w in frequencies}


# --------------------------------------------------------------------------------------------------
# Activation-based matching: latents compared by what they do on the dataset, not by direction


def column_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of f [N, m]: mean and root of the centred sum of squares, float64, read in blocks."""
    mean = torch.zeros(f.shape[1], dtype=torch.float64)
    norm = torch.zeros(f.shape[1], dtype=torch.float64)
    for start, block in column_blocks(f):
        mean[start:start + block.shape[1]] = block.mean(dim=0).cpu()
        norm[start:start + block.shape[1]] = (block - block.mean(dim=0)).pow(2).sum(dim=0).sqrt().cpu()
    return mean, norm


def standardised(f: torch.Tensor, mean: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(f - mean) / norm [N, m] in float32 (computed in float64 blocks), constant columns (norm 0) set to 0."""
    scale = inverse_or_zero(norm).to(f.device)
    out = torch.empty(f.shape, dtype=torch.float32, device=f.device)
    for start, block in column_blocks(f):
        stop = start + block.shape[1]
        out[:, start:stop] = (block - mean[start:stop].to(f.device)) * scale[start:stop]
    return out


def sparse_matrix(f: torch.Tensor) -> scipy.sparse.csr_matrix:
    """f [N, m] as a scipy CSR matrix of float64, built from its non-zeros only."""
    rows, cols = torch.nonzero(f.cpu(), as_tuple=True)
    values = f.cpu()[rows, cols].double().numpy()
    return scipy.sparse.csr_matrix((values, (rows.numpy(), cols.numpy())), shape=tuple(f.shape))


def sparse_moments(S: scipy.sparse.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of a sparse [N, m]: mean and root of the centred sum of squares, float64, from the
    non-zeros alone: sum_n (x_n - mu)^2 = sum_n x_n^2 - N mu^2 (no cancellation to fear in float64 for
    latents that are mostly zero)."""
    n = S.shape[0]
    mean = torch.from_numpy(np.asarray(S.sum(axis=0)).ravel()) / n
    squares = torch.from_numpy(np.asarray(S.multiply(S).sum(axis=0)).ravel())
    return mean, (squares - n * mean * mean).clamp_min(0).sqrt()


def inverse_or_zero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, 1 / norm.clamp_min(1e-300), 0.0)


def latent_correlations(fA: torch.Tensor, fB: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [m_A, m_B] (float32) of every latent of A with every latent of B over the N
    inputs: C_ij = sum_n (f_ni - mu_i)(g_nj - nu_j) / (||f_i - mu_i|| ||g_j - nu_j||); 0 for a constant
    latent. Sparse latents (density < SPARSE_DENSITY) go through an exact float64 sparse product
    S = f^T g and C = (S - N mu nu^T) / (norms), written into C in row blocks; denser ones are
    standardised and multiplied in float32 blocks of rows of C. Only C itself is ever [m_A, m_B]."""
    if fA.shape[0] != fB.shape[0]:
        raise HusaiError(f"latents over {fA.shape[0]} and {fB.shape[0]} inputs: compare them on the same inputs")
    n = len(fA)
    C = torch.empty(fA.shape[1], fB.shape[1], dtype=torch.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, fB.shape[1]))
    density = max(int(torch.count_nonzero(f)) / max(1, f.numel()) for f in (fA, fB))
    if density < SPARSE_DENSITY:
        SA, SB = sparse_matrix(fA), sparse_matrix(fB)
        (mean_a, norm_a), (mean_b, norm_b) = sparse_moments(SA), sparse_moments(SB)
        S = (SA.T.tocsr() @ SB).tocsr()
        inv_a, inv_b = inverse_or_zero(norm_a), inverse_or_zero(norm_b)
        for start in range(0, fA.shape[1], rows):
            stop = min(start + rows, fA.shape[1])
            block = torch.from_numpy(S[start:stop].toarray()) - n * mean_a[start:stop, None] * mean_b[None]
            C[start:stop] = (block * inv_a[start:stop, None] * inv_b[None]).float()
    else:
        (mean_a, norm_a), (mean_b, norm_b) = column_moments(fA), column_moments(fB)
        zB = standardised(fB, mean_b, norm_b)
        for start in range(0, fA.shape[1], rows):
            zA = standardised(fA[:, start:start + rows], mean_a[start:start + rows], norm_a[start:start + rows])
            C[start:start + rows] = (zA.T @ zB).cpu()
    return C.clamp_(-1, 1)


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


def matching_scores(C: torch.Tensor, energy_a: torch.Tensor, energy_b: torch.Tensor,
                    alive_a: torch.Tensor, alive_b: torch.Tensor) -> dict:
    """Scores of one pair from its latent-to-latent similarity C [m_A, m_B] (correlations here).

    Per latent: best = its max over the other SAE; matched = its value with its Hungarian partner (0 when
    unmatched). Each score is the mean of the A -> B and B -> A sides:
      max / hungarian:            unweighted mean over the alive latents of best / matched;
      max_weighted / hungarian_weighted: sum_i e_i best_i (e the energy shares, which sum to 1);
      partner_energy:             energy share of the latents whose matched value > PARTNER_CORRELATION."""
    partner_a, partner_b = one_to_one(C)
    best_a = C.max(dim=1).values.double() if C.shape[1] else torch.zeros(C.shape[0], dtype=torch.float64)
    best_b = C.max(dim=0).values.double() if C.shape[0] else torch.zeros(C.shape[1], dtype=torch.float64)
    rows = torch.arange(C.shape[0])
    matched_a = torch.where(torch.from_numpy(partner_a) >= 0, C[rows, torch.from_numpy(partner_a).clamp_min(0)], 0.0)
    cols = torch.arange(C.shape[1])
    matched_b = torch.where(torch.from_numpy(partner_b) >= 0, C[torch.from_numpy(partner_b).clamp_min(0), cols], 0.0)
    matched_a, matched_b = matched_a.double(), matched_b.double()

    def both(score_a: float, score_b: float) -> float:
        return (score_a + score_b) / 2

    def mean_alive(values: torch.Tensor, alive: torch.Tensor) -> float:
        return float(values[alive].mean()) if alive.any() else 0.0

    return {"max": both(mean_alive(best_a, alive_a), mean_alive(best_b, alive_b)),
            "hungarian": both(mean_alive(matched_a, alive_a), mean_alive(matched_b, alive_b)),
            "max_weighted": both(float(energy_a @ best_a), float(energy_b @ best_b)),
            "hungarian_weighted": both(float(energy_a @ matched_a), float(energy_b @ matched_b)),
            "partner_energy": both(float(energy_a[matched_a > PARTNER_CORRELATION].sum()),
                                   float(energy_b[matched_b > PARTNER_CORRELATION].sum())),
            "best_a": best_a, "best_b": best_b, "matched_a": matched_a, "matched_b": matched_b}


def activation_matching(fA: torch.Tensor, fB: torch.Tensor, W_decA: torch.Tensor, W_decB: torch.Tensor,
                        types_a: torch.Tensor | None = None, types_b: torch.Tensor | None = None) -> dict:
    """Activation-based matching of two SAEs on the same inputs: matching_scores on the latents' Pearson
    correlations, energy shares from the decoders. With latent types (latent_types), also each type's
    stability: the energy-weighted (within the type) mean best correlation of A's and of B's latents of
    that type with any latent of the other SAE."""
    C = latent_correlations(fA, fB)
    energy_a, energy_b = energy_shares(fA, W_decA), energy_shares(fB, W_decB)
    scores = matching_scores(C, energy_a, energy_b, firing_rates(fA) > 0, firing_rates(fB) > 0)
    if types_a is not None and types_b is not None:
        scores["by_type"] = {}
        for t, name in enumerate(LATENT_TYPES[:-1]):
            sides = [(energy[types == t], best[types == t]) for energy, types, best in
                     ((energy_a, types_a, scores["best_a"]), (energy_b, types_b, scores["best_b"]))]
            weighted = [float(e @ b / e.sum()) for e, b in sides if e.sum() > 0]
            scores["by_type"][name] = sum(weighted) / len(weighted) if weighted else None
    return scores


# --------------------------------------------------------------------------------------------------
# The phase question: do c-latents match because they are the same arcs, or only because they tile alike?


def rotation_spectra(f: torch.Tensor, p: int) -> torch.Tensor:
    """[(p+1)/2, p, m] complex: the latents, standardised (zero mean, unit norm) and laid out on the
    [a, b] grid, Fourier transformed along a (rfft: real signals need only frequencies 0..(p-1)/2)."""
    z = standardised(f, *column_moments(f)).double().cpu().view(p, p, -1)
    return torch.fft.rfft(z, dim=0)


def shifted_correlations(FA: torch.Tensor, FB: torch.Tensor, p: int) -> torch.Tensor:
    """[p, m_A, m_B] float64 from rotation_spectra: R[s, i, j] = Pearson correlation of A's latent i with
    B's latent j read at (a + s, b), i.e. with B's c rotated by s (a with it, b fixed). A rotation
    permutes the inputs, so means and norms are unchanged and R[s] is a circular cross-correlation along
    a: R[s] = irfft_k(sum_b conj(FA[k, b]) FB[k, b]) at s, for all s at once."""
    cross = torch.einsum("kbi,kbj->kij", FA.conj(), FB)
    return torch.fft.irfft(cross, n=p, dim=0).clamp(-1, 1)


def phase_question(fA: torch.Tensor, fB: torch.Tensor, W_decA: torch.Tensor, W_decB: torch.Tensor,
                   types_a: torch.Tensor, types_b: torch.Tensor, draws: int = PHASE_DRAWS) -> dict:
    """c-latent matching (matching_scores on correlations, energy shares renormalised within the
    c-latents) three ways: as trained; with each of B's c-latents rotated by its own random shift of c
    (its phase shuffled; `draws` independent shuffles, seeds PHASE_SEED + i); under a common rotation of
    all of B's c-latents, the best of the p shifts and the mean over them (by max_weighted; the best of
    p is biased upwards by the choice). If shuffled phases score as high as trained ones, the arcs'
    phases are arbitrary and per-latent identity is not what makes two SAEs agree. A's c-latents are
    taken in blocks, so no [p, m_A, m_B] array is held whole."""
    p = grid_side(len(fA))
    c = LATENT_TYPES.index("c")
    ca, cb = torch.nonzero(types_a == c).squeeze(1), torch.nonzero(types_b == c).squeeze(1)
    if len(ca) == 0 or len(cb) == 0:
        return {"latents": [len(ca), len(cb)], "trained": None, "shuffled": None, "best_rotation": None,
                "mean_over_rotations": None}
    fA, fB = fA[:, ca].cpu(), fB[:, cb].cpu()
    energy_a, energy_b = energy_shares(fA, W_decA[ca]), energy_shares(fB, W_decB[cb])
    alive_a, alive_b = firing_rates(fA) > 0, firing_rates(fB) > 0
    FA, FB = rotation_spectra(fA, p), rotation_spectra(fB, p)
    shifts = [torch.randint(p, (len(cb),), generator=torch.Generator().manual_seed(PHASE_SEED + i)) for i in range(draws)]
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
    rotated = fB[((a + best) % p) * p + b]                                           # B read at c + best
    zA, zB = standardised(fA, *column_moments(fA)), standardised(rotated, *column_moments(rotated))

    def scores(C: torch.Tensor) -> dict:
        return {name: value for name, value in matching_scores(C, energy_a, energy_b, alive_a, alive_b).items()
                if not torch.is_tensor(value)}

    drawn = [scores(matrix) for matrix in shuffled]
    return {"latents": [len(ca), len(cb)], "trained": scores(trained),
            "shuffled": {name: null_spread([d[name] for d in drawn]) for name in drawn[0]} if drawn else None,
            "best_rotation": {"shift": best, **scores((zA.T @ zB).clamp(-1, 1))},
            "mean_over_rotations": float(weighted.mean())}


# --------------------------------------------------------------------------------------------------
# Directions: the data's principal subspace, and the shared fraction


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows of W [m, k] scaled to unit length (a zero row stays zero)."""
    W = W.double()
    return (W / W.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()


def principal_basis(acts: torch.Tensor, share: float) -> torch.Tensor:
    """Orthonormal basis [d, r] (float64) of the top-r principal directions of acts [N, d], r the smallest
    number whose eigenvalues hold at least `share` of the variance."""
    if not 0 < share <= 1:
        raise HusaiError(f"variance share {share}: must lie in (0, 1]")
    X = acts.double().cpu()
    X = X - X.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(X.T @ X)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    held = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
    rank = min(int((held < share - 1e-12).sum()) + 1, len(eigenvalues))
    return eigenvectors[:, :rank]


def project_rows(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows [m, d] (decoder rows, or encoder columns transposed) expressed in the principal basis [d, r] and
    renormalised to unit length [m, r]: cosines between them are cosines inside the data's subspace.
    How much of each row was inside is the squared norm of rows @ basis before renormalising."""
    if rows.shape[1] != basis.shape[0]:
        raise HusaiError(f"rows of dimension {rows.shape[1]} and a basis of R^{basis.shape[0]}")
    return unit_rows(rows.double() @ basis.to(rows.device).double())


def cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[m_A, m_B] float32 cosines between the rows of A [m_A, k] and B [m_B, k]."""
    return unit_rows(A) @ unit_rows(B).T


def shared_fraction(decoder: torch.Tensor, encoder: torch.Tensor, tau: float = SHARED_TAU) -> float:
    """Paulo & Belrose 2025: ONE Hungarian matching on the mean of the decoder and encoder cosine matrices
    [m_A, m_B]; a latent is shared when its partner in that matching has decoder cosine > tau AND encoder
    cosine > tau. The fraction of shared latents of each SAE, averaged over the two (an unmatched latent
    is not shared)."""
    if decoder.shape != encoder.shape:
        raise HusaiError(f"decoder cosines {tuple(decoder.shape)} and encoder cosines {tuple(encoder.shape)} differ")
    partner_a, _ = one_to_one((decoder.double() + encoder.double()) / 2)
    rows = torch.from_numpy(np.nonzero(partner_a >= 0)[0])
    cols = torch.from_numpy(partner_a)[rows]
    shared = int(((decoder[rows, cols] > tau) & (encoder[rows, cols] > tau)).sum())
    return (shared / decoder.shape[0] + shared / decoder.shape[1]) / 2


# --------------------------------------------------------------------------------------------------
# Nulls: the untrained initialisation of the same seeds, and random TopK dictionaries in the data


def initial_weights(snapshot_path: str) -> dict[str, torch.Tensor]:
    """A seed's untrained SAE: the step-0 weights of its snapshot file (train_sae.py writes
    seed<N>.snapshots.safetensors with step0.W_enc, step0.W_dec, ...), named as in an SAE file, so that
    sae_core.sae_latents and every measure here take them like trained weights."""
    tensors, _ = load_tensors(snapshot_path, SNAPSHOT_FORMAT, SAE_VERSION, required=("step0.W_enc", "step0.W_dec"),
                              hint="python train_sae.py --seeds 0 1 2 3 4")
    return {name.removeprefix("step0."): t for name, t in tensors.items() if name.startswith("step0.")}


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
            "b_dec": acts.double().mean(dim=0).float().cpu()}


def random_null_seeds(pairs: int = NULL_PAIRS) -> list[tuple[int, int]]:
    """Generator seeds of the random null's independent pairs of dictionaries (no dictionary is reused)."""
    return [(NULL_SEED + 2 * i, NULL_SEED + 2 * i + 1) for i in range(pairs)]


def null_spread(values: list[float]) -> dict:
    """Mean, standard deviation (n - 1), min and max of a null's repeated draws."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": len(x)}


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
