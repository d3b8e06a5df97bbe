"""Stage 1: data without leakage, the Fourier tools, the hooked model, file I/O and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from einops import einsum
from safetensors.torch import save_file

from sae_core import (HusaiError, embedding_frequency_shares, fourier_basis, fourier_purity, key_frequencies,
                      load_tensors, save_tensors)
from train_transformer import (FORMAT, VERSION, ModelConfig, Transformer, collect_activations, load_transformer,
                               make_dataset, run_with_replacement, train_test_split)

REPO = Path(__file__).resolve().parent.parent


def run_stage(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_transformer.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.parametrize("token_format", ["ab", "aopb"])
@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_answer_is_never_an_input_and_prediction_is_read_at_equals(token_format, op):
    cfg = ModelConfig(p=23, op=op, token_format=token_format)
    tokens, labels = make_dataset(cfg)
    a, b = tokens[:, 0], tokens[:, -2]
    assert tokens.shape == (23 * 23, cfg.n_ctx)
    assert (tokens[:, -1] == 23).all(), "the last token is `=`, where the answer is read"
    assert torch.equal(labels, {"add": (a + b) % 23, "sub": (a - b) % 23, "mul": (a * b) % 23}[op])
    if token_format == "aopb":
        assert (tokens[:, 1] == 24).all()
    model = Transformer(cfg)
    # The logits are the unembedding of the `=` position alone: zeroing it zeroes them.
    zeroed = run_with_replacement(model, tokens, f"blocks.{cfg.n_layers - 1}.resid_post", torch.zeros_like)
    assert torch.equal(zeroed, torch.zeros_like(zeroed))


def test_split_is_disjoint_seeded_and_covers_all_pairs():
    train, test = train_test_split(31, 0.3, seed=5)
    assert len(train) == round(0.3 * 31 * 31)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(31 * 31))
    assert torch.equal(train, train_test_split(31, 0.3, seed=5)[0])
    assert not torch.equal(train, train_test_split(31, 0.3, seed=6)[0])


@pytest.mark.parametrize("p", [3, 10, 23, 113])
def test_fourier_basis_is_orthonormal(p):
    F, labels = fourier_basis(p)
    assert F.shape == (p, p) and len(labels) == p
    torch.testing.assert_close(F @ F.T, torch.eye(p), atol=1e-5, rtol=0)


def test_planted_embedding_frequency_is_found_and_random_is_not():
    p, k = 113, 17
    x = torch.arange(p, dtype=torch.float32)
    planted = torch.zeros(p, 16)
    planted[:, 3] = torch.cos(2 * torch.pi * k * x / p)
    planted[:, 9] = 2 * torch.sin(2 * torch.pi * k * x / p)
    shares = embedding_frequency_shares(planted)
    assert shares.argmax().item() + 1 == k
    assert shares.max().item() == pytest.approx(1.0, abs=1e-5)
    assert key_frequencies(shares, 0.05) == [k]
    random_shares = embedding_frequency_shares(torch.randn(p, 128, generator=torch.Generator().manual_seed(0)))
    assert random_shares.max() < 0.05 and key_frequencies(random_shares, 0.05) == []


def test_fourier_purity_of_planted_and_random_units():
    p = 31
    a, b = torch.arange(p).view(p, 1).float(), torch.arange(p).view(1, p).float()
    units = torch.stack([torch.cos(2 * torch.pi * 4 * (a + b) / p),
                         torch.sin(2 * torch.pi * 9 * a / p).expand(p, p) + 5,
                         torch.randn(p, p, generator=torch.Generator().manual_seed(1)),
                         torch.ones(p, p)], dim=-1)
    purity, best = fourier_purity(units)
    torch.testing.assert_close(purity[:2], torch.ones(2), atol=1e-5, rtol=0)
    assert best[:2].tolist() == [4, 9]
    assert purity[2] < 0.3, "random activations spread over all frequencies"
    assert purity[3] == 0 and best[3] == 0, "a constant unit has no Fourier structure"


def test_attention_equals_explicit_causal_attention():
    model = Transformer(ModelConfig(p=23))
    attn = model.blocks[0].attn
    x = torch.randn(40, 3, 128, generator=torch.Generator().manual_seed(0))
    q = einsum(x, attn.W_Q, "b q d, h d e -> b h q e")
    k = einsum(x, attn.W_K, "b k d, h d e -> b h k e")
    v = einsum(x, attn.W_V, "b k d, h d e -> b h k e")
    scores = einsum(q, k, "b h q e, b h k e -> b h q k") / 32**0.5
    scores = scores.masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    expected = einsum(einsum(scores.softmax(-1), v, "b h q k, b h k e -> b h q e"), attn.W_O,
                      "b h q e, h e d -> b q d")
    torch.testing.assert_close(attn(x, n_queries=3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, n_queries=1), expected[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers,layernorm", [(1, False), (2, True)])
def test_patching_an_activation_with_itself_changes_nothing_and_zeros_change_logits(layers, layernorm):
    torch.manual_seed(0)
    cfg = ModelConfig(p=23, n_layers=layers, layernorm=layernorm)
    model = Transformer(cfg).eval()
    tokens, _ = make_dataset(cfg)
    with torch.no_grad():
        clean = model(tokens)
    for hook in cfg.hook_names():
        same = run_with_replacement(model, tokens, hook, lambda x: x)
        assert torch.equal(same, clean), hook
        zeroed = run_with_replacement(model, tokens, hook, torch.zeros_like)
        assert not torch.allclose(zeroed, clean), hook
    acts = collect_activations(model, tokens, f"blocks.{layers - 1}.mlp_post")
    assert acts.shape == (23 * 23, cfg.d_mlp)
    with pytest.raises(HusaiError, match="unknown hook"):
        collect_activations(model, tokens, "blocks.0.nonexistent")


def saved_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(p=23)
    model = Transformer(cfg)
    path = tmp_path / "model.safetensors"
    tensors = dict(model.state_dict(), **{"split.train_indices": train_test_split(23, 0.5, 0)[0]})
    config = {"model": vars(cfg), "train": {"frac": 0.5}}
    save_tensors(path, tensors, FORMAT, VERSION, {"config": config, "metrics": {"test_acc": 0.5}, "split_seed": 0})
    return path


def test_save_load_round_trip_is_exact(tmp_path):
    path = saved_model(tmp_path)
    model, meta = load_transformer(path)
    original, _ = load_tensors(path, FORMAT, VERSION)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert meta["metrics"] == {"test_acc": 0.5} and meta["split_seed"] == 0
    assert meta["config"]["model"]["p"] == 23
    assert torch.equal(meta["train_indices"], train_test_split(23, 0.5, 0)[0])


def test_bad_files_fail_with_a_clear_error_naming_the_file(tmp_path):
    path = saved_model(tmp_path)
    tensors, meta = load_tensors(path, FORMAT, VERSION)
    cases = {
        "wrong_format": (tensors, "husai.sae", VERSION, "format is 'husai.sae'"),
        "wrong_version": (tensors, FORMAT, 99, "version '99'"),
        "missing_tensor": ({k: v for k, v in tensors.items() if k != "W_U"}, FORMAT, VERSION, "missing tensor"),
    }
    for name, (content, fmt, version, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_tensors(bad, content, fmt, version, meta)
        with pytest.raises(HusaiError, match=f"{name}.safetensors.*{message}"):
            load_transformer(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HusaiError, match="truncated.safetensors.*truncated or corrupt"):
        load_transformer(truncated)
    with pytest.raises(HusaiError, match="nowhere.safetensors: no such file.*train_transformer.py"):
        load_transformer(tmp_path / "nowhere.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(HusaiError, match="plain.safetensors: format is None"):
        load_transformer(plain)


SMALL = ["--p", "37", "--frac", "0.7", "--lr", "3e-3", "--eval-every", "5", "--ckpt-every", "50"]


def test_small_modulus_groks_in_seconds_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run" / "model.safetensors"
    result = run_stage(*SMALL, "--epochs", "1500", "--extra-epochs", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr
    model, meta = load_transformer(out)
    log = [json.loads(line) for line in (out.parent / "log.jsonl").read_text().splitlines()]
    assert meta["metrics"]["test_acc"] >= 0.99 and meta["metrics"]["train_acc"] == 1.0
    assert meta["metrics"]["grokked_at_epoch"] is not None
    first_full_train = next(row["epoch"] for row in log if row["train_acc"] == 1.0)
    assert first_full_train <= meta["metrics"]["grokked_at_epoch"], "memorisation comes first"
    assert 1 <= len(meta["progress"]["key_frequencies"]) <= 5
    assert (out.parent / "curves.png").stat().st_size > 0 and (out.parent / "fourier.png").stat().st_size > 0
    assert (out.parent / "checkpoints" / "epoch000000.safetensors").is_file()
    early, _ = load_transformer(out, checkpoint=0)
    assert not torch.equal(early.W_E, model.W_E)

    again = run_stage(*SMALL, "--epochs", "10", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert load_transformer(out)[1]["metrics"] == meta["metrics"], "the earlier run is untouched"


def test_same_seed_same_weights_different_seed_different(tmp_path):
    weights = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name / "model.safetensors"
        result = run_stage(*SMALL, "--epochs", "30", "--ckpt-every", "0", "--seed", seed, "--out", str(out),
                           "--device", "cpu")
        assert result.returncode == 0, result.stderr
        weights[name] = load_tensors(out, FORMAT, VERSION)[0]
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["W_E"], weights["c"]["W_E"])


@pytest.mark.parametrize("args,message", [
    (["--p", "2"], "--p 2"),
    (["--frac", "1.0"], "--frac 1.0"),
    (["--frac", "0"], "--frac 0"),
    (["--op", "pow"], "invalid choice: 'pow'"),
    (["--out", "/proc/husai/model.safetensors"], "cannot write"),
    (["--epochs", "abc"], "invalid int value"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    defaults = {"--epochs": "1", "--out": str(tmp_path / "m.safetensors")}
    result = run_stage(*args, *[x for flag, value in defaults.items() if flag not in args for x in (flag, value)])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_request_without_gpu_is_refused(tmp_path):
    result = run_stage("--device", "cuda", "--out", str(tmp_path / "m.safetensors"))
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
