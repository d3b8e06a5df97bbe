"""Stage 3: the direction scores, the nulls, the report and bad input (the functional measures on planted
circles are in test_plane_measures.py); the report as one run (non-finite SAEs skipped, --force, the lock, a
full disk)."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analyze import (LATENT_TYPES, grid_fourier, harmonic_purity, hungarian_match, hungarian_mean_cosine, latent_types,
                     max_cosine, mean_and_ci, mmcs, orthonormal_span, principal_basis, principal_cosines, pwmcc,
                     shared_fraction, shared_matching, sparse_matrix, subspace_null, unit_rows)
import sae_core
from sae_core import (RUN_DIR, SAE_FORMAT, SAE_VERSION, SNAPSHOT_FORMAT, RunOutput, file_sha256, load_sae, run_cli,
                      save_tensors)
from train_transformer import (ModelConfig, Transformer, collect_activations, make_dataset, save_model,
                               train_test_split, training_log_path)
from test_sae import leftovers, run_files

REPO = Path(__file__).resolve().parent.parent
HOOK = "blocks.0.resid_post"


# --------------------------------------------------------------------------------------------------
# Synthetic inputs in the files' real formats (the 5 seeds x 2048 latents timing case is built with
# these too)


def write_transformer(path: Path, p: int = 13, d_model: int = 16, seed: int = 0) -> Path:
    """An untrained stage-1 model file with a short training log beside it (<model>.log.jsonl)."""
    cfg = ModelConfig(p=p, d_model=d_model, n_heads=2, d_mlp=4 * d_model)
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, Transformer(cfg), train_test_split(p, 0.5, seed)[0],
               {"config": {"model": asdict(cfg), "train": {}}, "epoch": 1})
    log = [{"epoch": e, "train_loss": 3 / (e + 1), "test_loss": 3 / (e + 1) + 0.5, "train_acc": min(1, e / 5),
            "test_acc": min(1, e / 9)} for e in range(10)]
    training_log_path(path).write_text("".join(json.dumps(row) + "\n" for row in log))
    return path


def transformer_activations(transformer: Path) -> torch.Tensor:
    from train_transformer import load_transformer
    model, _ = load_transformer(transformer)
    return collect_activations(model, make_dataset(model.cfg)[0], HOOK)


def write_sae_group(folder: Path, transformer: Path, seeds: list[int], width: int, k: int = 4,
                    noise: float = 0.05, steps: tuple[int, ...] = (0, 3, 10), acts: Path | None = None) -> None:
    """TopK SAE files, one per seed, sharing a planted dictionary (in the activations' span), each a
    permuted noisy copy; with snapshot files whose step 0 is random and whose last step is the SAE.
    With `acts`, the provenance names that activation file (train_sae.py --acts) instead."""
    X = transformer_activations(transformer)
    d = X.shape[1]
    span = torch.linalg.svd(X - X.mean(0), full_matrices=False)[2]           # [d, d] principal directions
    truth = unit_rows(torch.randn(width, d, generator=torch.Generator().manual_seed(123)) @ span)
    provenance = {"source": "transformer", "transformer": str(transformer),
                  "transformer_sha256": file_sha256(transformer), "hook": HOOK, "position": "eq", "checkpoint": None,
                  "acts": None, "acts_sha256": None}
    if acts is not None:
        provenance.update(source="acts", acts=str(acts), acts_sha256=file_sha256(acts), transformer=None,
                          transformer_sha256=None, hook=None, position=None)
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        perturbation = noise * torch.randn(width, d, generator=generator) / d**0.5   # relative size `noise`
        W_dec = unit_rows(truth[torch.randperm(width, generator=generator)] + perturbation)
        final = {"W_dec": W_dec, "W_enc": W_dec.T.clone(), "b_enc": torch.zeros(width), "b_dec": X.mean(0)}
        config = {"arch": "topk", "d_in": d, "width": width, "k": k, "l1": 5.0, "l0": 0.05, "seed": seed,
                  "data_seed": 0, "vary_data_order": False, "steps": steps[-1], "batch_size": 64, "lr": 1e-3,
                  "normalize": True}
        save_tensors(folder / f"seed{seed}.safetensors", final, SAE_FORMAT, SAE_VERSION,
                     {"config": config, "metrics": {"acc_sae": 0.5}, "provenance": provenance})
        initial = unit_rows(torch.randn(width, d, generator=generator))
        snapshots = {}
        for step in steps:
            weights = final if step == steps[-1] else {"W_dec": initial, "W_enc": initial.T.clone(),
                                                       "b_enc": torch.zeros(width), "b_dec": X.mean(0)}
            snapshots.update({f"step{step}.{name}": t for name, t in weights.items()})
        save_tensors(folder / f"seed{seed}.snapshots.safetensors", snapshots, SNAPSHOT_FORMAT, SAE_VERSION,
                     {"steps": list(steps), "fvu": [1.0 / (1 + t) for t in steps], "config": config})


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "analyze.py"), *args], cwd=cwd, capture_output=True, text=True)


def random_unit(m: int, d: int, seed: int) -> torch.Tensor:
    return unit_rows(torch.randn(m, d, generator=torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------------------------------
# The similarity metrics


def all_scores(A: torch.Tensor, B: torch.Tensor, absolute: bool = False) -> dict:
    best = max_cosine(A, B, absolute)
    matching = hungarian_match(A, B, absolute)
    C = A @ B.T
    return {"mmcs_ab": mmcs(best.best_a), "mmcs_ba": mmcs(best.best_b), "pwmcc": pwmcc(best),
            "hungarian": hungarian_mean_cosine(matching),
            "shared": float(shared_fraction(shared_matching(C.abs() if absolute else C, C.abs() if absolute else C),
                                            0.7))}


@pytest.mark.parametrize("absolute", [False, True])
def test_identical_dictionaries_score_one_and_a_permuted_copy_too(absolute):
    A = random_unit(300, 32, seed=0)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for B in (A.clone(), A[perm]):
        for name, value in all_scores(A, B, absolute).items():
            assert value == pytest.approx(1, abs=1e-5), name
    # an index-based comparison (latent i with latent i) is what a permutation defeats
    assert (A * A[perm]).sum(dim=1).mean() < 0.2
    assert np.array_equal(hungarian_match(A[perm], A).partner_a, perm.numpy())


def test_pwmcc_is_symmetric_and_at_least_hungarian_and_no_cosine_exceeds_one():
    A, B = random_unit(200, 16, seed=2), random_unit(350, 16, seed=3)
    ab, ba = max_cosine(A, B), max_cosine(B, A)
    assert pwmcc(ab) == pytest.approx(pwmcc(ba), abs=1e-12)
    assert mmcs(ab.best_a) == pytest.approx(mmcs(ba.best_b), abs=1e-12)
    assert mmcs(ab.best_a) != pytest.approx(mmcs(ab.best_b), abs=1e-3), "MMCS is asymmetric for unequal widths"
    for X, Y in ((A, B), (A, A), (B[:200], A), (B, B[:300])):
        best = max_cosine(X, Y)
        matching = hungarian_match(X, Y)
        if len(X) == len(Y):
            assert pwmcc(best) >= hungarian_mean_cosine(matching) - 1e-9
        # with unequal widths only the smaller side is matched whole, and its MMCS bounds the matching
        smaller = best.best_a if len(X) <= len(Y) else best.best_b
        assert mmcs(smaller) >= hungarian_mean_cosine(matching) - 1e-9
        assert best.best_a.max() <= 1 + 1e-6 and best.best_b.max() <= 1 + 1e-6
        assert np.nanmax(matching.cos_a) <= 1 + 1e-6
        assert (~np.isnan(matching.cos_a)).sum() == min(len(X), len(Y))


def test_chunked_max_cosine_equals_the_dense_computation():
    A, B = random_unit(257, 24, seed=4), random_unit(131, 24, seed=5)
    for absolute in (False, True):
        C = A @ B.T
        C = C.abs() if absolute else C
        for chunk_elements in (1, 131 * 7, 10**9):
            best = max_cosine(A, B, absolute, chunk_elements=chunk_elements)
            torch.testing.assert_close(best.best_a, C.max(dim=1).values)
            torch.testing.assert_close(best.best_b, C.max(dim=0).values)
            assert torch.equal(best.index_a, C.argmax(dim=1))


def test_shared_fraction_needs_both_decoder_and_encoder():
    A = random_unit(100, 32, seed=6)
    same, other = A @ A.T, A @ random_unit(100, 32, seed=7).T
    assert float(shared_fraction(shared_matching(same, same), 0.7)) == 1
    assert float(shared_fraction(shared_matching(same, other), 0.7)) == 0
    curve = shared_fraction(shared_matching(same, other), np.array([0.0, 0.5, 0.99]))
    assert curve.shape == (3,) and (np.diff(curve) <= 0).all() and curve[0] > 0


def test_matching_is_skipped_above_the_limit_and_max_based_scores_are_not(monkeypatch):
    import analyze
    alive = torch.ones(40, dtype=torch.bool)
    dictionaries = [analyze.Dictionary({"decoder": random_unit(40, 8, seed), "encoder": random_unit(40, 8, seed + 10)},
                                       alive) for seed in range(3)]
    monkeypatch.setattr(analyze, "HUNGARIAN_MAX_LATENTS", 39)
    matrices = analyze.direction_stability(dictionaries, torch.device("cpu"), 0.7)["scores"]["signed, all latents"]
    summary = analyze.summarise(matrices, analyze.score_names("group", "direction"))
    assert summary["decoder.pwmcc"] is not None and summary["encoder.pwmcc"] is not None
    assert summary["decoder.hungarian"] is None and summary["encoder.hungarian"] is None
    assert summary["shared_fraction"] is None and summary["shared_curve"] is None


def test_every_score_entry_is_consistent_with_where_it_is_shown():
    import analyze
    names = [n.name for n in analyze.score_names("all")]
    curves = [score.curve for score in analyze.SCORES if score.curve]
    assert len(set(names + curves)) == len(names) + len(curves), "two numbers under one report.json name"
    for score in analyze.SCORES:
        assert score.sections <= set(analyze.SECTIONS) and set(score.views) <= set(analyze.VIEWS), score.key
        assert set(score.comparison) <= set(analyze.COMPARISON_STATISTICS), score.key
        assert score.definition.startswith("**") and "\n" not in score.definition, score.key
        assert score.level in analyze.LEVELS, score.key
        if score.level == "function":   # read from latents and planes: no view, no curve over tau
            assert not score.views and not score.directional and not score.curve, score.key
        if score.directional:   # a pair of numbers per pair of seeds has no mean to compare or plot
            assert not score.sections and not score.comparison and not score.curve, score.key
        if score.one_to_one:    # the dynamics are computed without matching
            assert "dynamics" not in score.sections, score.key
        if "trends" in score.sections:   # drawn beside its nulls: the initialisation at least
            assert {"trained", "init"} <= set(score.comparison), score.key
        comparable = {null for name, s, view in analyze.score_names("all") if s is score
                      for null in analyze.nulls_of(s, view)}
        assert set(score.comparison) & set(analyze.NULLS) <= comparable, score.key
    pareto = [score for score in analyze.SCORES if score.key == analyze.PARETO_SCORE]
    assert len(pareto) == 1 and "normalised" in pareto[0].comparison


def test_render_code_names_no_score():
    """Tables, sentences and figures read SCORES: no score's report.json name is typed after the RENDER line."""
    import ast
    import analyze
    source = Path(analyze.__file__).read_text()
    render_line = source[:source.index("# RENDER")].count("\n") + 1
    literals = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
                and isinstance(node.value, str) and node.lineno > render_line]
    names = [score.key for score in analyze.SCORES] + [score.curve for score in analyze.SCORES if score.curve]
    for name in names:
        assert not [text for text in literals if re.search(rf"\b{name}\b", text)], name


