"""Beyond one file and one process: activation shards read through memory maps and a seeded shuffle
buffer, their extraction from a HUSAI transformer, and seeds shared out over torch.distributed ranks."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core import (ACTS_INDEX, ActivationShards, HusaiError, SAEConfig, SAETrainer, build_sae, evaluation_metrics,
                      held_out_rows, load_sae, reconstruction_metrics, shuffled_batches, write_activation_shards)
from test_analyze import write_transformer
from test_sae import planted_data

REPO = Path(__file__).resolve().parent.parent


def numbered_rows(n: int, d: int = 6) -> torch.Tensor:
    """[n, d] rows whose first column is the row's number, so a batch tells which rows it holds."""
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    rows[:, 0] = torch.arange(n, dtype=torch.float32)
    return rows


def write_shards(folder: Path, rows: torch.Tensor, sizes: list[int], dtype=torch.float32) -> Path:
    """A folder of shards of these sizes, without an index (any model's writer could make it)."""
    folder.mkdir(parents=True)
    for i, part in enumerate(rows.split(sizes)):
        save_file({"acts": part.to(dtype).contiguous()}, str(folder / f"acts-{i:05d}.safetensors"))
    return folder


def stage_env(threads: int = 1) -> dict:
    """The command lines on the plain-torch path with a fixed thread count (rounding depends on it)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return dict(env, OMP_NUM_THREADS=str(threads))


def run_stage(script: str, *args: str, launcher: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=REPO, env=stage_env(), timeout=300)


def tensors_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a stage-2 folder, by its path there (seed0/sae_weights.safetensors, ...)."""
    return {str(path.relative_to(folder)): load_file(str(path)) for path in sorted(folder.glob("*/*.safetensors"))
            if not path.parent.name.startswith(".")}


