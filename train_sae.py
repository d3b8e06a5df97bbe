"""Stage 2: train sparse autoencoders on the grokked transformer's activations, many seeds at once.

    python train_sae.py --arch topk --seed 42             # the main command: one TopK SAE
    python train_sae.py --arch topk --seeds 0 1 2 3 4     # five seeds as one batched ensemble
    python train_sae.py --acts my_acts.safetensors        # any [N, d] activations, from any model
    python train_sae.py --acts my_shards/                 # a folder of shards, streamed from disk
    torchrun --nproc_per_node=2 train_sae.py --seeds 0 1 2 3   # the seeds shared out over 2 processes

Activations: the transformer from stage 1 (default runs/transformer/model.safetensors) run on all p^2
inputs, read at --hook at the `=` position; or an [N, d] tensor from --acts: one safetensors file or a
folder of shards (the format is described in sae_core.py, "activations streamed from disk"). A set of
at most 100k rows is read into memory, trained on and evaluated whole; a larger one is streamed through
a seeded shuffle buffer and evaluated on a held-out slice (--eval-rows). Seeds share one data order
unless told otherwise, so only the initialisation differs between them. Under torchrun each process
trains its share of the seeds and the first writes every file, as one process would have written it
(with --data-parallel each process trains every seed on its part of each batch instead).
Outputs, one set per seed, in runs/sae/<arch>-w<width>-<k or penalty>/:
    seed<N>.safetensors             W_enc [d, m], W_dec [m, d], b_enc, b_dec (+ threshold), in raw
                                    activation units; metadata: config, metrics, provenance
    seed<N>.snapshots.safetensors   the weights at log-spaced steps from 0, with full-data FVU
    seed<N>.log.jsonl               training metrics every --log-every steps
"""

from __future__ import annotations

import json
import time
import argparse
from dataclasses import asdict, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from sae_core import (EVAL_CHUNK_ROWS, SAE_FORMAT, SAE_VERSION, SMALL_ACTS_ROWS, SNAPSHOT_FORMAT, ActivationShards,
                      CliParser, DataParallel, HusaiError, SAEConfig, SAETrainer, atomic_write, build_sae,
                      evaluation_metrics, file_sha256, gather_on_rank0, held_out_rows, pick_device, prepare_output,
                      run_cli, sae_file_name, sae_reconstruct, save_tensors, shuffled_batches, snapshot_file_name,
                      start_ranks, stop_ranks, width_scaled_lr)
from train_transformer import activations_from, run_with_replacement


def flagged_settings() -> list:
    """The SAEConfig fields that are flags of this stage: all but those whose flag is "" (d_in comes from
    the data, width from --width or --expansion)."""
    return [f for f in fields(SAEConfig) if f.metadata["flag"] != ""]