# --------------------------------------------------------------------------------------------------
# Nulls


def low_rank_activations(n: int = 4000, d: int = 64, rank: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=generator) @ torch.randn(rank, d, generator=generator) + 3.0


def random_pwmcc(m: int, d: int, seed: int = 0) -> float:
    return pwmcc(max_cosine(random_unit(m, d, seed), random_unit(m, d, seed + 1)))


def test_random_directions_match_better_with_more_atoms_and_fewer_dimensions():
    """Max-cosine of random directions is pure geometry: it rises with m at fixed d, and is far higher in a
    few dimensions (why a score inside the data's subspace needs the subspace null)."""
    scores = [random_pwmcc(m, 32) for m in (16, 128, 1024)]
    assert scores[0] < scores[1] < scores[2]
    assert scores[0] > 0.2, "even a few random vectors in 32 dimensions are far from orthogonal at their best match"
    assert random_pwmcc(256, 5) > random_pwmcc(256, 64) + 0.4


def test_subspace_null_lives_in_each_principal_subspace_and_planted_dictionaries_beat_it():
    import analyze
    X = low_rank_activations()
    bases = {share: principal_basis(X, share) for share in analyze.VARIANCE_SHARES}
    assert bases[0.99].shape[1] == 5
    space = analyze.DataSpace(bases, None, None)
    null, again = subspace_null(space, 256), subspace_null(space, 256)
    assert len(null) == 2 * analyze.NULL_PAIRS
    for view, share in analyze.PROJECTED_VIEWS.items():
        assert null[0].rows[view].shape == (256, bases[share].shape[1])
        assert all(torch.equal(a.rows[view], b.rows[view]) for a, b in zip(null, again))   # fixed seeds
    view = next(iter(analyze.PROJECTED_VIEWS))
    subspace = pwmcc(max_cosine(null[0].rows[view], null[1].rows[view]))
    assert subspace > random_pwmcc(256, 64) + 0.4
    # two SAEs sharing a planted dictionary in the data's span (noisy, permuted copies), projected like trained rows
    generator = torch.Generator().manual_seed(99)
    truth = unit_rows(torch.randn(256, 5, generator=generator, dtype=torch.float64) @ bases[0.99].T)
    copy = unit_rows(truth + 0.01 * torch.randn(256, 64, generator=generator))[torch.randperm(256, generator=generator)]
    A, B = (analyze.project_rows(rows, bases[0.99]) for rows in (truth, copy))
    assert pwmcc(max_cosine(A, B)) > 0.99 and hungarian_mean_cosine(hungarian_match(A, B)) > 0.99
    assert pwmcc(max_cosine(A, B)) > subspace + 0.05


