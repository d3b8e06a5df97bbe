"""Stage 1: data without leakage, the Fourier tools, the hooked model, file I/O and the command line."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from einops import einsum
from safetensors.torch import save_file

from sae_core import (RUN_DIR, HusaiError, embedding_frequency_shares, fourier_basis, fourier_purity,
                      key_frequencies, load_tensors, memory_limit_bytes, run_cli, save_tensors)
from train_transformer import (FORMAT, VERSION, ModelConfig, Transformer, collect_activations, load_transformer,
                               main, make_dataset, memory_estimate, run_with_replacement, train_test_split)
from test_sae import leftovers, run_files

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
    log = [json.loads(line) for line in (out.parent / "model.log.jsonl").read_text().splitlines()]
    assert meta["metrics"]["test_acc"] >= 0.99 and meta["metrics"]["train_acc"] == 1.0
    assert meta["metrics"]["grokked_at_epoch"] is not None
    first_full_train = next(row["epoch"] for row in log if row["train_acc"] == 1.0)
    assert first_full_train <= meta["metrics"]["grokked_at_epoch"], "memorisation comes first"
    assert 1 <= len(meta["progress"]["key_frequencies"]) <= 5
    assert (out.parent / "model.curves.png").stat().st_size > 0 and (out.parent / "model.fourier.png").stat().st_size > 0
    assert (out.parent / "model.checkpoints" / "epoch000000.safetensors").is_file()
    early, _ = load_transformer(out, checkpoint=0)
    assert not torch.equal(early.W_E, model.W_E)

    again = run_stage(*SMALL, "--epochs", "10", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert load_transformer(out)[1]["metrics"] == meta["metrics"], "the earlier run is untouched"


def test_same_seed_same_weights_different_seed_different(tmp_path):
    weights = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name / "model.safetensors"
        result = run_stage(*SMALL, "--epochs", "5", "--ckpt-every", "0", "--seed", seed, "--out", str(out),
                           "--device", "cpu")
        assert result.returncode == 0, result.stderr
        weights[name] = load_tensors(out, FORMAT, VERSION)[0]
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not torch.equal(weights["a"]["W_E"], weights["c"]["W_E"])


def test_the_same_command_twice_writes_byte_identical_model_and_checkpoint_files(tmp_path):
    """Only the log holds wall-clock seconds; the model, checkpoints and figures are the same bytes (two
    processes: the safetensors library orders metadata keys differently in each)."""
    out = tmp_path / "model.safetensors"
    runs = []
    for _ in range(2):
        result = run_stage(*TINY, "--out", str(out), "--force")
        assert result.returncode == 0, result.stderr
        runs.append(run_files(tmp_path))
    assert sorted(runs[0]) == sorted(runs[1]) and "model.checkpoints/epoch000020.safetensors" in runs[0]
    assert {name for name in runs[0] if runs[0][name] != runs[1][name]} <= {"model.log.jsonl"}
    rows = [[json.loads(line) for line in run["model.log.jsonl"].decode().splitlines()] for run in runs]
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in log] for log in rows]
    assert without_seconds[0] == without_seconds[1]
    assert "seconds" not in json.dumps(load_tensors(out, FORMAT, VERSION)[1])


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


# ---- a run is one unit: flags, divergence, locks, --force, interruptions and full disks ------------


def all_finite(path: Path) -> bool:
    tensors, _ = load_tensors(path, FORMAT, VERSION)
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


TINY = ["--p", "23", "--epochs", "30", "--eval-every", "5", "--ckpt-every", "10", "--device", "cpu"]


@pytest.mark.parametrize("args,message", [
    (["--heads", "0"], "--heads 0: must be an integer in [1,"),
    (["--heads", "-4"], "--heads -4: must be an integer in [1,"),
    (["--d-model", "100", "--heads", "3"], "--d-model 100 is not divisible by --heads 3"),
    (["--layers", "0"], "--layers 0"),
    (["--p", "2"], "--p 2"),
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", str(2**31)], f"--epochs {2**31}: must be an integer in [1, {2**31 - 1}]"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--extra-epochs", "-1"], "--extra-epochs -1"),
    (["--ckpt-every", "-1"], "--ckpt-every -1"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616: must be an integer in [0, 2^63)"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 2^63)"),
    (["--lr", "0"], "--lr 0.0: must be a positive finite number"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--wd", "-1"], "--wd -1.0"),
    (["--wd", "inf"], "--wd inf"),
    (["--frac", "nan"], "--frac nan: must be a fraction in [0, 1]"),
    (["--frac", "1.5"], "--frac 1.5: must be a fraction in [0, 1]"),
    (["--frac", "0.0005"], "--frac 0.0005 with --p 23: 0 training and 529 held-out pairs"),
    (["--frac", "0.9999"], "--frac 0.9999 with --p 23: 529 training and 0 held-out pairs"),
    (["--target-acc", "nan"], "--target-acc nan"),
    (["--target-acc", "1.5"], "--target-acc 1.5"),
    (["--p", "100000"], "needs about 1.13e+07 GiB of memory"),
    (["--d-mlp", "1000000000"], "--d-mlp 1000000000 --layers 1 with 264 training pairs needs about"),
    (["--out", "."], "--out .: is a folder"),
])
def test_every_flag_is_checked_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "run" / "m.safetensors"
    monkeypatch.setattr(sys, "argv", ["train_transformer.py", "--p", "23", "--epochs", "1", "--out", str(out), *args])
    with pytest.raises(SystemExit) as stop:
        run_cli(main, unit_outputs=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists(), "refused before anything was created"


def test_the_memory_estimate_admits_the_default_model_and_grows_with_the_sizes():
    default = memory_estimate(ModelConfig(), round(0.5 * 113**2))
    assert 2**29 < default < 2**31, "the default run takes about 0.8 GB (measured peak RSS)"
    assert default < memory_limit_bytes()
    assert memory_estimate(ModelConfig(p=226), round(0.5 * 226**2)) > 3 * (default - 2**29)
    assert memory_estimate(ModelConfig(d_mlp=2048), round(0.5 * 113**2)) > default


def test_a_diverging_run_stops_names_the_epoch_and_saves_no_non_finite_tensor(tmp_path):
    out = tmp_path / "model.safetensors"
    result = run_stage(*TINY, "--ckpt-every", "1", "--lr", "1e6", "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: training diverged at epoch ") and "try a lower --lr" in lines[-1]
    assert not out.exists(), "nothing is saved under the run's model name"
    kept = tmp_path / "model.last-finite.safetensors"
    assert all_finite(kept)
    _, meta = load_tensors(kept, FORMAT, VERSION)
    assert meta["status"] == "diverged" and f"epoch {meta['diverged_at_epoch']}:" in lines[-1]
    checkpoints = sorted((tmp_path / "model.checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == meta["diverged_at_epoch"] and all(all_finite(c) for c in checkpoints)
    assert leftovers(tmp_path) == []


def test_a_second_run_on_the_same_folder_refuses_at_once_naming_the_first(tmp_path):
    first = subprocess.Popen([sys.executable, str(REPO / "train_transformer.py"), *TINY, "--epochs", "1000000",
                              "--extra-epochs", "1000000", "--ckpt-every", "0", "--out", str(tmp_path / "first.safetensors")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / RUN_DIR / "lock"
        deadline = time.time() + 60
        while not (lock.is_file() and str(first.pid) in lock.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        second = run_stage(*TINY, "--out", str(tmp_path / "second.safetensors"))
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert f"is in use by another run (pid {first.pid}, started " in second.stderr
        assert "first.safetensors" in second.stderr, "the message shows the other run's command"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
        assert first.stderr.read().strip().splitlines()[-1] == (
            f"interrupted: run 'first.safetensors' was not committed; nothing in {tmp_path} was changed")
    finally:
        first.kill()
    assert run_files(tmp_path) == {} and leftovers(tmp_path) == []


def test_force_replaces_only_this_runs_files_and_leaves_none_of_its_old_ones(tmp_path):
    first = tmp_path / "first.safetensors"
    assert run_stage(*TINY, "--out", str(first)).returncode == 0
    first_files = run_files(tmp_path)
    assert {"first.checkpoints/epoch000020.safetensors", "first.log.jsonl", "first.curves.png"} <= set(first_files)
    result = run_stage(*TINY, "--epochs", "12", "--out", str(tmp_path / "second.safetensors"), "--force")
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in run_files(tmp_path).items() if k.startswith("first")} == first_files

    again = run_stage(*TINY, "--out", str(first))
    assert again.returncode == 2 and "first.safetensors already exists" in again.stderr
    shorter = run_stage(*TINY, "--epochs", "12", "--out", str(first), "--force")
    assert shorter.returncode == 0, shorter.stderr
    assert sorted(p.name for p in (tmp_path / "first.checkpoints").iterdir()) == [
        "epoch000000.safetensors", "epoch000010.safetensors"], "no checkpoint of the longer run survives"
    assert json.loads((tmp_path / "first.log.jsonl").read_text().splitlines()[-1])["epoch"] == 11
    assert load_transformer(first)[1]["epoch"] == 11 and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed TINY run, model.safetensors and its files, made once and copied by each test."""
    folder = tmp_path_factory.mktemp("finished")
    result = run_stage(*TINY, "--out", str(folder / "model.safetensors"))
    assert result.returncode == 0, result.stderr
    return folder