def add_config_flags(parser: CliParser) -> None:
    """One flag per flagged SAEConfig field, its help from the field's metadata: `--name VALUE`, or for a
    switch `--name` / `--no-name`."""
    for f in flagged_settings():
        flag = f"--{f.metadata['flag'] or f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:   # allowed values are checked by SAEConfig itself, with its one-line errors
            choices = f.metadata["choices"]
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                                help=f.metadata["help"] + (f" ({', '.join(choices)})" if choices else ""))


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 2: train sparse autoencoders (several seeds at once).")
    add = parser.add_argument
    # what to train on
    add("--transformer", default="runs/transformer/model.safetensors", help="stage 1's model file")
    add("--checkpoint", type=int, default=None, help="train on this epoch's checkpoint instead of the final model")
    add("--hook", default=None, help="hook site, e.g. blocks.0.mlp_post (default: last block's resid_post)")
    add("--acts", default=None, help="train on [N, d] float activations instead: a safetensors file or a folder "
                                     "of shards (see sae_core.py for the format)")
    add("--eval-rows", type=int, default=None,
        help="--acts: the held-out slice (the set's last rows, never trained on) that FVU, L0, dead fraction and "
             f"the initial statistics are measured on (default: the whole set, also trained on, when it has at "
             f"most {SMALL_ACTS_ROWS} rows; else its last 10%%, at most {SMALL_ACTS_ROWS} rows)")
    add("--shuffle-buffer", type=int, default=2**17,
        help="--acts: rows mixed at a time when the training rows are more than this and are streamed from "
             "disk (each seed with its own --vary-data-order stream holds its own buffer)")
    # the SAE: its width, then every SAEConfig setting (architecture, sparsity, training tricks)
    add("--width", type=int, default=None, help="latents m (default: --expansion times d)")
    add("--expansion", type=float, default=4.0, help="width as a multiple of the activation dimension d")
    add_config_flags(parser)
    # seeds and data order
    add("--seed", type=int, default=42, help="one seed (ignored when --seeds is given)")
    add("--seeds", type=int, nargs="+", default=None, help="several seeds, trained together as one ensemble")
    add("--data-seed", type=int, default=0, help="seeds the order of training batches")
    add("--vary-data-order", action="store_true", help="give every seed its own data order")
    # optimisation
    add("--steps", type=int, default=1000, help="optimiser steps (chosen where FVU has plateaued; see README)")
    add("--batch-size", type=int, default=1024, help="activations per step")
    add("--lr", type=float, default=None, help="Adam learning rate (default: 2e-4 * (m / 2^14)^-0.5)")
    add("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    add("--decay-frac", type=float, default=0.2, help="final fraction of steps with linear decay to 0")
    add("--snapshots", type=int, default=12, help="log-spaced weight snapshots, step 0 included")
    add("--log-every", type=int, default=25, help="write training metrics every N steps")
    # where and how
    add("--out", default=None, help="output folder (default: runs/sae/<arch>-w<width>-<k or penalty>)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    add("--no-kernels", action="store_true", help="use the plain-torch path even on a GPU")
    add("--force", action="store_true", help="overwrite existing files for these seeds")
    add("--data-parallel", action="store_true",
        help="under torchrun: every process trains every seed on its 1/N of each batch, gradients averaged "
             "(deterministic for a fixed N; not bit-identical to one process), instead of sharing out the seeds")
    add("--dist-timeout", type=float, default=3600.0,
        help="under torchrun: seconds a process waits at a collective for the others (a dead process is "
             "noticed at once; this bounds the wait for a hung one, and for the slowest to finish its seeds)")
    return parser


def batch_order(n: int, batch_size: int, generator: torch.Generator):
    """An endless stream of batches of row indices: a fresh permutation of all n rows each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def merge_seeds(per_process: Iterable[dict]) -> dict:
    """One {seed: value} dict from every process's own."""
    return {seed: value for part in per_process for seed, value in part.items()}


def spliced_loss(model, tokens, labels, hook: str, replace) -> tuple[float, float]:
    """Cross-entropy and accuracy on all inputs with the `=`-position activation at hook replaced."""
    logits = run_with_replacement(model, tokens, hook, replace)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def ablation_references(model, tokens, labels, hook: str, acts: torch.Tensor) -> dict:
    """The seed-independent references: the clean model, and the hook zero- and mean-ablated."""
    ce_clean, acc_clean = spliced_loss(model, tokens, labels, hook, lambda a: a)
    ce_zero, _ = spliced_loss(model, tokens, labels, hook, torch.zeros_like)
    ce_mean, _ = spliced_loss(model, tokens, labels, hook, lambda a: acts.mean(dim=0).expand_as(a))
    return {"acc_clean": acc_clean, "ce_clean": ce_clean, "ce_zero": ce_zero, "ce_mean": ce_mean}


def downstream_metrics(references: dict, model, tokens, labels, hook: str, tensors: dict, config: dict) -> dict:
    """The transformer's accuracy and cross-entropy with the SAE's reconstruction spliced in at the
    hook, and the loss recovered against zero- and mean-ablation."""
    ce_sae, acc_sae = spliced_loss(model, tokens, labels, hook, lambda a: sae_reconstruct(tensors, config, a))
    r = references
    return dict(r, acc_sae=acc_sae, ce_sae=ce_sae,
                loss_recovered_zero=(r["ce_zero"] - ce_sae) / (r["ce_zero"] - r["ce_clean"]),
                loss_recovered_mean=(r["ce_mean"] - ce_sae) / (r["ce_mean"] - r["ce_clean"]))


def main() -> None:
    args = build_parser().parse_args()
    device = pick_device(args.device)
    torch.set_flush_denormal(True)   # tiny Adam moments as denormals slow a CPU step ~10x
    all_seeds = args.seeds if args.seeds is not None else [args.seed]
    if len(set(all_seeds)) != len(all_seeds):
        raise HusaiError(f"--seeds {' '.join(map(str, all_seeds))}: a seed is repeated")
    for flag in ("steps", "batch_size", "shuffle_buffer"):
        if getattr(args, flag) < 1:
            raise HusaiError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.eval_rows is not None and not args.acts:
        raise HusaiError("--eval-rows applies to --acts; with the transformer every input is evaluated")
    ranks, device = start_ranks(device, args.dist_timeout)
    data_parallel = args.data_parallel and ranks.world > 1
    if data_parallel and args.batch_size % ranks.world:
        raise HusaiError(f"--batch-size {args.batch_size}: --data-parallel needs a multiple of the "
                         f"{ranks.world} processes")
    if not data_parallel and len(all_seeds) < ranks.world:
        raise HusaiError(f"{len(all_seeds)} seed(s) for {ranks.world} processes: give each at least one seed "
                         f"(or train every seed in every process with --data-parallel)")
    # this process's seeds: a share of them (a seed trains the same in any ensemble), or all in data parallel
    seeds = all_seeds if data_parallel else all_seeds[ranks.rank::ranks.world]
    writes = ranks.rank == 0 or not data_parallel   # data parallel: only the first process's copy is kept

    # ---- activations -----------------------------------------------------------------------------
    if args.acts:
        provenance = {"source": "acts", "acts": args.acts, "transformer": None, "transformer_sha256": None,
                      "hook": None, "position": None, "checkpoint": None}
    else:
        provenance = {"source": "transformer", "transformer": args.transformer, "hook": args.hook, "position": "eq",
                      "checkpoint": args.checkpoint, "acts": None, "acts_sha256": None}
    if args.acts:   # read only the held-out slice, and the training rows too when they fit one shuffle buffer
        shards = ActivationShards(args.acts)
        n, d, model = shards.rows, shards.d, None
        eval_rows = held_out_rows(n, args.eval_rows)
        n_train = n if eval_rows == n else n - eval_rows
        eval_acts = shards.read(n - eval_rows, n).to(device)
        streamed = n_train > args.shuffle_buffer
        acts = eval_acts if n_train == n else None if streamed else shards.read(0, n_train).to(device)
        provenance.update(shards.provenance())
    else:
        acts, model, tokens, labels, hook = activations_from(provenance, device)
        provenance.update(hook=hook, transformer_sha256=file_sha256(args.transformer))
        (n, d), streamed = acts.shape, False
        eval_acts, eval_rows, n_train = acts, len(acts), len(acts)
    eval_chunk = None if n <= SMALL_ACTS_ROWS else EVAL_CHUNK_ROWS   # a small set is evaluated in one piece

    # ---- the ensemble and where it goes ----------------------------------------------------------
    width = args.width if args.width is not None else round(args.expansion * d)
    cfg = SAEConfig(**{f.name: getattr(args, f.name) for f in flagged_settings()}, d_in=d, width=width)
    if args.batch_size > n_train:
        raise HusaiError(f"--batch-size {args.batch_size} is larger than the {n_train} training activations"
                         + (f" ({eval_rows} of the {n} are held out: lower --eval-rows)" if n_train < n else ""))
    lr = args.lr if args.lr is not None else width_scaled_lr(width)
    name = f"{cfg.arch}-w{width}-{cfg.sparsity_name}"
    if args.acts:
        name += f"-acts-{Path(args.acts).stem}"
    elif args.hook or args.checkpoint is not None:
        name += f"-{provenance['hook']}" + (f"-epoch{args.checkpoint}" if args.checkpoint is not None else "")
    out_dir = Path(args.out or Path("runs/sae") / name)
    outputs = {seed: out_dir / sae_file_name(seed) for seed in all_seeds}
    for path in outputs.values():
        prepare_output(path, args.force)
    config = dict(asdict(cfg), seed=None, data_seed=args.data_seed, vary_data_order=args.vary_data_order,
                  steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=args.warmup_steps,
                  decay_frac=args.decay_frac, kernels=not args.no_kernels, device=str(device),
                  torch=torch.__version__, eval_rows=eval_rows,
                  shuffle_buffer=args.shuffle_buffer if streamed else None,
                  data_parallel_processes=ranks.world if data_parallel else None)

    sae = build_sae(cfg, seeds).to(device)
    sae.init_from_data(eval_acts)
    trainer = SAETrainer(sae, lr, args.steps, args.warmup_steps, round(args.decay_frac * args.steps),
                         use_kernels=not args.no_kernels)
    stepper = DataParallel(trainer, ranks) if data_parallel else trainer

    def batches(generator: torch.Generator):
        if streamed:
            return shuffled_batches(shards, n_train, args.batch_size, args.shuffle_buffer, generator)
        return (acts[rows.to(device)] for rows in batch_order(n_train, args.batch_size, generator))

    if args.vary_data_order:   # each seed's order depends only on (data seed, seed), not on its neighbours
        streams = [batches(torch.Generator().manual_seed(args.data_seed * 1_000_003 + seed)) for seed in seeds]
    else:
        streams = [batches(torch.Generator().manual_seed(args.data_seed))]
    snapshot_steps = sorted({0, args.steps} | {round(t) for t in np.geomspace(1, args.steps, max(2, args.snapshots) - 1)})
    snapshots = {seed: {} for seed in seeds}
    snapshot_fvu = {seed: [] for seed in seeds}

    def take_snapshot(step: int) -> None:
        for s, seed in enumerate(seeds):
            tensors = sae.export(s)
            snapshots[seed].update({f"step{step}.{key}": value for key, value in tensors.items()})
            snapshot_fvu[seed].append(evaluation_metrics(tensors, config, eval_acts.cpu(), eval_chunk)["fvu"])

    rank = f"process {ranks.rank + 1} of {ranks.world}: " if ranks.world > 1 else ""
    rank += f"data parallel, {args.batch_size // ranks.world} rows of each batch; " if data_parallel else ""
    held_out = f", {eval_rows} held out for evaluation" if n_train < n else ""
    stream = f", streamed through a {args.shuffle_buffer}-row shuffle buffer" if streamed else ""
    print(f"{rank}{len(seeds)} x {cfg.arch} SAE, d={d} -> m={width}, {cfg.sparsity_name}, lr {lr:.2e}, "
          f"{args.steps} steps of {args.batch_size} on {n} activations ({provenance['hook'] or args.acts}"
          f"{held_out}{stream}), {device}")

    # ---- training --------------------------------------------------------------------------------
    from tqdm import tqdm
    logs = {seed: [] for seed in seeds}
    start = time.time()
    with tqdm(range(args.steps), unit="step", mininterval=0.5, disable=ranks.rank != 0) as bar:
        for step in bar:
            if step in snapshot_steps and writes:
                take_snapshot(step)
            batch = torch.stack([next(stream).to(device) for stream in streams])
            try:
                metrics = stepper.step(batch[0] if len(streams) == 1 else batch)
            except FloatingPointError as e:
                for s, seed in enumerate(seeds):
                    save_tensors(out_dir / f"last-good-seed{seed}.safetensors", sae.export(s), SAE_FORMAT,
                                 SAE_VERSION, {"config": dict(config, seed=seed), "status": str(e)})
                raise HusaiError(f"training diverged: {e}; the last good weights are in "
                                 f"{out_dir}/last-good-seed*.safetensors; try a lower --lr")
            if step % args.log_every == 0 or step == args.steps - 1:
                means = {key: value.mean().item() for key, value in metrics.items()}
                bar.set_postfix(loss=f"{means['loss']:.3g}", fvu=f"{means['fvu']:.4f}", l0=f"{means['l0']:.1f}",
                                dead=f"{means['dead']:.3f}")
                for s, seed in enumerate(seeds):
                    logs[seed].append({"step": step, **{key: round(value[s].item(), 6) for key, value in metrics.items()}})
    if writes:
        take_snapshot(args.steps)
    seconds = time.time() - start

    # ---- every process's seeds, gathered on the first --------------------------------------------
    if data_parallel:
        stepper.check_replicas()
    trained = {seed: sae.export(s) for s, seed in enumerate(seeds)}
    results = (trained, snapshots, snapshot_fvu, logs, seconds)
    if data_parallel:   # every process holds the same SAEs (just checked): the first one's are the results
        parts = [results] if ranks.rank == 0 else None
    else:
        parts = gather_on_rank0(results, ranks)
    stop_ranks(ranks)
    if parts is None:
        return
    trained, snapshots, snapshot_fvu, logs = (merge_seeds(part[i] for part in parts) for i in range(4))
    seconds = max(part[4] for part in parts)

    # ---- evaluation on every input (or the held-out slice), and the files ------------------------
    acts = eval_acts.cpu()
    if model is not None:
        model, tokens, labels = model.cpu(), tokens.cpu(), labels.cpu()
        references = ablation_references(model, tokens, labels, provenance["hook"], acts)
    for seed in all_seeds:
        tensors = trained[seed]
        seed_config = dict(config, seed=seed)
        metrics = evaluation_metrics(tensors, seed_config, acts, eval_chunk)
        if model is not None:
            metrics.update(downstream_metrics(references, model, tokens, labels, provenance["hook"], tensors,
                                              seed_config))
        metrics["train_seconds"] = round(seconds, 1)
        save_tensors(outputs[seed], tensors, SAE_FORMAT, SAE_VERSION,
                     {"config": seed_config, "metrics": metrics, "provenance": provenance})
        save_tensors(out_dir / snapshot_file_name(seed), snapshots[seed], SNAPSHOT_FORMAT, SAE_VERSION,
                     {"steps": snapshot_steps, "fvu": snapshot_fvu[seed], "config": seed_config})
        log_text = "".join(json.dumps(row) + "\n" for row in logs[seed])
        atomic_write(out_dir / f"seed{seed}.log.jsonl", lambda tmp: tmp.write_text(log_text))
        downstream = (f", accuracy {metrics['acc_sae']:.4f} (clean {metrics['acc_clean']:.4f}), loss recovered "
                      f"{metrics['loss_recovered_zero']:.3f} vs zero / {metrics['loss_recovered_mean']:.3f} vs mean"
                      if model is not None else "")
        print(f"seed {seed}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.1%}"
              f"{downstream} -> {outputs[seed]}")
    processes = f" on {ranks.world} processes" if ranks.world > 1 else ""
    print(f"trained {len(all_seeds)} seed(s) in {seconds:.1f} s{processes}")


if __name__ == "__main__":
    run_cli(main)
