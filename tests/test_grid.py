"""Stage 2 as a grid (several values per setting, one invocation) and stage 3's stability map over it."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sae_core
from sae_core import load_sae, run_cli
from test_analyze import write_transformer

TINY = ["--steps", "8", "--batch-size", "64", "--snapshots", "3", "--log-every", "4", "--seeds", "0", "1",
        "--device", "cpu", "--no-kernels"]


def run_in_process(monkeypatch, capsys, script: str, *args: str) -> tuple[int, str, str]:
    """train_sae.py or analyze.py run in this process: (exit status, stdout, stderr)."""
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    monkeypatch.setattr(sae_core, "ENTERED_RUNS", [])
    try:
        run_cli(module.main, unit_outputs=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_acts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("acts") / "acts.safetensors"
    save_file({"acts": torch.randn(512, 8, generator=torch.Generator().manual_seed(0))}, str(path))
    return str(path)


def folder_files(folder: Path) -> dict[str, object]:
    """A configuration folder's files by relative path: tensors and cfg.json as bytes, logs as rows without
    the timing (the only part allowed to differ between two runs); not the run bookkeeping in .husai/."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".husai" not in p.parts):
        name = str(path.relative_to(folder))
        if path.name.endswith(".jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            files[name] = rows[:-1] + [{k: v for k, v in rows[-1].items() if k != "train_seconds"}]
        else:
            files[name] = path.read_bytes()
    return files


def test_grid_cells_are_byte_identical_to_training_each_cell_alone(tmp_path, monkeypatch, capsys, tiny_acts):
    code, out, err = run_in_process(monkeypatch, capsys, "train_sae", "--acts", tiny_acts, "--arch", "topk", "relu",
                                    "--width", "8", "16", "--k", "2", "4", "--l1", "0.5", "2", *TINY,
                                    "--runs-dir", str(tmp_path / "grid"))
    assert code == 0, err
    made = sorted(p.name for p in (tmp_path / "grid").iterdir())
    assert made == sorted(f"{arch}-w{w}-{s}-acts-acts" for w in (8, 16)
                          for arch, s in [("topk", "k2"), ("topk", "k4"), ("relu", "l1_0.5"), ("relu", "l1_2")])
    assert out.count("cell ") >= 8 and "cell 8/8" in out, "one progress line per cell, with its time"
    for flags, folder in [(["--arch", "topk", "--width", "16", "--k", "4"], "topk-w16-k4-acts-acts"),
                          (["--arch", "relu", "--width", "8", "--l1", "2"], "relu-w8-l1_2-acts-acts")]:
        alone = tmp_path / "alone" / folder
        code, _, err = run_in_process(monkeypatch, capsys, "train_sae", "--acts", tiny_acts, *flags, *TINY,
                                      "--out", str(alone))
        assert code == 0, err
        alone_files, cell_files = folder_files(alone), folder_files(tmp_path / "grid" / folder)
        assert len(cell_files) == 8 and alone_files == cell_files, f"{folder} differs from the cell trained alone"
    relu_config = load_sae(tmp_path / "grid" / "relu-w8-l1_2-acts-acts" / "seed0")[1]["config"]
    assert relu_config["k"] == 32, "a setting the architecture lacks keeps its default instead of multiplying cells"


def test_invalid_cells_are_skipped_with_a_note_and_a_value_no_cell_can_use_is_an_error(tmp_path, monkeypatch, capsys,
                                                                                       tiny_acts):
    code, out, err = run_in_process(monkeypatch, capsys, "train_sae", "--acts", tiny_acts, "--arch", "topk",
                                    "matryoshka", "--width", "4", "16", "--k", "2", "8", *TINY, "--steps", "2",
                                    "--runs-dir", str(tmp_path / "grid"))
    assert code == 0, err
    assert "note: skipped arch topk, width 4, k 8: k 8: must lie between 1 and the width (4)" in out
    assert out.count("note: skipped arch matryoshka, width 4") == 2, "Matryoshka's prefixes need 16 latents here"
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == [
        "matryoshka-w16-k2-acts-acts", "matryoshka-w16-k8-acts-acts", "topk-w16-k2-acts-acts", "topk-w16-k8-acts-acts",
        "topk-w4-k2-acts-acts"]

    refusals = [(["--width", "4", "16", "--k", "2", "100"], "--k 100: no cell of the grid can use it (k 100: must lie "
                                                           "between 1 and the width (4))"),
                (["--width", "4", "--k", "8"], "k 8: must lie between 1 and the width (4)"),
                (["--width", "8", "16", "--k", "2", "--out", str(tmp_path / "one")], "two cells of the grid write"),
                (["--grid", "quick"], "--grid quick sets --seeds itself"),
                (["--arch", "relu", "--width", "8", "--l1", "1", "-2"], "l1 -2.0: must not be negative")]
    for flags, message in refusals:
        args = ["--acts", tiny_acts, *TINY, "--runs-dir", str(tmp_path / "refused"), *flags]
        code, out, err = run_in_process(monkeypatch, capsys, "train_sae", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not (tmp_path / "refused").exists() and not (tmp_path / "one").exists(), "refused before any training"


def test_the_map_renders_a_2x2_grid_with_its_cells_in_report_json(tmp_path, monkeypatch, capsys):
    import analyze
    transformer = write_transformer(tmp_path / "transformer" / "model.safetensors")
    common = ["--transformer", str(transformer), "--hook", "blocks.0.resid_post", *TINY, "--runs-dir", str(tmp_path / "sae")]
    code, _, err = run_in_process(monkeypatch, capsys, "train_sae", "--width", "8", "16", "--k", "2", "4", *common)
    assert code == 0, err
    code, _, err = run_in_process(monkeypatch, capsys, "train_sae", "--width", "8", "--k", "2", "--vary-data-order",
                                  *common)
    assert code == 0, err
    finish = analyze.finish       # only the maps are saved: the per-group figures are other tests' business (and slow)
    monkeypatch.setattr(analyze, "finish", lambda fig, path: finish(fig, path) if path.name.startswith("map-")
                        else analyze.plt.close(fig))
    code, _, err = run_in_process(monkeypatch, capsys, "analyze", str(tmp_path / "sae"), "--out",
                                  str(tmp_path / "report"), "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {(row["kind"], row["data_order"], row["width"], row["sparsity_value"]): row for row in report["comparison"]}
    assert sorted(rows) == sorted([("topk", "same", w, k) for w in (8, 16) for k in (2.0, 4.0)]
                                  + [("topk", "varied", 8, 2.0)])
    for row in rows.values():
        for measure in ("act_match_weighted", "fvu", "dead_frac"):
            stat = row[f"map_{measure}"]
            assert stat["ci"][0] <= stat["mean"] <= stat["ci"][1], (row["name"], measure)
    assert report["map"]["figures"] == {"topk": "map-topk.png"}
    assert (tmp_path / "report" / "figures" / "map-topk.png").stat().st_size > 10_000
    hook = "blocks.0.resid_post"
    assert report["map"]["twins"] == [{"kind": "topk", "width": 8, "sparsity": "k=2", "same": f"topk-w8-k2-{hook}",
                                       "varied": f"topk-w8-k2-{hook}-varied-order"}], "the varied-order twin is paired"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### The stability map" in text and "Same versus varied data order" in text
    assert text.count("| topk-w") == 2 * 5, "every group in the comparison table and in the map table"


@pytest.mark.parametrize("name,cells", [("quick", 8), ("study", 55)])
def test_the_named_grids_expand_to_their_cells_on_the_default_model(name, cells, capsys):
    """Every line of GRIDS parses and is valid for the default model's activations (d = 128, 113^2 rows):
    only TopK cells with k > width are skipped, and every kind of SAE is in the study."""
    import train_sae
    runs = train_sae.command_lines(train_sae.build_parser(), ["--grid", name])
    configs = [cfg for args in runs for cfg in train_sae.grid_cells(args, 128, 113**2)]
    notes = capsys.readouterr().out.splitlines()
    assert len(configs) == cells and all("must lie between 1 and the width" in note for note in notes), notes
    if name == "study":
        kinds = {cfg.arch + (f"-{cfg.centroids}" if cfg.arch == "archetypal" else "") for cfg in configs}
        assert kinds == {"topk", "batchtopk", "matryoshka", "archetypal-shared", "archetypal-per-seed", "relu",
                         "jumprelu"}
        assert {cfg.width for cfg in configs} == {8, 16, 32, 64, 128, 256, 512, 1024}
        assert {cfg.k for cfg in configs if cfg.arch == "topk"} == {1, 4, 16, 32, 64}
        assert sum(args.vary_data_order for args in runs for _ in train_sae.grid_cells(args, 128, 113**2)) == 4


def test_the_frontier_needs_the_planes_beyond_random_atoms_of_the_data_subspace():
    """At large k random TopK atoms write the planes as well as trained SAEs do; such a cell is not stable
    and true by the map's rule, however high its agreement."""
    import analyze

    def row(name, agreement, null, fvu=0.001):
        stat = {"mean": agreement, "ci": [agreement - 0.01, agreement + 0.01]}
        return {"name": name, "data_order": "same", "fvu": fvu, "kind": "topk", "activations": "a", "width": 512,
                "sparsity": name, "map_plane_agreement": stat, "map_plane_recovery": stat,
                "plane_agreement_random": null, "recovery_random": null,
                "map_latent_match": None, "map_latent_match_shuffled": None}
    rows = [row("learned", 0.95, 0.6), row("as random", 0.98, 0.975), row("no null", 0.95, None),
            row("coarse", 0.95, 0.6, fvu=0.1), row("unstable", 0.7, 0.3)]
    assert analyze.stability_map(rows)["frontier"] == ["learned"]
