"""Stage 3's functional measures (analyze.py) on synthetic data whose truth is known: planted circles tiled
by arcs, arcs of any density, crowds of rare noise latents, and the untrained initialisation of a real
stage-2 run."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

import analyze as an
from analyze import (LATENT_TYPES, Grid, activation_matching, energy_shares, grid_fourier, grid_side, grid_variables,
                     harmonic_purity, latent_correlations, latent_profile, latent_types, match_purity_correlation,
                     null_spread, partial_spearman, phase_question, plane_agreement, plane_analysis, principal_basis,
                     project_rows, random_null_seeds, random_topk_weights, shared_fraction, shared_matching,
                     sparse_matrix, step_weights, true_planes, unit_rows, variable_shares)
from sae_core import (SAE_VERSION, SNAPSHOT_FORMAT, HusaiError, SAEConfig, SAEEnsemble, fourier_purity, load_tensors,
                      sae_latents)

REPO = Path(__file__).resolve().parent.parent
P = 59                                   # grid side of the planted data (N = 3481)
RADII = {4: 3.0, 8: 1.0, 11: 2.0}        # planted circles; 8 = 2 x 4 is the harmonic pair
FREQUENCIES = sorted(RADII)


def wave(p: int, w: int, values: torch.Tensor, phase: float = 0.0, kind=torch.cos) -> torch.Tensor:
    return kind(2 * math.pi * w * values.double() / p - phase)


def planted_circles(p: int = P, d: int = 64, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """[p^2, d]: for each planted frequency w a circle of radius RADII[w] in its own random plane of R^d,
    as a function of c = (a + b) mod p, plus isotropic Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    c = grid_variables(p)[0]
    planes = torch.linalg.qr(torch.randn(d, 2 * len(RADII), generator=generator, dtype=torch.float64))[0]
    x = noise * torch.randn(p * p, d, generator=generator, dtype=torch.float64)
    for i, (w, radius) in enumerate(RADII.items()):
        x += radius * (wave(p, w, c)[:, None] * planes[:, 2 * i] + wave(p, w, c, kind=torch.sin)[:, None] * planes[:, 2 * i + 1])
    return x.float()


def arcs(p: int, w: int, n: int, offset: float, values: torch.Tensor, fire: float = 0.25) -> torch.Tensor:
    """[p^2, n] arcs relu(cos(2 pi w v / p - phi) - cos(pi fire)) at n equally spaced phases phi, each firing
    on about `fire` of the inputs."""
    phases = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n + offset
    angles = 2 * math.pi * w * values.double()[:, None] / p - phases
    return torch.relu(torch.cos(angles) - math.cos(math.pi * fire)).float()


def profile(f: torch.Tensor, W_dec: torch.Tensor, truth: dict | None = None, p: int = P):
    """The measures' view of latents f [p^2, m] with decoder rows W_dec, with planes when truth is given."""
    return latent_profile(f, W_dec, Grid(p, "add", sorted(truth), truth) if truth is not None else None)