def test_bootstrap_resamples_seeds_and_never_pairs_a_seed_with_itself():
    pairs = np.full((5, 5), 0.5)
    np.fill_diagonal(pairs, 1.0)               # a seed with itself would pull the mean up
    assert mean_and_ci(pairs) == {"mean": 0.5, "ci": [0.5, 0.5]}
    per_seed = mean_and_ci(np.arange(5.0))
    assert per_seed["mean"] == 2 and per_seed["ci"][0] < 2 < per_seed["ci"][1]
    assert mean_and_ci(np.arange(5.0)) == per_seed                                  # deterministic
    assert mean_and_ci(np.array([[np.nan, 0.3], [0.3, np.nan]]))["mean"] == pytest.approx(0.3)
    assert mean_and_ci(np.array([[np.nan, np.nan], [np.nan, np.nan]])) is None      # skipped, not zero


# --------------------------------------------------------------------------------------------------
# Ground truth


@pytest.mark.parametrize("p, k", [(13, 4), (31, 7)])
def test_harmonic_purity_finds_a_pure_cosine_and_not_a_random_latent(p, k):
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    pure = torch.cos(2 * math.pi * k * (a + b) / p)
    random = torch.rand(p * p, generator=torch.Generator().manual_seed(0))
    f = torch.stack([pure, random, torch.zeros(p * p)], dim=1)
    fourier = grid_fourier(sparse_matrix(f), p)
    purity = harmonic_purity(fourier, p)
    assert purity[0] == pytest.approx(1, abs=1e-5) and int(fourier.energy()[0, :, 0].argmax()) + 1 == k
    assert purity[1] < 0.3
    assert purity[2] == 0 and latent_types(fourier)[2] == LATENT_TYPES.index("dead"), "a constant latent is dead"
    assert grid_fourier(f, p).coefficients.allclose(fourier.coefficients)   # dense and sparse columns alike


