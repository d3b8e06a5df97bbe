"""The run layout SAELens loads: each seed a folder with cfg.json and sae_weights.safetensors holding what
SAELens's loader reads, checked against a table taken from SAELens's source (sae-lens is not a dependency)."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from sae_core import (ARCHITECTURES, RunOutput, SAEConfig, SAETrainer, build_sae, load_sae, sae_reconstruct,
                      save_tensors, seed_files, write_sae_folder, SAE_FORMAT, SAE_VERSION)
from test_sae import planted_data, run_files, stage_in_process, tiny_acts, TINY_SAE

# What SAE.load_from_disk reads, from SAELens 6.18.0 (github.com/jbloomAus/SAELens, commit 91ca16c):
# sae_lens/saes/sae.py, SAEConfig and SAEConfig.from_dict (cfg.json's "architecture" picks the config class,
# whose dataclass fields are read and every other key ignored; "metadata" becomes SAEMetadata);
# sae_lens/saes/topk_sae.py, TopKSAEConfig (k, rescale_acts_by_decoder_norm); sae_lens/constants.py, DTYPE_MAP;
# sae_lens/loading/pretrained_sae_loaders.py, handle_config_defaulting (a cfg without a metadata.sae_lens_version
# >= 6 is converted as a pre-6 config). Required: no default in the dataclass (d_in, d_sae) or read directly.
SAELENS_REQUIRED = {"architecture": str, "d_in": int, "d_sae": int, "dtype": str}
SAELENS_OPTIONAL = {"device": str, "apply_b_dec_to_input": bool, "normalize_activations": str,
                    "reshape_activations": str, "metadata": dict}
SAELENS_ARCHITECTURE_FIELDS = {"standard": {}, "jumprelu": {},
                               "topk": {"k": int, "rescale_acts_by_decoder_norm": bool}}
SAELENS_DTYPES = ("float32", "float64", "float16", "bfloat16", "torch.float32", "torch.float64", "torch.float16",
                  "torch.bfloat16")
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
# The parameters each inference class registers (initialize_weights in sae.py, standard_sae.py, topk_sae.py,
# jumprelu_sae.py), loaded with load_state_dict's strict default: exactly these names, no others.
SAELENS_TENSORS = {"standard": ("W_enc", "W_dec", "b_enc", "b_dec"), "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
                   "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
EXPECTED = {"relu": "standard", "topk": "topk", "archetypal": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
            "matryoshka": "jumprelu"}


def saelens_forward(cfg: dict, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's inference from cfg.json and sae_weights.safetensors alone, as its classes compute it:
    process_sae_in subtracts b_dec (apply_b_dec_to_input), encode is the architecture's activation of
    sae_in @ W_enc + b_enc (standard: ReLU; topk: the k largest, then ReLU; jumprelu: ReLU(z) * (z >
    threshold)), decode is f @ W_dec + b_dec."""
    z = (x - weights["b_dec"] * cfg["apply_b_dec_to_input"]) @ weights["W_enc"] + weights["b_enc"]
    if cfg["architecture"] == "topk":
        values, indices = torch.topk(z, k=cfg["k"], dim=-1, sorted=False)
        f = torch.zeros_like(z).scatter_(-1, indices, values.relu())
    elif cfg["architecture"] == "jumprelu":
        f = z.relu() * (z > weights["threshold"]).to(z.dtype)
    else:
        f = z.relu()
    return f @ weights["W_dec"] + weights["b_dec"]