def hand_built(x: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A dictionary that tiles each planted circle with arcs (8 for frequency 4, 2 for its harmonic 8, 8
    for 11) at phases shifted by `offset`; its decoder is the least-squares one for these latents."""
    c = grid_variables(P)[0]
    f = torch.cat([arcs(P, 4, 8, offset, c), arcs(P, 8, 2, offset, c), arcs(P, 11, 8, offset, c)], dim=1)
    W_dec = torch.linalg.lstsq((f - f.mean(0)).double(), (x - x.mean(0)).double()).solution.float()
    return f, W_dec


@pytest.fixture(scope="module")
def planted():
    x = planted_circles()
    truth = true_planes(x, FREQUENCIES)
    (fA, WA), (fB, WB) = hand_built(x, 0.0), hand_built(x, math.pi / 8)   # half an arc spacing apart
    pA, pB = profile(fA, WA, truth), profile(fB, WB, truth)
    return {"x": x, "truth": truth, "fA": fA, "WA": WA, "fB": fB, "WB": WB, "A": pA.planes, "B": pB.planes,
            "pA": pA, "pB": pB}


def random_null(x: torch.Tensor, truth: dict, width: int, k: int, seeds: tuple[int, int]):
    """One pair of random TopK dictionaries inside the data's 99% subspace, through the same functions."""
    basis = principal_basis(x, 0.99)
    weights = [random_topk_weights(x, width, k, basis, seed) for seed in seeds]
    return [profile(sae_latents(w, {"arch": "topk", "k": k}, x), w["W_dec"], truth) for w in weights]


# --------------------------------------------------------------------------------------------------
# The grid's Fourier functions and the latent types


def test_grid_functions_recover_a_planted_wave_of_each_variable_and_nothing_else():
    p = 31
    values = grid_variables(p)
    columns = torch.stack([wave(p, 5, values[v], phase=0.7) for v in range(4)]
                          + [wave(p, 3, values[1]) * wave(p, 2, values[2])], dim=1)
    fourier = grid_fourier(columns, p)
    energy = fourier.energy() / fourier.variance
    for v in range(4):
        assert float(energy[v, 4, v]) == pytest.approx(1, abs=1e-6)            # all of it at (v, w = 5)
        assert float(energy[:, :, v].sum()) == pytest.approx(1, abs=1e-6)
    assert float(energy[:, :, 4].sum()) < 1e-6                                 # an a-b interaction: no variable's
    assert latent_types(fourier).tolist() == [0, 1, 2, 3, LATENT_TYPES.index("unexplained")]
    # the four variables' function spaces are orthogonal, so shares of a sum of them add up
    mixed = grid_fourier((0.6**0.5 * columns[:, 0] + 0.4**0.5 * columns[:, 1])[:, None], p)
    assert variable_shares(mixed)[:2, 0].tolist() == pytest.approx([0.6, 0.4], abs=1e-6)


def test_a_constant_latent_is_dead_and_grid_side_rejects_what_is_not_a_grid():
    fourier = grid_fourier(torch.ones(49, 2).mul(torch.tensor([0.0, 3.0])), 7)
    assert latent_types(fourier).tolist() == [LATENT_TYPES.index("dead")] * 2
    assert grid_side(113 * 113) == 113
    for n in (50, 64, 1):
        with pytest.raises(HusaiError):
            grid_side(n)


# --------------------------------------------------------------------------------------------------
# Planted circles: planes are stable where single latents are not


def test_arcs_at_different_phases_agree_on_every_plane_but_not_latent_by_latent(planted):
    A, B = planted["A"], planted["B"]
    agreement = plane_agreement(A, B, FREQUENCIES)
    assert min(agreement.values()) > 0.99
    for analysis in (A, B):
        for w in FREQUENCIES:
            assert min(analysis.planes[w].cosines_to_truth) > 0.99, w
            assert analysis.planes[w].r2 > 0.95, w
        assert analysis.types_summary["c"] == {"count": 18, "energy": pytest.approx(1)}
    matching = activation_matching(planted["pA"], planted["pB"])
    for name in ("max", "hungarian", "max_weighted", "hungarian_weighted"):
        assert matching[name] < min(agreement.values()) - 0.2, name
    assert matching["partner_energy"] == 0                      # no arc has a partner above 0.9


def test_the_harmonic_pair_is_one_family_and_the_other_circle_its_own(planted):
    for analysis in (planted["A"], planted["B"]):
        families = {family.root: family for family in analysis.families}
        assert sorted(families) == [4, 11]
        assert families[4].frequencies == [4, 8] and families[4].links[8] >= an.FAMILY_R2
        assert families[4].latents.tolist() == list(range(10))   # the 8 arcs of 4 and the 2 arcs of 8
        assert families[11].frequencies == [11] and families[11].latents.tolist() == list(range(10, 18))
        assert analysis.planes[8].family == 4


def test_a_harmonic_joins_its_fundamental_whichever_group_holds_more_energy(planted):
    """8 decodes from the arcs of 4, but 4 not from the two arcs of 8: the link is found from either
    side, so the family is the same when the harmonic's group is the larger one (as 8 = -3 x 35 is in the
    grokked model, where 35 does not decode well from the 8-latents)."""
    f = sparse_matrix(planted["fA"])
    fourier = grid_fourier(f, P)
    types = latent_types(fourier)
    r2_from_8 = an.frequency_r2(f, fourier, torch.tensor([8, 9]))
    r2_from_4 = an.frequency_r2(f, fourier, torch.arange(8))
    assert float(r2_from_4[8 - 1]) >= an.FAMILY_R2 > float(r2_from_8[4 - 1])
    gram = an.latent_gram(f, an.plane_carriers(types))                    # one Gram, sliced: the same R^2
    assert torch.allclose(an.frequency_r2(f, fourier, torch.tensor([8, 9]), gram(torch.tensor([8, 9]))), r2_from_8)
    for heavy in (torch.arange(8), torch.tensor([8, 9])):       # the 4-arcs, then the 8-arcs hold the energy
        energy = torch.full((18,), 0.01, dtype=torch.float64)
        energy[heavy] = 1.0
        families = an.harmonic_families(f, fourier, types, energy, FREQUENCIES)
        assert sorted(sorted(family.frequencies) for family in families) == [[4, 8], [11]]
        assert families[0].root == (4 if len(heavy) == 8 else 8)


def test_random_dictionaries_score_low_on_planes_and_on_latents_and_the_coverage_null_can_fail(planted):
    x, truth = planted["x"], planted["truth"]
    planes, matches, to_truth = [], [], []
    seeds = random_null_seeds(3)
    for pair in zip(seeds[::2], seeds[1::2]):
        a, b = random_null(x, truth, width=18, k=4, seeds=pair)
        planes += list(plane_agreement(a.planes, b.planes, FREQUENCIES).values())
        matches.append(activation_matching(a, b)["max_weighted"])
        to_truth += [sum(a.planes.planes[w].cosines_to_truth) / 2 for w in FREQUENCIES]
    assert max(planes) < 0.5 and np.mean(planes) < 0.3
    assert max(matches) < 0.8
    assert min(to_truth) < 0.3 and np.mean(to_truth) < 0.5      # the null's coverage of the true planes fails


def test_the_phase_question_finds_a_common_rotation_and_shuffles_phases():
    p, shift = P, 3
    x = planted_circles()
    fA, WA = hand_built(x, 0.0)
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    fB = fA[((a + shift) % p) * p + b]                          # B's latents read at c + 3: A's arcs rotated
    truth = true_planes(x, FREQUENCIES)
    pA, pB = profile(fA, WA, truth), profile(fB, WA, truth)
    result = phase_question(pA, pB, p)
    assert result["latents"] == [18, 18]
    assert result["trained"]["max_weighted"] < 0.9
    assert result["best_rotation"]["shift"] == p - shift          # rotating B back by 3 makes it A again
    for name in ("max", "hungarian", "max_weighted", "hungarian_weighted", "partner_energy"):
        assert result["best_rotation"][name] == pytest.approx(1, abs=1e-5), name
    assert result["shuffled"]["max_weighted"]["n"] == an.PHASE_DRAWS
    assert result["shuffled"]["max_weighted"]["max"] < 0.999
    assert result["trained"] == phase_question(pA, pB, p)["trained"]   # same seeds, same result


def test_the_phase_question_in_blocks_equals_it_whole(planted, monkeypatch):
    args = (planted["pA"], planted["pB"], P)
    whole = phase_question(*args)
    monkeypatch.setattr(an, "CHUNK_ELEMENTS", 300)              # blocks of 2 of A's 18 c-latents
    blocks = phase_question(*args)
    assert blocks["best_rotation"]["shift"] == whole["best_rotation"]["shift"]
    for part in ("trained", "best_rotation"):
        for name, value in whole[part].items():
            assert blocks[part][name] == pytest.approx(value, abs=1e-9), (part, name)
    assert blocks["shuffled"]["max_weighted"]["mean"] == pytest.approx(whole["shuffled"]["max_weighted"]["mean"], abs=1e-9)
    assert blocks["mean_over_rotations"] == pytest.approx(whole["mean_over_rotations"], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Purity that does not depend on density


@pytest.mark.parametrize("w", [8, 35])
@pytest.mark.parametrize("fire", [0.2, 0.6])
def test_an_arc_is_pure_whether_it_fires_on_20_or_60_percent_of_inputs(w, fire):
    p = 113
    values = grid_variables(p)
    arc = arcs(p, w, 3, 0.4, values[0], fire=fire)               # three phases, not on the grid's symmetry
    assert float((arc > 0).float().mean()) == pytest.approx(fire, abs=0.02)
    fourier = grid_fourier(arc, p)
    assert harmonic_purity(fourier, p).min() >= 0.99
    neuron_purity = fourier_purity(arc.view(p, p, -1))[0]       # one frequency's block: biased by density
    if fire == 0.2:
        assert float(neuron_purity.max()) < 0.5
    # the same arc as a function of a, and a latent of no single variable, are not c-pure
    other = torch.cat([arcs(p, w, 1, 0.4, values[1], fire=fire),
                       torch.relu(torch.randn(p * p, 1, generator=torch.Generator().manual_seed(0)))], dim=1)
    assert harmonic_purity(grid_fourier(other, p), p).max() < 0.05


def test_partial_spearman_removes_a_shared_dependence_on_firing_rate():
    generator = np.random.default_rng(0)
    firing = generator.uniform(size=2000)
    match, purity = firing + 0.1 * generator.normal(size=2000), firing + 0.1 * generator.normal(size=2000)
    alive = torch.ones(2000, dtype=torch.bool)
    result = match_purity_correlation(*(torch.from_numpy(v) for v in (match, purity, firing)), alive)
    assert result["spearman"] > 0.8 and abs(result["partial_spearman"]) < 0.1
    # when firing explains neither, controlling for it changes nothing
    shared = generator.normal(size=2000)
    x, y = shared + generator.normal(size=2000), shared + generator.normal(size=2000)
    raw = np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1]
    assert partial_spearman(x, y, generator.normal(size=2000)) == pytest.approx(raw, abs=0.05)
    assert partial_spearman(x, y, np.ones(2000)) is None


# --------------------------------------------------------------------------------------------------
# Activation matching


def sparse_latents(n: int, m: int, rate: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(n, m, generator=generator)
    return torch.where(torch.rand(n, m, generator=generator) < rate, values, 0.0)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_latent_correlations_are_pearson_correlations_on_both_paths(path, monkeypatch):
    fA, fB = sparse_latents(500, 40, 0.03, 1), sparse_latents(500, 30, 0.03, 2)
    fA[:, 3] = 0                                                 # a dead latent: correlation 0 with everything
    fB[:, :5] += 7.0 * fA[:, :5] + 2.0                           # correlated, with a large mean
    monkeypatch.setattr(an, "SPARSE_DENSITY", 1.0 if path == "sparse" else 0.0)
    monkeypatch.setattr(an, "CHUNK_ELEMENTS", 64)                # many blocks
    C = latent_correlations(latent_profile(fA, torch.ones(40, 1)), latent_profile(fB, torch.ones(30, 1)))
    with np.errstate(invalid="ignore"):                          # numpy divides by the dead latent's zero norm
        reference = np.corrcoef(fA.double().T.numpy(), fB.double().T.numpy())[:40, 40:]
    reference[3] = 0
    assert np.abs(C.numpy() - reference).max() < 1e-5


def test_a_permuted_copy_matches_perfectly_and_partners_are_found():
    f = sparse_latents(800, 60, 0.05, 3)
    W = torch.randn(60, 8, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(5))
    scores = activation_matching(latent_profile(f, W), latent_profile(f[:, perm], W[perm]))
    for name in ("max", "hungarian", "max_weighted", "hungarian_weighted", "partner_energy"):
        assert scores[name] == pytest.approx(1, abs=1e-5), name
    # a latent duplicated in A: both copies' best partner is B's latent 0, but only one copy can be its
    # one-to-one partner; the other is matched to B's unrelated latent 1 and has no partner above 0.9
    fA, fB = f[:, [0, 0]], f[:, [0, 1]]
    scores = activation_matching(latent_profile(fA, W[[0, 0]]), latent_profile(fB, W[[0, 1]]))
    energy_b = energy_shares(sparse_matrix(fB), W[[0, 1]])
    assert float(scores["best_a"].min()) == pytest.approx(1, abs=1e-6)
    assert float(scores["matched_a"].min()) < 0.5
    assert scores["partner_energy"] == pytest.approx((0.5 + float(energy_b[0])) / 2, abs=1e-6)
    assert scores["max_weighted"] > scores["hungarian_weighted"] + 0.2


def test_energy_weighting_ignores_a_planted_crowd_of_rare_noise_latents(planted):
    fA, WA = planted["fA"], unit_rows(planted["WA"])
    n, crowd = len(fA), 300
    dictionaries = []
    for seed in (10, 11):                                        # each SAE has its own rare noise latents
        generator = torch.Generator().manual_seed(seed)
        noise = torch.zeros(n, crowd)
        for i in range(crowd):                                   # each fires on 5 random inputs (0.14%)
            noise[torch.randperm(n, generator=generator)[:5], i] = 0.3 * torch.rand(5, generator=generator)
        rows = unit_rows(torch.randn(crowd, WA.shape[1], generator=generator))
        dictionaries.append((torch.cat([fA, noise], dim=1), torch.cat([WA, rows])))
    (f1, W1), (f2, W2) = dictionaries
    scores = activation_matching(latent_profile(f1, W1), latent_profile(f2, W2))
    noise_energy = sum(float(energy_shares(sparse_matrix(f), W)[18:].sum()) for f, W in dictionaries) / 2
    assert 0.001 < noise_energy < 0.1
    assert scores["max"] < 0.4                                  # 300 of 318 alive latents decide the plain mean
    assert scores["max_weighted"] > 1 - noise_energy - 1e-3     # the arcs, ~all of the energy, match exactly
    assert scores["partner_energy"] == pytest.approx(1 - noise_energy, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Directions: principal subspace and the shared fraction


def test_principal_basis_holds_the_requested_share_and_projection_keeps_in_subspace_cosines():
    generator = torch.Generator().manual_seed(0)
    span = torch.linalg.qr(torch.randn(32, 3, generator=generator))[0]
    acts = (torch.randn(4000, 3, generator=generator) * torch.tensor([3.0, 2.0, 1.0])) @ span.T
    acts = acts + 0.05 * torch.randn(4000, 32, generator=generator)   # 0.5% of the variance
    basis = principal_basis(acts, 0.99)
    assert basis.shape == (32, 3)
    assert principal_basis(acts, 0.999).shape[1] > 3
    rows = torch.randn(10, 3, generator=generator) @ span.T      # rows inside the subspace
    projected = project_rows(rows, basis)
    assert projected.norm(dim=1).tolist() == pytest.approx([1.0] * 10, abs=1e-5)
    assert torch.allclose(projected @ projected.T, unit_rows(rows) @ unit_rows(rows).T, atol=1e-4)
    with pytest.raises(HusaiError):
        principal_basis(acts, 0.0)


def test_shared_fraction_uses_one_matching_on_the_mean_of_decoder_and_encoder_cosines():
    decoder = torch.tensor([[0.74, 0.81, 0.57], [0.91, 0.60, 0.97], [0.62, 0.95, 0.84]])
    encoder = torch.tensor([[0.76, 0.52, 0.86], [0.84, 0.97, 0.67], [0.91, 0.70, 0.96]])
    tau, rows = 0.7, np.arange(3)

    def matched(C):
        return linear_sum_assignment(C.numpy(), maximize=True)[1]

    def fraction(dec_cols, enc_cols):
        return float(np.mean((decoder.numpy()[rows, dec_cols] > tau) & (encoder.numpy()[rows, enc_cols] > tau)))

    # the mean's matching (1, 0, 2) shares latents 1 and 2; every other way of matching says something else
    assert matched((decoder + encoder) / 2).tolist() == [1, 0, 2]
    alternatives = {"decoder matching": fraction(matched(decoder), matched(decoder)),
                    "encoder matching": fraction(matched(encoder), matched(encoder)),
                    "two separate matchings": fraction(matched(decoder), matched(encoder))}
    assert alternatives == {"decoder matching": 1 / 3, "encoder matching": 0.0, "two separate matchings": 1.0}
    assert shared_fraction(shared_matching(decoder, encoder), tau) == pytest.approx(2 / 3)
    assert shared_fraction(shared_matching(decoder, encoder), 0.5) == 1.0
    with pytest.raises(HusaiError):
        shared_matching(decoder, encoder[:2])


# --------------------------------------------------------------------------------------------------
# Nulls


def test_the_initialisation_null_equals_the_trained_score_after_zero_training_steps(tmp_path):
    p, d, width, k = 31, 16, 32, 4
    acts = planted_circles(p=p, d=d)
    acts_file = tmp_path / "acts.safetensors"
    save_file({"acts": acts}, str(acts_file))
    out = tmp_path / "sae"
    run = subprocess.run([sys.executable, str(REPO / "train_sae.py"), "--acts", str(acts_file), "--seeds", "0", "1",
                          "--width", str(width), "--k", str(k), "--steps", "3", "--batch-size", "64", "--snapshots", "2",
                          "--no-kernels", "--device", "cpu", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # the SAEs after zero training steps, built as train_sae.py builds them
    ensemble = SAEEnsemble(SAEConfig(d_in=d, width=width, k=k), [0, 1])
    ensemble.init_from_data(acts)
    untrained = [ensemble.export(s) for s in range(2)]
    initial = [step_weights(load_tensors(out / f"seed{seed}" / "snapshots.safetensors", SNAPSHOT_FORMAT, SAE_VERSION)[0], 0)
               for seed in (0, 1)]
    for zero_steps, snapshot in zip(untrained, initial):
        assert zero_steps.keys() == snapshot.keys()
        assert all(torch.equal(zero_steps[name], snapshot[name]) for name in zero_steps)
    truth = true_planes(acts, FREQUENCIES)
    config = {"arch": "topk", "k": k}

    def scores(weights):
        profiles = [profile(sae_latents(w, config, acts), w["W_dec"], truth, p) for w in weights]
        matching = activation_matching(*profiles)
        return {**plane_agreement(profiles[0].planes, profiles[1].planes, FREQUENCIES),
                **{name: v for name, v in matching.items() if not torch.is_tensor(v) and name != "by_type"},
                **{f"type {name}": v for name, v in matching["by_type"].items()}}

    assert scores(untrained) == scores(initial)
    # ... and the trained files are not the initialisation (the check can tell them apart)
    from sae_core import load_sae
    trained = [load_sae(out / f"seed{seed}")[0] for seed in (0, 1)]
    assert not torch.equal(trained[0]["W_dec"], initial[0]["W_dec"])


def test_random_nulls_are_reproducible_distinct_and_inside_the_subspace():
    x = planted_circles()
    basis = principal_basis(x, 0.99)
    seeds = random_null_seeds()
    assert len(set(seeds)) == 2 * an.NULL_PAIRS                 # no dictionary is reused
    first, again = (random_topk_weights(x, 50, 4, basis, seeds[0]) for _ in range(2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = random_topk_weights(x, 50, 4, basis, seeds[1])
    assert not torch.equal(first["W_dec"], other["W_dec"])
    inside = (first["W_dec"].double() @ basis).pow(2).sum(dim=1)
    assert inside.tolist() == pytest.approx([1.0] * 50, abs=1e-5)
    spread = null_spread([0.2, 0.4, 0.3])
    assert spread["mean"] == pytest.approx(0.3) and spread["std"] == pytest.approx(0.1) and spread["n"] == 3
    assert null_spread([0.2, None]) is None and null_spread([]) is None   # a draw without the value: no spread
    with pytest.raises(HusaiError):
        random_topk_weights(x, 50, 51, basis, 0)


def test_bad_inputs_are_husai_errors(planted):
    fA, WA, truth = planted["fA"], planted["WA"], planted["truth"]
    f, energy = sparse_matrix(fA), planted["pA"].energy
    grid = Grid(P, "add", FREQUENCIES, truth)
    with pytest.raises(HusaiError):
        plane_analysis(sparse_matrix(fA[:-1]), energy, WA, grid)  # not the full grid
    with pytest.raises(HusaiError):
        plane_analysis(f, energy, WA[:-1], grid)                  # latents and decoder rows disagree
    with pytest.raises(HusaiError):
        plane_analysis(f, energy, WA, grid._replace(frequencies=[5]))   # no true plane for 5
    with pytest.raises(HusaiError):
        latent_correlations(planted["pA"], latent_profile(fA[:-1], WA))
    with pytest.raises(HusaiError):
        project_rows(WA, torch.eye(3))


def test_neuron_like_latents_are_frequency_latents_and_their_family_writes_the_answer_plane():
    """At mlp_post the units are neurons like relu(cos(w a + phi) + cos(w b + psi)): functions of a and b at
    one frequency, no single variable holding half their variance. They are frequency-latents of fundamental
    w, they form one family, and with the neurons themselves as the activations (an identity dictionary)
    that family writes exactly the plane of cos/sin(w c) the activations carry."""
    p, w, n = 59, 4, 8
    values = grid_variables(p)
    phases = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    angle_a, angle_b = (2 * math.pi * w * values[v].double()[:, None] / p for v in (1, 2))
    neurons = torch.relu(torch.cos(angle_a + phases) + torch.cos(angle_b + 2 * phases + 0.3)).float()   # [p^2, n]
    fourier = grid_fourier(neurons, p)
    assert variable_shares(fourier).max() < an.TYPE_SHARE                   # no single variable explains one
    assert latent_types(fourier).tolist() == [LATENT_TYPES.index("frequency")] * n
    assert an.fundamental_frequencies(fourier, latent_types(fourier)).tolist() == [w] * n
    truth = true_planes(neurons, [w])
    planes = profile(neurons, torch.eye(n), truth, p).planes
    assert [family.frequencies for family in planes.families] == [[w]]
    assert min(planes.planes[w].cosines_to_truth) == pytest.approx(1, abs=1e-6)
    # the same neurons as arcs of c would be c-latents: the type follows what the activation is a function of
    assert harmonic_purity(fourier, p).max() < 0.5