def test_principal_cosines_are_one_inside_the_span_and_zero_outside():
    plane = torch.eye(6, dtype=torch.float64)[:, :2]
    tiles = torch.tensor([[math.cos(t), math.sin(t), 0, 0, 0, 0] for t in np.linspace(0, 2 * math.pi, 7)[:-1]])
    assert principal_cosines(plane, orthonormal_span(tiles.T)) == pytest.approx([1, 1])   # tiles span the circle
    assert principal_cosines(plane, orthonormal_span(tiles[:1].T)) == pytest.approx([1, 0])   # one: a line
    assert principal_cosines(plane, orthonormal_span(torch.eye(6)[2:].T)) == pytest.approx([0, 0])
    assert principal_cosines(plane, orthonormal_span(torch.zeros(6, 0))) == [0, 0]
    assert principal_cosines(plane, None) == [0, 0]


# --------------------------------------------------------------------------------------------------
# The command line, end to end


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two transformers; a 3-seed group, a 1-seed group, the same configuration trained on the other
    transformer, one whose d_in does not match its transformer's activations, an exact copy of a seed
    already in a group and a slightly different file of another (reruns of one seed), a group trained on
    an activation file (one snapshot file missing), and a corrupt file."""
    root = tmp_path_factory.mktemp("analysis")
    first = write_transformer(root / "transformer" / "model.safetensors")
    second = write_transformer(root / "other" / "model.safetensors", seed=1)
    write_sae_group(root / "sae" / "topk-w32-k4", first, seeds=[0, 1, 2], width=32)
    write_sae_group(root / "sae" / "topk-w16-k4", first, seeds=[0], width=16)
    write_sae_group(root / "sae" / "topk-w32-k4-other", second, seeds=[5], width=32)
    mismatched = root / "sae" / "topk-w32-k4-d8"
    tensors, meta = load_sae(root / "sae" / "topk-w32-k4" / "seed0.safetensors")
    mismatched.mkdir()
    save_tensors(mismatched / "seed0.safetensors", {"W_enc": tensors["W_enc"][:8], "W_dec": tensors["W_dec"][:, :8],
                                                    "b_enc": tensors["b_enc"], "b_dec": tensors["b_dec"][:8]},
                 SAE_FORMAT, SAE_VERSION, dict(meta, config=dict(meta["config"], d_in=8)))
    (root / "sae" / "copy").mkdir()
    (root / "sae" / "copy" / "seed1.safetensors").write_bytes((root / "sae" / "topk-w32-k4" / "seed1.safetensors")
                                                              .read_bytes())
    tensors, meta = load_sae(root / "sae" / "topk-w32-k4" / "seed2.safetensors")    # seed 2, rounded differently
    nudged = unit_rows(tensors["W_dec"] + 0.3 * torch.randn(tensors["W_dec"].shape,
                                                            generator=torch.Generator().manual_seed(7)))
    save_tensors(root / "sae" / "copy" / "seed2.safetensors", dict(tensors, W_dec=nudged, W_enc=nudged.T.contiguous()),
                 SAE_FORMAT, SAE_VERSION, meta)
    acts = root / "acts.safetensors"
    save_file({"acts": transformer_activations(first).contiguous()}, str(acts))
    write_sae_group(root / "sae" / "topk-w8-k2-acts", first, seeds=[0, 1], width=8, k=2, acts=acts)
    (root / "sae" / "topk-w8-k2-acts" / "seed1.snapshots.safetensors").unlink()
    corrupt = root / "sae" / "topk-w16-k4" / "seed9.safetensors"
    corrupt.write_bytes((root / "sae" / "topk-w16-k4" / "seed0.safetensors").read_bytes()[:300])
    return root


def test_report_is_complete_and_identical_when_regenerated(inputs):
    first = run_analyze("sae", "--out", "out1", cwd=inputs)
    assert first.returncode == 0, first.stderr
    second = run_analyze("sae", "--out", "out2", cwd=inputs)
    assert second.returncode == 0, second.stderr
    for name in ("report.md", "report.json"):
        assert (inputs / "out1" / name).read_bytes() == (inputs / "out2" / name).read_bytes(), name
    figures = sorted(p.name for p in (inputs / "out1" / "figures").iterdir())
    assert figures == sorted(p.name for p in (inputs / "out2" / "figures").iterdir())
    for name in figures:
        first_png, second_png = (inputs / out / "figures" / name for out in ("out1", "out2"))
        assert first_png.read_bytes() == second_png.read_bytes(), name
    assert {"topk-w32-k4-stability.png", "topk-w32-k4-purity.png", "topk-w32-k4-dynamics.png", "topk-w32-k4-planes.png",
            "stability-vs-width-k.png", "transformer0-curves.png", "transformer0-fourier.png"} <= set(figures)

    report = json.loads((inputs / "out1" / "report.json").read_text())
    text = (inputs / "out1" / "report.md").read_text()
    groups = {g["name"]: g for g in report["groups"]}
    assert set(groups) == {"topk-w32-k4", "topk-w16-k4", "topk-w32-k4-other", "topk-w8-k2-acts"}
    planted = groups["topk-w32-k4"]
    assert planted["seeds"] == [0, 1, 2]
    primary = planted["stability"]["signed, all latents"]
    init = planted["nulls"]["init"]["signed, all latents"]
    assert primary["decoder.pwmcc"]["mean"] > 0.95 > init["decoder.pwmcc"]["mean"]
    assert primary["decoder.pwmcc"]["mean"] >= primary["decoder.hungarian"]["mean"]
    assert set(planted["nulls"]) == {"init", "random", "subspace"}
    assert set(planted["nulls"]["random"]["signed, all latents"]) == {n.name for n in analyze_names("group", "function")}
    assert planted["nulls"]["random"]["signed, all latents"]["plane_agreement"]["n"] == 5
    assert primary["act_match_weighted"]["mean"] > init["act_match_weighted"]["mean"]   # planted copies agree
    assert planted["normalised"]["signed, all latents"]["act_match_weighted"] > 0
    assert [row["step"] for row in planted["dynamics"]["steps"]] == [0, 3, 10]
    assert planted["dynamics"]["steps"][-1]["act_match_weighted"] == primary["act_match_weighted"]   # the trained SAEs
    assert set(planted["planes"]["per_frequency"]) == {str(k) for k in report["transformers"][
        next(iter(report["transformers"]))]["key_frequencies"]}
    counts = {t: stats["count"]["trained"]["mean"] for t, stats in planted["latent_types"].items()}
    assert sum(counts.values()) == pytest.approx(32)               # every latent has one type
    assert len(planted["latents"][0]["type"]) == 32
    # a seed found twice is never one more seed: it is a rerun, bit-identical or not
    assert any("seed 1 again" in note for note in planted["notes"]), "a copied seed is not compared with itself"
    reruns = {r["seed"]: r for r in planted["reruns"]}
    assert reruns[1]["identical"] and reruns[1]["decoder.pwmcc"] == pytest.approx(1)
    assert not reruns[2]["identical"] and 0.5 < reruns[2]["decoder.pwmcc"] < 0.99
    assert "One seed trained twice" in text
    # trained on an activation file: stability and baselines, but no (a, b) grid for the Fourier analysis
    from_file = groups["topk-w8-k2-acts"]
    assert from_file["stability"] is not None and from_file["planes"] is None and from_file["latent_types"] is None
    assert from_file["stability"]["signed, all latents"]["act_match_weighted"] is not None   # functional, no grid
    assert from_file["stability"]["signed, all latents"]["plane_agreement"] is None
    assert "init" not in from_file["nulls"] and from_file["dynamics"] is None
    assert any("snapshots unusable" in note and "seed1.snapshots" in note for note in from_file["notes"])
    # one seed: what can be reported is, and the report says why stability is missing
    single = groups["topk-w16-k4"]
    assert single["stability"] is None and single["planes"] is not None and single["latent_types"] is not None
    assert any("stability needs at least two seeds" in note for note in single["notes"])
    # the same configuration from another transformer, or of another d_in, is never compared with the first
    assert len(report["refused"]) == 1 and "different sources or activation sizes" in report["refused"][0]
    assert [f["name"] for f in report["failed_groups"]] == ["topk-w32-k4-d8"]
    assert "d_in 8" in report["failed_groups"][0]["reason"]
    # the corrupt file is named, skipped and listed
    assert [s["path"] for s in report["skipped_files"]] == [str(Path("sae/topk-w16-k4/seed9.safetensors"))]
    assert "seed9.safetensors" in text and "Comparisons refused" in text
    for needle in ("PWMCC (max-based)", "Hungarian mean cosine (one-to-one)", "Choices that change the numbers",
                   "subspace", "normalised", "Key frequencies K", "Pareto frontier", "Spearman correlation",
                   "Measures that fit", "Planes, per key frequency", "Latent types",
                   "Why raw decoder scores mislead", "above the nulls?"):
        assert needle in text, needle
    assert not re.search(r"\{[A-Za-z_]+[\[(.]", text), "an f-string placeholder was left unformatted"


def analyze_names(where: str, level: str | None = None):
    import analyze
    return analyze.score_names(where, level)


def test_a_new_score_is_one_entry_and_reaches_every_part_of_the_report(inputs, tmp_path, monkeypatch):
    """One entry in SCORES, nothing else: the score is in report.json's summaries, baselines, normalised
    scores, pair matrices, reruns, dynamics and comparison, in report.md's definitions, group table,
    reruns table, headline, dynamics and comparison, and on the dynamics and trends figures' axes."""
    import analyze
    smaller_mmcs = analyze.Score(
        "smaller_mmcs", "smaller MMCS (max-based)", "smaller MMCS", 3,
        "**smaller MMCS** = min(MMCS(A -> B), MMCS(B -> A)).",
        lambda pair, view, tau: min(mmcs(pair.best[view].best_a), mmcs(pair.best[view].best_b)),
        sections=frozenset(analyze.SECTIONS), comparison=("trained", "init", "normalised"))
    monkeypatch.setattr(analyze, "SCORES", analyze.SCORES + (smaller_mmcs,))
    figure_texts = []
    finish = analyze.finish
    def record(fig, path):
        for ax in fig.axes:
            legend = ax.get_legend()
            figure_texts.extend([ax.get_ylabel(), ax.get_title()]
                                + ([t.get_text() for t in legend.get_texts()] if legend else []))
        finish(fig, path)
    monkeypatch.setattr(analyze, "finish", record)
    monkeypatch.chdir(inputs)
    monkeypatch.setattr(sys, "argv", ["analyze.py", "sae/topk-w32-k4", "sae/copy", "--out", str(tmp_path / "out"),
                                      "--device", "cpu"])
    analyze.main()

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    text = (tmp_path / "out" / "report.md").read_text()
    group = report["groups"][0]
    views = [f"{view}.smaller_mmcs" for view in analyze.VIEWS]
    for variant in analyze.VARIANTS:
        for view in views:
            trained = group["stability"][variant][view]["mean"]
            assert trained <= group["stability"][variant][view.replace("smaller_mmcs", "pwmcc")]["mean"] + 1e-9
            nulls = analyze.nulls_of(smaller_mmcs, view.split(".")[0])
            assert all(group["nulls"][kind][variant][view] is not None for kind in nulls)
            assert set(group["above_nulls"][variant][view]) == set(nulls)
            assert group["normalised"][variant][view] is not None and view in group["pair_matrices"][variant]
    assert all(view in rerun for rerun in group["reruns"] for view in views)
    assert all(row[view]["mean"] is not None for row in group["dynamics"]["steps"] for view in views)
    row = report["comparison"][0]
    assert row["smaller_mmcs"] == group["stability"]["signed, all latents"]["decoder.smaller_mmcs"]["mean"]
    assert row["smaller_mmcs_init"] == group["nulls"]["init"]["signed, all latents"]["decoder.smaller_mmcs"]["mean"]
    assert row["smaller_mmcs_normalised"] is not None
    assert "- **smaller MMCS** = min(MMCS(A -> B), MMCS(B -> A))." in text
    stability_table = text.split("### Direction scores")[1].split("###")[0]
    assert stability_table.count("| smaller MMCS (max-based), decoder rows |") == len(analyze.VARIANTS)
    assert "| smaller MMCS (max-based), encoder columns |" in text.split("### One seed trained twice")[1]
    assert re.search(r"Headline .*smaller MMCS: trained [0-9.]+ \[", text)
    dynamics_header = text.split("### Training dynamics")[1].split("| step |")[1].split("\n")[0]
    assert "| decoder smaller MMCS |" in dynamics_header and "| encoder smaller MMCS |" in dynamics_header
    assert "| smaller MMCS | smaller MMCS init | smaller MMCS normalised |" in text
    assert "decoder smaller MMCS" in figure_texts                                  # trends figure's axis
    assert "subspace null (decoder_99 smaller MMCS)" in figure_texts              # dynamics figure's legend
    assert "PWMCC (max-based), decoder rows" in text, "the scores already there stay"