def trained_sae_folder(arch: str, folder) -> tuple[dict, dict, torch.Tensor]:
    """A small SAE of `arch`, trained a few steps and written with write_sae_folder; (exported tensors,
    HUSAI config, the activations)."""
    acts, _ = planted_data(512, 12, 24, active=2)
    cfg = SAEConfig(arch=arch, d_in=12, width=32, k=3, **({"n_centroids": 16} if arch == "archetypal" else {}))
    sae = build_sae(cfg, [0])
    sae.init_from_data(acts)
    trainer = SAETrainer(sae, lr=1e-3, steps=5, warmup_steps=1, decay_steps=1, use_kernels=False)
    for step in range(5):
        trainer.step(acts[step * 64:(step + 1) * 64])
    tensors, config = sae.export(0), json.loads(json.dumps(dict(asdict(cfg), seed=0)))   # tuples as JSON lists
    folder.mkdir()
    write_sae_folder(folder, tensors, {"config": config, "metrics": {"fvu": 0.5}, "provenance": {"source": "acts"}})
    return tensors, config, acts


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cfg_json_and_weights_hold_what_saelenss_loader_reads(arch, tmp_path):
    tensors, config, acts = trained_sae_folder(arch, tmp_path / "seed0")
    cfg = json.loads((tmp_path / "seed0" / "cfg.json").read_text())
    assert cfg["architecture"] == EXPECTED[arch]
    fields = {**SAELENS_REQUIRED, **SAELENS_ARCHITECTURE_FIELDS[cfg["architecture"]]}
    for key, kind in {**fields, **SAELENS_OPTIONAL}.items():
        assert key in cfg or key not in fields, f"{arch}: cfg.json lacks {key}"
        assert key not in cfg or type(cfg[key]) is kind, f"{arch}: {key} is {type(cfg[key]).__name__}, not {kind.__name__}"
    assert cfg["dtype"] in SAELENS_DTYPES and cfg["normalize_activations"] in NORMALIZE_ACTIVATIONS
    assert cfg["reshape_activations"] in ("none", "hook_z")
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6, "read as a SAELens 6 config, not converted"
    # what HUSAI's tensors mean: raw units, b_dec subtracted before encoding, top-k on the pre-activations
    assert (cfg["d_in"], cfg["d_sae"]) == (12, 32) and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    if cfg["architecture"] == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["husai"]["config"] == config and cfg["husai"]["metrics"] == {"fvu": 0.5}

    weights = load_file(str(tmp_path / "seed0" / "sae_weights.safetensors"))
    shapes = {"W_enc": (12, 32), "W_dec": (32, 12), "b_enc": (32,), "b_dec": (12,), "threshold": (32,)}
    assert sorted(weights) == sorted(SAELENS_TENSORS[cfg["architecture"]]), "exactly SAELens's tensors"
    for name, t in weights.items():
        assert tuple(t.shape) == shapes[name] and t.dtype == torch.float32, name
    assert not (tmp_path / "seed0" / "husai_tensors.safetensors").exists()
    # SAELens's own arithmetic on these two files is HUSAI's reconstruction, bit for bit
    assert torch.equal(saelens_forward(cfg, weights, acts), sae_reconstruct(tensors, config, acts))
    loaded, meta = load_sae(tmp_path / "seed0")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta == {"config": config, "metrics": {"fvu": 0.5}, "provenance": {"source": "acts"}}


def test_tensors_saelens_has_no_place_for_go_beside_its_files_and_are_read_back(tmp_path):
    tensors, config, _ = trained_sae_folder("topk", tmp_path / "seed0")
    extra = dict(tensors, centroids=torch.randn(16, 12))
    write_sae_folder(tmp_path / "seed0", extra, {"config": config, "metrics": {}, "provenance": {}})
    assert sorted(load_file(str(tmp_path / "seed0" / "sae_weights.safetensors"))) == sorted(SAELENS_TENSORS["topk"])
    assert sorted(load_file(str(tmp_path / "seed0" / "husai_tensors.safetensors"))) == ["centroids"]
    loaded, _ = load_sae(tmp_path / "seed0")
    assert torch.equal(loaded["centroids"], extra["centroids"])


def test_a_seed_is_found_in_either_layout_and_a_foreign_folder_is_refused(tmp_path):
    tensors, config, _ = trained_sae_folder("jumprelu", tmp_path / "seed0")
    save_tensors(tmp_path / "seed1.safetensors", tensors, SAE_FORMAT, SAE_VERSION,
                 {"config": dict(config, seed=1), "metrics": {}, "provenance": {}})
    assert seed_files(tmp_path / "seed0").snapshots == tmp_path / "seed0" / "snapshots.safetensors"
    assert seed_files(tmp_path / "seed1.safetensors").snapshots == tmp_path / "seed1.snapshots.safetensors"
    old, meta = load_sae(tmp_path / "seed1.safetensors")
    assert meta["config"]["seed"] == 1 and all(torch.equal(old[k], tensors[k]) for k in tensors)
    cfg = json.loads((tmp_path / "seed0" / "cfg.json").read_text())
    del cfg["husai"]                                    # as SAELens's own save_model writes it
    (tmp_path / "seed0" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="no \"husai\" record"):
        load_sae(tmp_path / "seed0")


def test_a_forced_rerun_replaces_an_earlier_single_file_run_of_its_seeds(tmp_path, monkeypatch, capsys):
    """A run in the layout before seed folders: its seeds' files are the new run's entries too, so --force
    replaces them (none survives beside the folders) and a run without --force is refused."""
    acts, folder = tiny_acts(tmp_path), tmp_path / "sae"
    with RunOutput(folder, "seeds-0-1", ["seed0.safetensors", "seed1.safetensors", "seed1.log.jsonl"], force=False) as run:
        for name in run.entries:
            run.path(name).write_bytes(b"earlier")
        run.commit()
    code, lines = stage_in_process(monkeypatch, capsys, "--acts", acts, *TINY_SAE, "--seeds", "0", "1", "--out", str(folder))
    assert code == 2 and "seed0.safetensors already exists" in lines[-1]
    code, _ = stage_in_process(monkeypatch, capsys, "--acts", acts, *TINY_SAE, "--seeds", "0", "1", "--out", str(folder),
                               "--force")
    assert code == 0 and sorted({name.split("/")[0] for name in run_files(folder)}) == ["seed0", "seed1"]