def log_without_timing(path: Path) -> list[dict]:
    """A training log's rows, its last line without train_seconds (the only timing a run writes)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[-1].pop("train_seconds")
    return rows


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so NaN equals the same NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.flatten().view(torch.uint8),
                                                                    b.flatten().view(torch.uint8))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert same_bytes(a[name][key], b[name][key]), f"{name}: {key}"


# ---- the shard reader ------------------------------------------------------------------------------


def test_a_folder_reads_as_the_rows_of_its_shards_in_order_across_boundaries(tmp_path):
    rows = numbered_rows(100)
    shards = ActivationShards(write_shards(tmp_path / "acts", rows, [30, 1, 45, 24]))
    assert (shards.rows, shards.d) == (100, 6)
    for a, b in [(0, 100), (29, 31), (30, 76), (99, 100), (5, 6)]:
        assert torch.equal(shards.read(a, b), rows[a:b]), (a, b)
    half = ActivationShards(write_shards(tmp_path / "half", rows, [50, 50], dtype=torch.bfloat16))
    assert half.read(40, 60).dtype == torch.float32
    assert torch.equal(half.read(40, 60), rows[40:60].bfloat16().float())


def test_the_writer_makes_shards_of_the_asked_size_with_an_index_the_reader_follows(tmp_path):
    rows = numbered_rows(1000)
    written = write_activation_shards(tmp_path / "acts", rows.split(333), rows_per_shard=256,
                                      source={"model": "test"}, force=False)
    assert written == (1000, 6)
    index = json.loads((tmp_path / "acts" / ACTS_INDEX).read_text())
    assert [entry["rows"] for entry in index["shards"]] == [256, 256, 256, 232] and index["source"] == {"model": "test"}
    assert torch.equal(ActivationShards(tmp_path / "acts").read(0, 1000), rows)
    with pytest.raises(HusaiError, match="already exists"):
        write_activation_shards(tmp_path / "acts", [rows], 256, {}, force=False)
    index["shards"] = index["shards"][::-1]          # the index, not the names, fixes the order
    (tmp_path / "acts" / ACTS_INDEX).write_text(json.dumps(index))
    assert torch.equal(ActivationShards(tmp_path / "acts").read(0, 232), rows[768:])


def test_bad_shard_sets_are_one_error_naming_the_file(tmp_path):
    cases = {"no shards": (tmp_path / "empty", "without .safetensors shards"),
             "widths": (write_shards(tmp_path / "widths", torch.zeros(10, 4), [5, 5]), "every shard needs the same d"),
             "index": (write_shards(tmp_path / "index", torch.zeros(10, 4), [5, 5]), "lists [5, 4] rows per shard")}
    (tmp_path / "empty").mkdir()
    save_file({"acts": torch.zeros(5, 3)}, str(tmp_path / "widths" / "acts-00001.safetensors"))
    (tmp_path / "index" / ACTS_INDEX).write_text(json.dumps(
        {"format": "husai.acts_shards", "version": 1, "shards": [{"file": "acts-00000.safetensors", "rows": 5},
                                                                 {"file": "acts-00001.safetensors", "rows": 4}]}))
    for name, (folder, message) in cases.items():
        with pytest.raises(HusaiError, match=re.escape(message)):
            ActivationShards(folder)
    nan = numbered_rows(20)
    nan[13, 2] = float("nan")
    shards = ActivationShards(write_shards(tmp_path / "nan", nan, [10, 10]))
    assert torch.equal(shards.read(0, 10), nan[:10]), "a shard is checked when it is read"
    with pytest.raises(HusaiError, match=r"acts-00001.safetensors: contains NaN or Inf values \(rows 0 to 4\)"):
        shards.read(10, 15)


def test_the_held_out_slice_is_the_whole_of_a_small_set_and_a_bounded_tail_of_a_large_one():
    assert held_out_rows(5000, None) == 5000 and held_out_rows(100_000, None) == 100_000
    assert held_out_rows(400_000, None) == 40_000 and held_out_rows(4_000_000, None) == 100_000
    assert held_out_rows(5000, 800) == 800 and held_out_rows(5000, 10**9) == 5000
    with pytest.raises(HusaiError, match="--eval-rows 0"):
        held_out_rows(5000, 0)


# ---- the shuffle buffer ----------------------------------------------------------------------------


def batch_rows(stream, batches: int) -> list[list[int]]:
    return [next(stream)[:, 0].long().tolist() for _ in range(batches)]


@pytest.mark.parametrize("sizes,rows,batch", [([300, 170, 512, 1, 217], 1200, 100), ([1200], 1200, 100),
                                              ([300, 170, 512, 1, 217], 1137, 64)])
def test_the_shuffle_buffer_covers_every_training_row_once_per_epoch_and_depends_only_on_its_seed(
        tmp_path, sizes, rows, batch):
    shards = ActivationShards(write_shards(tmp_path / "acts", numbered_rows(sum(sizes)), sizes))
    per_epoch = rows // batch

    def stream(seed):
        return shuffled_batches(shards, rows, batch, buffer_rows=256, generator=torch.Generator().manual_seed(seed))

    first = batch_rows(stream(7), 3 * per_epoch)
    assert first == batch_rows(stream(7), 3 * per_epoch), "the same seed gives the same batches"
    assert first != batch_rows(stream(8), 3 * per_epoch)
    epochs = [sum(first[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == per_epoch * batch, "no row twice in an epoch"
        assert set(seen) <= set(range(rows)), "held-out rows are never trained on"
        assert rows - len(seen) < batch, "only the last incomplete batch of an epoch is dropped"
    assert epochs[0] != epochs[1], "every epoch has its own order"
    spread = max(first[0]) - min(first[0])
    assert spread > 256, "a batch mixes rows from several places of the set, not one contiguous run"


def test_the_shuffle_buffer_holds_no_more_than_its_rows(tmp_path, monkeypatch):
    """Rows are read a block (a quarter of the buffer) at a time, and never more than a buffer's worth
    is held before batches are handed out."""
    shards = ActivationShards(write_shards(tmp_path / "acts", numbered_rows(4000), [1000] * 4))
    reads = []
    original = ActivationShards.read

    def counted(self, a, b):
        reads.append(b - a)
        return original(self, a, b)

    monkeypatch.setattr(ActivationShards, "read", counted)
    stream = shuffled_batches(shards, 4000, 50, buffer_rows=400, generator=torch.Generator().manual_seed(0))
    next(stream)
    assert max(reads) <= 100 and sum(reads) == 400


# ---- evaluation ------------------------------------------------------------------------------------


def test_evaluation_in_chunks_equals_evaluation_in_one_piece():
    acts, _ = planted_data(3000, 16, 32, active=2)
    cfg = SAEConfig(arch="topk", d_in=16, width=48, k=3)
    sae = build_sae(cfg, [0])
    sae.init_from_data(acts)
    trainer = SAETrainer(sae, lr=3e-3, steps=30, warmup_steps=1, decay_steps=5, use_kernels=False)
    for step in range(30):
        trainer.step(acts[step * 100:(step + 1) * 100])
    tensors, config = sae.export(0), {"arch": "topk", "k": 3}
    whole, chunked = reconstruction_metrics(tensors, config, acts), evaluation_metrics(tensors, config, acts, 512)
    assert chunked["l0"] == whole["l0"] and chunked["dead_frac"] == whole["dead_frac"]
    assert chunked["fvu"] == pytest.approx(whole["fvu"], rel=1e-6) and 0 < whole["fvu"] < 1
    assert evaluation_metrics(tensors, config, acts, None) == whole


# ---- train_sae.py on shards --------------------------------------------------------------------------

SMALL_RUN = ["--width", "32", "--k", "3", "--steps", "40", "--batch-size", "128", "--device", "cpu"]


def test_a_small_folder_trains_the_same_sae_as_one_file_of_its_rows_and_as_the_plain_loop(tmp_path):
    """Small sets are trained on in memory, whole, as before shards existed: a folder gives the SAE that
    one file of its rows gives, and both give what the plain training loop gives."""
    acts, _ = planted_data(2000, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    write_shards(tmp_path / "shards", acts, [700, 700, 600])
    for source in ("acts.safetensors", "shards"):
        result = run_stage("train_sae.py", "--acts", str(tmp_path / source), *SMALL_RUN, "--seeds", "0", "1",
                           "--out", str(tmp_path / f"out-{source}"))
        assert result.returncode == 0, result.stderr
    from_file, from_folder = tensors_of(tmp_path / "out-acts.safetensors"), tensors_of(tmp_path / "out-shards")
    assert_same_tensors(from_file, from_folder)

    import train_sae
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        sae = build_sae(SAEConfig(arch="topk", d_in=12, width=32, k=3), [0, 1])
        sae.init_from_data(acts)
        trainer = SAETrainer(sae, lr=train_sae.default_lr(sae.cfg), steps=40, warmup_steps=100, decay_steps=20,
                             use_kernels=False)
        order = train_sae.batch_order(2000, 128, torch.Generator().manual_seed(0))
        for _ in range(40):
            trainer.step(acts[next(order)])
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    for s, seed in enumerate([0, 1]):
        expected = sae.export(s)
        assert all(torch.equal(from_file[f"seed{seed}/sae_weights.safetensors"][key], expected[key]) for key in expected)
    _, meta = load_sae(tmp_path / "out-shards" / "seed1")
    assert meta["config"]["eval_rows"] == 2000 and meta["config"]["shuffle_buffer"] is None
    assert [shard["rows"] for shard in meta["provenance"]["acts_shards"]] == [700, 700, 600]


def test_a_large_set_is_streamed_and_evaluated_on_its_held_out_slice_reproducibly(tmp_path):
    acts, _ = planted_data(6000, 12, 24, active=2)
    write_shards(tmp_path / "shards", acts, [1000] * 6)
    args = ["--acts", str(tmp_path / "shards"), *SMALL_RUN, "--seeds", "3", "--shuffle-buffer", "512",
            "--eval-rows", "800"]
    for run in ("a", "b"):
        result = run_stage("train_sae.py", *args, "--out", str(tmp_path / run))
        assert result.returncode == 0, result.stderr
    assert "800 held out for evaluation, streamed through a 512-row shuffle buffer" in result.stdout
    assert_same_tensors(tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b"))
    tensors, meta = load_sae(tmp_path / "a" / "seed3")
    assert meta["config"]["eval_rows"] == 800 and meta["config"]["shuffle_buffer"] == 512
    held_out = reconstruction_metrics(tensors, meta["config"], acts[-800:])
    assert meta["metrics"]["fvu"] == pytest.approx(held_out["fvu"], rel=1e-5)
    assert meta["metrics"]["l0"] == held_out["l0"]
    too_many = run_stage("train_sae.py", *args[:-1], "5950", "--out", str(tmp_path / "c"))
    assert too_many.returncode == 2 and "lower --eval-rows" in too_many.stderr


def test_a_bad_shard_folder_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    folder = write_shards(tmp_path / "shards", torch.randn(300, 8), [100, 200])
    save_file({"acts": torch.randn(50, 9)}, str(folder / "acts-00002.safetensors"))
    result = run_stage("train_sae.py", "--acts", str(folder), *SMALL_RUN, "--out", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "acts-00002.safetensors: d = 9" in lines[0] and "every shard needs the same d" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_extracted_transformer_trains_the_same_sae_as_the_transformer_itself(tmp_path):
    model = write_transformer(tmp_path / "t" / "model.safetensors")
    result = run_stage("train_transformer.py", "--extract", str(model), "--hook", "blocks.0.resid_mid",
                       "--shards", str(tmp_path / "acts"), "--rows-per-shard", "50", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "acts" / ACTS_INDEX).read_text())
    assert [entry["rows"] for entry in index["shards"]] == [50, 50, 50, 19]        # p = 13: 169 inputs
    assert index["source"]["hook"] == "blocks.0.resid_mid" and index["source"]["transformer_sha256"]
    common = ["--width", "32", "--k", "3", "--steps", "20", "--batch-size", "64", "--device", "cpu", "--seeds", "5"]
    for name, source in (("direct", ["--transformer", str(model), "--hook", "blocks.0.resid_mid"]),
                         ("shards", ["--acts", str(tmp_path / "acts")])):
        result = run_stage("train_sae.py", *source, *common, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    direct, extracted = tensors_of(tmp_path / "direct"), tensors_of(tmp_path / "shards")
    assert_same_tensors(direct, extracted)
    again = run_stage("train_transformer.py", "--extract", str(model), "--shards", str(tmp_path / "acts"))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "already exists" in again.stderr


# ---- several processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    return ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]


def test_two_processes_write_the_same_files_as_one(tmp_path):
    acts, _ = planted_data(1500, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    args = ["--acts", str(tmp_path / "acts.safetensors"), *SMALL_RUN, "--seeds", "0", "1", "2"]
    one = run_stage("train_sae.py", *args, "--out", str(tmp_path / "one"))
    two = run_stage("train_sae.py", *args, "--out", str(tmp_path / "two"), launcher=torchrun(2))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "process 1 of 2: 2 x topk" in two.stdout and "process 2 of 2: 1 x topk" in two.stdout
    assert_same_tensors(tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two"))
    for seed in (0, 1, 2):
        assert (tmp_path / "one" / f"seed{seed}" / "cfg.json").read_bytes() == \
            (tmp_path / "two" / f"seed{seed}" / "cfg.json").read_bytes(), "config, metrics, provenance (no timing)"
        assert log_without_timing(tmp_path / "one" / f"seed{seed}" / "log.jsonl") == \
            log_without_timing(tmp_path / "two" / f"seed{seed}" / "log.jsonl")


def test_when_a_process_dies_the_other_stops_with_one_line_and_no_files(tmp_path):
    acts, _ = planted_data(1500, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    out = tmp_path / "out"
    command = [sys.executable, *torchrun(2), str(REPO / "train_sae.py"), "--acts", str(tmp_path / "acts.safetensors"),
               "--width", "32", "--k", "3", "--steps", "100000", "--batch-size", "128", "--device", "cpu",
               "--seeds", "0", "1", "--out", str(out)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=stage_env())
    try:
        ranks = []
        deadline = time.time() + 60
        while len(ranks) < 2 and time.time() < deadline:   # the two processes torchrun started
            time.sleep(0.5)
            children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
            ranks = [int(pid) for pid in children]
        assert len(ranks) == 2, "torchrun started two processes"
        time.sleep(8)                                      # both are training by now
        os.kill(ranks[1], signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]   # torchrun adds its own report
    assert len(ours) == 1 and "error: process" in ours[0] and "another process" in ours[0], stderr
    assert 'train_sae.py", line' not in stderr, "no traceback from the surviving process"
    assert not out.exists() or not list(out.glob("seed*")), "no file of the run was written"


def test_data_parallel_training_is_deterministic_and_matches_one_process_up_to_rounding(tmp_path):
    acts, _ = planted_data(1500, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    args = ["--acts", str(tmp_path / "acts.safetensors"), *SMALL_RUN, "--seeds", "0", "1"]
    one = run_stage("train_sae.py", *args, "--out", str(tmp_path / "one"))
    two = run_stage("train_sae.py", *args, "--data-parallel", "--out", str(tmp_path / "two"), launcher=torchrun(2))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "data parallel, 64 rows of each batch; 2 x topk" in two.stdout
    alone, shared = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two")
    for seed in (0, 1):
        a, b = alone[f"seed{seed}/sae_weights.safetensors"], shared[f"seed{seed}/sae_weights.safetensors"]
        for key in a:      # the mean of two half-batch gradients is the whole batch's, up to rounding
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    _, meta = load_sae(tmp_path / "two" / "seed0")
    assert meta["config"]["data_parallel_processes"] == 2


def diverge_in_one_part(rank: int, world: int, folder: str) -> None:
    """One of two data-parallel processes: four steps of a TopK SAE, where at step 2 only the second
    process's part of the batch is shifted far off the data (its FVU explodes, the first part's does not).
    Saves what the process saw: the step and reason it stopped at, and its weights afterwards."""
    import datetime
    import torch.distributed as dist
    from sae_core import DataParallel, Ranks
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    acts, _ = planted_data(512, 12, 24, active=2)
    sae = build_sae(SAEConfig(arch="topk", d_in=12, width=32, k=3), [0])
    sae.init_from_data(acts)
    stepper = DataParallel(SAETrainer(sae, lr=1e-3, steps=10, warmup_steps=1, decay_steps=1, use_kernels=False),
                           Ranks(rank, world))
    stopped = None
    for step in range(4):
        batch = acts[step * 64:(step + 1) * 64].clone()
        if step == 2:
            batch[32:] += 1e4
        try:
            stepper.step(batch)
        except FloatingPointError as e:
            stopped = (step, str(e))
            break
    torch.save({"stopped": stopped, "good_steps": stepper.trainer.good_steps, "state": sae.state_dict()},
               f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_divergence_in_one_processs_part_stops_every_process_at_the_same_step(tmp_path):
    torch.multiprocessing.spawn(diverge_in_one_part, args=(2, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert first["stopped"] is not None and first["stopped"] == second["stopped"], "both stop, at the same step"
    assert first["stopped"][0] == 2 and "batch FVU exploded at step 2" in first["stopped"][1]
    assert first["good_steps"] == second["good_steps"] == 1, "the weights whose own batch passed: after step 0"
    assert all(torch.equal(first["state"][name], second["state"][name]) for name in first["state"])


def test_data_parallel_keeps_every_processs_copy_the_same_and_repeats_bit_for_bit(tmp_path):
    """BatchTopK's running threshold and the dead-latent counters (256 latents, of which a 64-row part fires
    fewer than 192, and a short dead window: AuxK is on) are updated by every process from its own part
    and must stay the same in all of them; train_sae.py checks that they do before writing."""
    acts, _ = planted_data(1500, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    args = ["--acts", str(tmp_path / "acts.safetensors"), *SMALL_RUN, "--width", "256", "--arch", "batchtopk",
            "--dead-window", "256", "--seeds", "4", "--data-parallel"]
    for run in ("a", "b"):
        result = run_stage("train_sae.py", *args, "--out", str(tmp_path / run), launcher=torchrun(2))
        assert result.returncode == 0, result.stderr
    assert_same_tensors(tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b"))
    assert log_without_timing(tmp_path / "a" / "seed4" / "log.jsonl") == \
        log_without_timing(tmp_path / "b" / "seed4" / "log.jsonl")


def shard_latents_beside_one_process(rank: int, world: int, folder: str) -> None:
    """One of two processes holding half the latents of a TopK SAE (AuxK on: a third of the latents start
    dead), trained beside the whole SAE in one process on the same batches. Saves what the process saw:
    a tie merged across processes, the largest difference from the whole SAE after each step, and b_dec."""
    import datetime
    import torch.distributed as dist
    from sae_core import LatentShards, Ranks, ShardedTopKSAE, merged_topk
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    ranks = Ranks(rank, world)
    # process 0 holds latents 0-1, process 1 latents 2-3; latents 1 and 2 tie at 2.0
    values = torch.tensor([[1.0, 2.0]]) if rank == 0 else torch.tensor([[2.0, 0.5]])
    tie = [merged_topk(values, torch.tensor([[0, 1]]) + 2 * rank, k, ranks) for k in (1, 2)]
    acts, _ = planted_data(1500, 12, 24, active=2)
    cfg = SAEConfig(arch="topk", d_in=12, width=256, k=3, dead_window=256)
    whole, shard = build_sae(cfg, [1]), ShardedTopKSAE(cfg, [1], ranks)
    whole.init_from_data(acts)
    shard.init_from_data(acts)
    trainers = [SAETrainer(whole, 3e-2, 30, 5, 10, use_kernels=False),
                LatentShards(SAETrainer(shard, 3e-2, 30, 5, 10, use_kernels=False), ranks)]
    trainers[0].inputs_since_fired[:, ::3] = 256                    # every third latent starts dead
    trainers[1].trainer.inputs_since_fired[:, torch.arange(256)[shard.own_latents] % 3 == 0] = 256
    generator, differences, metrics = torch.Generator().manual_seed(0), [], []
    for step in range(30):
        batch = acts[torch.randperm(len(acts), generator=generator)[:128]]
        metrics.append([trainer.step(batch) for trainer in trainers])
        gathered, expected = shard.export(0), whole.export(0)
        if rank == 0:
            differences.append(max((gathered[key] - expected[key]).abs().max().item() for key in expected))
    torch.save({"tie": tie, "differences": differences, "metrics": metrics, "b_dec": shard.b_dec.detach()},
               f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_latent_shards_train_what_one_process_trains_up_to_rounding(tmp_path):
    torch.multiprocessing.spawn(shard_latents_beside_one_process, args=(2, str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    (values1, latents1, mine1), (values2, latents2, mine2) = first["tie"]
    assert latents1.tolist() == [[1]] and values1.tolist() == [[2.0]], "a tie goes to the lower latent"
    assert sorted(latents2.tolist()[0]) == [1, 2] and mine2.tolist() == [[False, True]]
    assert second["tie"][1][2].tolist() == [[True, False]], "each process keeps the selected latents it holds"
    assert torch.equal(first["b_dec"], second["b_dec"]), "b_dec takes the same step in every process"
    assert first["metrics"][0][0]["dead"].item() > 0.3, "AuxK is on from the first step"
    for alone, sharded in first["metrics"]:
        for key in ("loss", "fvu", "l0", "dead", "grad_norm"):
            torch.testing.assert_close(sharded[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)
    assert max(first["differences"]) < 1e-5, first["differences"]     # measured 8.6e-7


def test_latent_parallel_runs_repeat_bit_for_bit_and_match_one_process(tmp_path):
    acts, _ = planted_data(1500, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    args = ["--acts", str(tmp_path / "acts.safetensors"), *SMALL_RUN, "--seeds", "0", "1"]
    one = run_stage("train_sae.py", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    for run in ("a", "b"):
        result = run_stage("train_sae.py", *args, "--latent-parallel", "--out", str(tmp_path / run),
                           launcher=torchrun(2))
        assert result.returncode == 0, result.stderr
        assert "latents sharded, 16 of each SAE's; 2 x topk" in result.stdout
    assert_same_tensors(tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b"))
    alone, sharded = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "a")
    assert alone.keys() == sharded.keys()
    for name in alone:
        for key in alone[name]:
            torch.testing.assert_close(sharded[name][key], alone[name][key], rtol=0, atol=1e-6, msg=f"{name} {key}")
    _, meta = load_sae(tmp_path / "a" / "seed0")
    assert meta["config"]["latent_parallel_processes"] == 2


def test_latent_parallel_refuses_other_architectures_in_one_line(tmp_path):
    acts, _ = planted_data(300, 12, 24, active=2)
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    result = run_stage("train_sae.py", "--acts", str(tmp_path / "acts.safetensors"), *SMALL_RUN, "--arch", "relu",
                       "--latent-parallel", "--out", str(tmp_path / "out"), launcher=torchrun(2))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours and all("--latent-parallel trains --arch topk only (asked: relu)" in line for line in ours), result.stderr
    assert 'train_sae.py", line' not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("seed*"))