def copy_of(finished_run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    return folder


def run_stage_with(patch: str, *args: str, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """Run stage 1 in a child that first executes `patch` (Python), optionally with a file size limit."""
    def limit():
        if limit_file_size:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))
    code = textwrap.dedent(patch) + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = {["train_transformer.py", *args]!r}
        runpy.run_path({str(REPO / "train_transformer.py")!r}, run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=limit, env=dict(os.environ, PYTHONPATH=str(REPO)))


WRITES_THEN = """
    import errno, os, pathlib
    written, write_bytes = [], pathlib.Path.write_bytes
    def patched(self, data):
        if written:
            {action}
        written.append(self)
        return write_bytes(self, data)
    pathlib.Path.write_bytes = patched
"""


def test_a_disk_full_during_a_forced_run_is_one_line_and_leaves_the_old_run_whole(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    out = folder / "model.safetensors"
    before = run_files(folder)
    full = run_stage_with(WRITES_THEN.format(action="raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))"),
                          *TINY, "--out", str(out), "--force")
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert lines[-1] == (f"error: cannot write {folder}/model.checkpoints/epoch000010.safetensors: No space left "
                         f"on device; run 'model.safetensors' was not committed and {folder} is unchanged")
    assert run_files(folder) == before and leftovers(folder) == []


def test_a_real_write_error_from_the_system_is_one_line_and_changes_nothing(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    out = folder / "model.safetensors"
    before = run_files(folder)
    limited = run_stage_with("", *TINY, "--out", str(out), "--force", limit_file_size=64 * 1024)
    lines = limited.stderr.strip().splitlines()
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert lines[-1] == (f"error: cannot write {folder}/model.checkpoints/epoch000000.safetensors: File too "
                         f"large; run 'model.safetensors' was not committed and {folder} is unchanged")
    assert run_files(folder) == before and leftovers(folder) == []


def test_a_run_killed_after_its_first_file_leaves_the_old_run_and_the_next_run_clears_it(finished_run, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    out = folder / "model.safetensors"
    before = run_files(folder)
    killed = run_stage_with(WRITES_THEN.format(action="os._exit(9)"), *TINY, "--out", str(out), "--force")
    assert killed.returncode == 9 and run_files(folder) == before
    assert any(name.startswith(f"{RUN_DIR}/staging-") for name in leftovers(folder))
    other = run_stage(*TINY, "--epochs", "5", "--out", str(folder / "other.safetensors"))
    assert other.returncode == 0 and "deleted the uncommitted files of an interrupted run" in other.stdout
    assert leftovers(folder) == []
    assert {k: v for k, v in run_files(folder).items() if not k.startswith("other")} == before


@pytest.mark.parametrize("edit,message", [
    (lambda raw: raw.update(config="{not json"), "metadata 'config' is not valid JSON"),
    (lambda raw: raw.update(config=json.dumps({"train": {}})), "metadata 'config' lacks the key 'model'"),
    (lambda raw: raw.update(config=json.dumps({"model": {"p": 23}})), "config.model lacks the key 'op'"),
    (lambda raw: raw.update(config=json.dumps({"model": dict(vars(ModelConfig(p=23)), n_heads=0)})),
     "config.model.n_heads 0: must be an integer"),
    (lambda raw: raw.update(config=json.dumps({"model": dict(vars(ModelConfig(p=23)), colour=1)})),
     "config.model has an unknown key 'colour'"),
    (lambda raw: raw.update(config=json.dumps({"model": vars(ModelConfig(p=29))})),
     "tensor W_E has shape [24, 128], the configuration needs [30, 128]"),
])
def test_a_model_file_with_a_bad_config_is_one_error_naming_the_file(tmp_path, edit, message):
    path = saved_model(tmp_path)
    tensors = load_tensors(path, FORMAT, VERSION)[0]
    raw = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    edit(raw)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=raw)
    with pytest.raises(HusaiError, match=f"bad.safetensors: .*{message}".replace("[", r"\[")):
        load_transformer(bad)