def test_real_train_sae_output_is_analysed(tmp_path):
    """The contract with stage 2, end to end: SAEs from train_sae.py itself (two architectures, one of
    them with a learned threshold), analysed; the recomputed FVU is the one train_sae.py recorded."""
    transformer = write_transformer(tmp_path / "transformer" / "model.safetensors")
    for arch in ("topk", "jumprelu"):
        trained = subprocess.run([sys.executable, str(REPO / "train_sae.py"), "--transformer", str(transformer),
                                  "--arch", arch, "--seeds", "0", "1", "--width", "32", "--k", "4", "--steps", "40",
                                  "--batch-size", "64", "--snapshots", "4", "--no-kernels", "--device", "cpu",
                                  "--out", str(tmp_path / "sae" / arch)], capture_output=True, text=True)
        assert trained.returncode == 0, trained.stderr
    result = run_analyze("sae", "--out", "out", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(g["name"] for g in report["groups"]) == ["jumprelu", "topk"] and not report["skipped_files"]
    for group in report["groups"]:
        for row, path in zip(group["per_seed"], group["files"]):
            recorded = load_sae(tmp_path / path)[1]["metrics"]
            assert row["fvu"] == pytest.approx(recorded["fvu"], abs=1e-4)
            assert row["l0"] == pytest.approx(recorded["l0"], abs=1e-3)
        primary = group["stability"]["signed, all latents"]
        assert primary["decoder.pwmcc"]["mean"] >= primary["decoder.hungarian"]["mean"]
        assert group["dynamics"]["steps"][0]["step"] == 0 and "init" in group["nulls"]


def test_saes_trained_on_a_shard_folder_are_analysed_on_the_rows_they_were_evaluated_on(tmp_path):
    """--acts FOLDER (shards, with a held-out slice): analyze.py reads the folder its provenance names, checks
    its sha256, and measures on the held-out rows train_sae.py measured on (the same FVU), not on all rows;
    a changed shard is refused."""
    acts = torch.randn(900, 8, generator=torch.Generator().manual_seed(3))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(acts.split(300)):
        save_file({"acts": part.contiguous()}, str(shards / f"acts-{i:05d}.safetensors"))
    trained = subprocess.run([sys.executable, str(REPO / "train_sae.py"), "--acts", str(shards), "--eval-rows", "200",
                              "--seeds", "0", "1", "--width", "16", "--k", "3", "--steps", "20", "--batch-size", "64",
                              "--snapshots", "3", "--no-kernels", "--device", "cpu", "--out", str(tmp_path / "sae" / "s")],
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    result = run_analyze("sae", "--out", "out", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (group,) = json.loads((tmp_path / "out" / "report.json").read_text())["groups"]
    assert group["activations"]["n"] == 200 and group["stability"] is not None
    for row, path in zip(group["per_seed"], group["files"]):
        assert row["fvu"] == pytest.approx(load_sae(tmp_path / path)[1]["metrics"]["fvu"], abs=1e-5)
    save_file({"acts": acts[:300].flip(0).contiguous()}, str(shards / "acts-00000.safetensors"))
    changed = run_analyze("sae", "--out", "out2", "--device", "cpu", cwd=tmp_path)
    assert changed.returncode == 2 and "has changed since the SAEs were trained" in changed.stderr


def test_saes_on_mlp_post_get_planes_families_and_latent_types(tmp_path):
    """At blocks.0.mlp_post the activations are the neurons (d = d_mlp), whose true units are frequencies: the
    planes, families and latent types are read from the latents' activations there as at the residual
    stream, against the true planes of the neurons' own activations."""
    transformer = write_transformer(tmp_path / "transformer" / "model.safetensors")
    trained = subprocess.run([sys.executable, str(REPO / "train_sae.py"), "--transformer", str(transformer),
                              "--hook", "blocks.0.mlp_post", "--seeds", "0", "1", "--width", "32", "--k", "4",
                              "--steps", "40", "--batch-size", "64", "--snapshots", "3", "--no-kernels", "--device",
                              "cpu", "--out", str(tmp_path / "sae" / "mlp")], capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    result = run_analyze("sae", "--out", "out", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (group,) = report["groups"]
    keys = next(iter(report["transformers"].values()))["key_frequencies"]
    assert group["hook"] == "blocks.0.mlp_post" and group["activations"]["d"] == 64 and keys
    assert set(group["planes"]["per_frequency"]) == {str(k) for k in keys}
    assert sum(stats["count"]["trained"]["mean"] for stats in group["latent_types"].values()) == pytest.approx(32)
    assert sum(group["activations"]["variance_in_planes"]["by_variable"].values()) <= 1 + 1e-6
    primary = group["stability"]["signed, all latents"]
    assert primary["plane_agreement"] is not None and primary["act_match_weighted"] is not None
    assert {"init", "random", "subspace"} == set(group["nulls"])
    assert "#### Planes, per key frequency" in (tmp_path / "out" / "report.md").read_text()


def test_no_silent_overwrite(inputs):
    existing = inputs / "out-existing"
    existing.mkdir(exist_ok=True)
    (existing / "report.json").write_text("{}\n")
    result = run_analyze("sae/topk-w16-k4/seed0.safetensors", "--out", "out-existing", cwd=inputs)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--force" in result.stderr and "Traceback" not in result.stderr


def test_no_sae_files_is_one_line_with_the_command_that_makes_them(tmp_path):
    result = run_analyze(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no SAE files found in runs/sae/*/seed*;" in result.stderr
    assert "python train_sae.py --arch topk --seeds 0 1 2 3 4" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing is written when there is nothing to analyse"


# --------------------------------------------------------------------------------------------------
# The report is one run: non-finite SAEs skipped, --force replaces the folder whole, the lock, a full disk


def analyze_in_process(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, list[str]]:
    """analyze.py's command line run in this process (faster than a child): (exit status, stderr lines)."""
    import analyze
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["analyze.py", *args, "--device", "cpu"])
    monkeypatch.setattr(sae_core, "ENTERED_RUNS", [])
    try:
        run_cli(analyze.main, unit_outputs=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def figures_named_by(report: dict) -> set[str]:
    names = {report["comparison_figure"], *report["map"]["figures"].values()}
    for entry in [*report["groups"], *report["transformers"].values()]:
        names |= set((entry.get("figures") or {}).values())
    return names


def test_non_finite_saes_are_skipped_with_the_reason_and_runs_being_written_are_ignored(tmp_path, monkeypatch, capsys):
    transformer = write_transformer(tmp_path / "transformer" / "model.safetensors")
    group = tmp_path / "sae" / "topk-w16-k4"
    write_sae_group(group, transformer, seeds=[0, 1, 2, 3], width=16)
    tensors, meta = load_sae(group / "seed2.safetensors")
    save_tensors(group / "seed2.safetensors", tensors, SAE_FORMAT, SAE_VERSION,
                 dict(meta, metrics=dict(meta["metrics"], fvu=float("nan"))))
    tensors, meta = load_sae(group / "seed3.safetensors")
    tensors["W_enc"][0, 0] = float("inf")
    save_tensors(group / "seed3.safetensors", tensors, SAE_FORMAT, SAE_VERSION, meta)
    staging = group / RUN_DIR / "staging-seeds-7-123"        # a stage-2 run still being written
    staging.mkdir(parents=True)
    (staging / "seed7.safetensors").write_bytes((group / "seed0.safetensors").read_bytes())
    assert analyze_in_process(monkeypatch, capsys, tmp_path, "sae", "--out", "out")[0] == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped_files"]}
    assert set(skipped) == {"seed2.safetensors", "seed3.safetensors"}
    assert skipped["seed2.safetensors"].endswith("metric fvu not finite (a diverged or damaged SAE); not analysed")
    assert skipped["seed3.safetensors"].endswith("W_enc not finite (a diverged or damaged SAE); not analysed")
    assert [g["seeds"] for g in report["groups"]] == [[0, 1]], "seed 7 of the unfinished run is not read"
    assert skipped["seed2.safetensors"] in (tmp_path / "out" / "report.md").read_text()


def test_force_replaces_the_report_folder_whole_and_only_a_report_folder(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    assert analyze_in_process(monkeypatch, capsys, inputs, "sae", "--out", str(out))[0] == 0
    first = json.loads((out / "report.json").read_text())
    assert {p.name for p in (out / "figures").iterdir()} == figures_named_by(first)
    code, lines = analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w32-k4", "--out", str(out))
    assert code == 2 and f"{out} already exists" in lines[-1] and "--force" in lines[-1]

    assert analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w32-k4", "--out", str(out), "--force")[0] == 0
    second = json.loads((out / "report.json").read_text())
    assert [g["name"] for g in second["groups"]] == ["topk-w32-k4"]
    on_disk = {p.name for p in (out / "figures").iterdir()}
    assert on_disk == figures_named_by(second) and "topk-w16-k4-purity.png" not in on_disk, "no stale figure"
    assert leftovers(tmp_path) == []

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("the user's")
    (tmp_path / "a-file").write_text("the user's")
    for target, message in ((tmp_path / "notes", "holds files that are not an analysis report (no report.json)"),
                            (tmp_path / "a-file", "is a file; --out names the report's folder")):
        code, lines = analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w32-k4", "--out", str(target),
                                         "--force")
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert (tmp_path / "notes" / "mine.txt").read_text() == (tmp_path / "a-file").read_text() == "the user's"


def test_a_full_disk_is_one_line_and_leaves_the_earlier_report_whole(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report"
    assert analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w32-k4", "--out", str(out))[0] == 0
    before = run_files(out)
    write_text = Path.write_text

    def disk_full_at_report_json(self, *args, **kwargs):
        if self.name.startswith(".report.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", disk_full_at_report_json)
    code, lines = analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w16-k4", "--out", str(out), "--force")
    assert (code, lines) == (1, [f"error: cannot write {out}/report.json: No space left on device; run 'report' was "
                                 f"not committed and {tmp_path} is unchanged"])
    assert run_files(out) == before and leftovers(tmp_path) == []


def test_a_second_analysis_writing_to_the_same_place_is_refused_naming_the_first(inputs, tmp_path, monkeypatch,
                                                                                  capsys):
    with RunOutput(tmp_path, "other-report", ["other-report"], force=False):
        code, lines = analyze_in_process(monkeypatch, capsys, inputs, "sae/topk-w32-k4", "--out", str(tmp_path / "r"))
    assert code == 2 and len(lines) == 1 and f"{tmp_path} is in use by another run (pid {os.getpid()}" in lines[0]
    assert not (tmp_path / "r").exists()


def test_two_kinds_of_one_architecture_are_never_grouped_as_seeds_of_one_configuration():
    """Archetypal with shared and with per-seed centroids differ only in a variant setting; analyze.py must
    not compare them as seeds of one configuration (nor as reruns of one seed)."""
    from analyze import sae_kind as kind
    assert kind({"arch": "archetypal", "centroids": "shared"}) != kind({"arch": "archetypal", "centroids": "per-seed"})
    assert kind({"arch": "topk", "centroids": "shared"}) == kind({"arch": "topk", "centroids": "per-seed"}) == "topk"


def test_penalty_saes_steered_to_two_targets_are_two_configurations():
    """relu at --target-l0 4 and 16 share their L1 setting; grouped by it they would be compared as seeds of
    one configuration."""
    import analyze
    steered = [{"arch": "relu", "l1": 0.2, "target_l0": target} for target in (4.0, 16.0)]
    assert [analyze.sparsity(config) for config in steered] == [("target_l0", 4.0), ("target_l0", 16.0)]
    assert analyze.sparsity({"arch": "relu", "l1": 0.2, "target_l0": 0.0}) == ("l1", 0.2)
    assert analyze.sparsity({"arch": "jumprelu", "l0": 0.05}) == ("l0", 0.05), "a config saved before target_l0"
    assert analyze.sparsity({"arch": "topk", "k": 32, "target_l0": 0.0}) == ("k", 32.0)
