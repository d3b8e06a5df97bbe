"""Stage 2: train sparse autoencoders on the grokked transformer's activations, many seeds at once.

    python train_sae.py --arch topk --seed 42             # the main command: one TopK SAE
    python train_sae.py --arch topk --seeds 0 1 2 3 4     # five seeds as one batched ensemble
    python train_sae.py --acts my_acts.safetensors        # any [N, d] activations, from any model

Activations: the transformer from stage 1 (default runs/transformer/model.safetensors) run on all p^2
inputs, read at --hook at the `=` position; or an [N, d] tensor from --acts. Seeds share one data order
unless told otherwise, so only the initialisation differs between them. Outputs, one set per seed, in
runs/sae/<arch>-w<width>-<k or penalty>[-<variant>]/ (archetypal's variant: shared or per-seed centroids):
    seed<N>.safetensors             W_enc [d, m], W_dec [m, d], b_enc, b_dec (+ threshold), in raw
                                    activation units (archetypal: W_dec its built rows, not unit norm);
                                    metadata: config, metrics, provenance
    seed<N>.snapshots.safetensors   the weights at log-spaced steps from 0, with full-data FVU
    seed<N>.log.jsonl               training metrics every --log-every steps, then one line with the
                                    run's status and its wall-clock seconds (the only timing anywhere)
    last-good-seed<N>.safetensors   only when training diverged: the last weights that passed the check
One invocation's seed set is one run (sae_core.RunOutput): its files are written beside the folder and
moved into place together, so an interruption, a full disk or a second run on the same folder never
leaves a mix; --force with the same seed set replaces that run whole, and never touches the files of
another invocation's seeds in the folder. Every flag, the data and the memory estimate are checked
before any training. Every step checks that the loss is finite, that the batch FVU has not exploded and
that the updated weights are finite; at the first failure the run stops, keeps the last good weights in
last-good-seed<N>.safetensors (no seed<N>.safetensors) and exits with status 2. No file holds a
non-finite tensor, and the same command gives byte-identical SAE and snapshot files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_core import (ARCHITECTURES, MAX_SETTING, SAE_FORMAT, SAE_VERSION, SNAPSHOT_FORMAT, CliParser, HusaiError,
                      RunOutput, SAEConfig, SAETrainer, build_sae, check_activations, file_sha256,
                      memory_limit_bytes, non_finite_tensors, pick_device, reconstruction_metrics, run_cli,
                      sae_file_name, sae_reconstruct, save_tensors, snapshot_file_name, width_scaled_lr)
from train_transformer import activations_from, run_with_replacement

DEFAULT_TRANSFORMER = "runs/transformer/model.safetensors"
DEFAULT_SEED = 42
MAX_SEED = 2**63    # seeds and the data seed lie in [0, 2^63)
FLOAT32_MAX = torch.finfo(torch.float32).max   # Adam applies the learning rate to float32 weights


def flagged_settings() -> list:
    """The SAEConfig fields that are flags of this stage: all but those whose flag is "" (d_in comes from
    the data, width from --width or --expansion)."""
    return [f for f in fields(SAEConfig) if f.metadata["flag"] != ""]


def add_config_flags(parser: CliParser) -> None:
    """One flag per flagged SAEConfig field, its help from the field's metadata: `--name VALUE`, for a
    tuple `--name VALUE [VALUE ...]`, or for a switch `--name` / `--no-name`."""
    for f in flagged_settings():
        flag = f"--{f.metadata['flag'] or f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, dest=f.name, nargs="+", type=type(f.default[0]), default=f.default,
                                help=f.metadata["help"])
        else:   # allowed values are checked by SAEConfig itself, with its one-line errors
            choices = f.metadata["choices"]
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                                help=f.metadata["help"] + (f" ({', '.join(choices)})" if choices else ""))


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 2: train sparse autoencoders (several seeds at once).")
    add = parser.add_argument
    # what to train on
    add("--transformer", default=None, help=f"stage 1's model file (default: {DEFAULT_TRANSFORMER})")
    add("--checkpoint", type=int, default=None, help="train on this epoch's checkpoint instead of the final model")
    add("--hook", default=None, help="hook site, e.g. blocks.0.mlp_post (default: last block's resid_post)")
    add("--acts", default=None, help="train on an [N, d] float tensor from this safetensors file instead")
    # the SAE: its width, then every SAEConfig setting (architecture, sparsity, training tricks)
    add("--width", type=int, default=None, help="latents m (default: --expansion times d)")
    add("--expansion", type=float, default=4.0, help="width as a multiple of the activation dimension d")
    add_config_flags(parser)
    # seeds and data order
    add("--seed", type=int, default=None, help=f"one seed (default {DEFAULT_SEED}); or --seeds")
    add("--seeds", type=int, nargs="+", default=None, help="several seeds, trained together as one ensemble")
    add("--data-seed", type=int, default=0, help="seeds the order of training batches")
    add("--vary-data-order", action="store_true", help="give every seed its own data order")
    # optimisation
    add("--steps", type=int, default=1000, help="optimiser steps (chosen where FVU has plateaued; see README)")
    add("--batch-size", type=int, default=1024, help="activations per step")
    add("--lr", type=float, default=None, help="Adam learning rate (default: 2e-4 * (m / 2^14)^-0.5)")
    add("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    add("--decay-frac", type=float, default=0.2, help="final fraction of steps with linear decay to 0")
    add("--snapshots", type=int, default=12, help="log-spaced weight snapshots, step 0 included (at most steps + 1)")
    add("--log-every", type=int, default=25, help="write training metrics every N steps")
    # where and how
    add("--out", default=None, help="output folder (default: runs/sae/<arch>-w<width>-<k or penalty>[-<variant>])")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    add("--no-kernels", action="store_true", help="use the plain-torch path even on a GPU")
    add("--force", action="store_true", help="replace this seed set's earlier run in --out")
    return parser


# --------------------------------------------------------------------------------------------------
# Checks before any work


def validate(args) -> None:
    """Every flag that can be checked without the data: integers in range, numbers finite and in range,
    seeds distinct, and no contradictory flags. (The SAE settings are checked by SAEConfig, and the batch
    size, width and memory against the data, in main, still before any training.)"""
    counts = {"--steps": (args.steps, 1), "--batch-size": (args.batch_size, 1), "--snapshots": (args.snapshots, 2),
              "--log-every": (args.log_every, 1), "--warmup-steps": (args.warmup_steps, 0)}
    if args.width is not None:
        counts["--width"] = (args.width, 1)
    if args.checkpoint is not None:
        counts["--checkpoint"] = (args.checkpoint, 0)
    for flag, (value, low) in counts.items():
        if not low <= value <= MAX_SETTING:
            raise HusaiError(f"{flag} {value}: must be an integer in [{low}, {MAX_SETTING}]")
    if not (math.isfinite(args.expansion) and args.expansion > 0):
        raise HusaiError(f"--expansion {args.expansion}: must be a positive finite number")
    if args.lr is not None and not 0 < args.lr <= FLOAT32_MAX:
        raise HusaiError(f"--lr {args.lr}: must be a positive number float32 can hold (at most {FLOAT32_MAX:.3g}), "
                         f"or left out for the default")
    if not 0 <= args.decay_frac <= 1:
        raise HusaiError(f"--decay-frac {args.decay_frac}: must be a fraction in [0, 1]")
    if args.seed is not None and args.seeds is not None:
        raise HusaiError(f"--seed {args.seed} and --seeds {' '.join(map(str, args.seeds))}: give one or the other")
    seeds = seeds_of(args)
    for flag, values in (("--seeds" if args.seeds is not None else "--seed", seeds), ("--data-seed", [args.data_seed])):
        for value in values:
            if not 0 <= value < MAX_SEED:
                raise HusaiError(f"{flag} {value}: must be an integer in [0, 2^63)")
    if len(set(seeds)) != len(seeds):
        raise HusaiError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    if args.acts is not None:
        given = [flag for flag, value in (("--transformer", args.transformer), ("--hook", args.hook),
                                          ("--checkpoint", args.checkpoint)) if value is not None]
        if given:
            raise HusaiError(f"--acts and {given[0]}: --acts trains on the file's activations, so {given[0]} "
                             f"would be ignored; give one or the other")


def seeds_of(args) -> list[int]:
    return args.seeds if args.seeds is not None else [DEFAULT_SEED if args.seed is None else args.seed]


def memory_estimate(n: int, d: int, width: int, n_seeds: int, batch_size: int, n_snapshots: int) -> int:
    """Rough peak memory of a stage-2 run in bytes, from the sizes alone (nothing is allocated).

    Per seed, the parameters are 2 d m + 2 m + d floats, held seven times in training (weights,
    gradients, Adam's two moments, the trainer's two kept copies, an export) and n_snapshots times more
    for the snapshots kept until the end. A step holds about 6 [S, B, m] and 4 [S, B, d] floats for the
    backward pass (pre-activations, latents, the dense scatter, their gradients). The activations are
    held three times (float32 and the float64 copy of the data checks); evaluating a seed on all N rows
    takes about 3 N m floats (pre-activations, latents, masks). Peak = their sum + 0.5 GiB for Python
    and the libraries. Against the peak RSS of CPU runs on N = 12769, d = 128 (all four architectures,
    m 512-16384, 1-4 seeds, B 512-2048) this was 1.03-1.18 times the measured peak: it errs high."""
    params = 2 * d * width + 2 * width + d
    floats = (n_seeds * params * (7 + n_snapshots) + n_seeds * batch_size * (6 * width + 4 * d)
              + 3 * n * d + 3 * n * width)
    return 4 * floats + 2**29


def check_memory(need: int, device: torch.device, sizes: str) -> None:
    """Refuse a run whose memory estimate exceeds this machine's memory (or the GPU's), before training."""
    limits = {"memory": memory_limit_bytes()}
    if device.type == "cuda":
        limits["GPU memory"] = torch.cuda.get_device_properties(device).total_memory
    for what, have in limits.items():
        if need > have:
            raise HusaiError(f"{sizes} needs about {need / 2**30:.3g} GiB of {what}; this machine has "
                             f"{have / 2**30:.3g} GiB: choose a smaller --width, --batch-size, --snapshots or "
                             f"fewer seeds")


# --------------------------------------------------------------------------------------------------
# Training


def batch_order(n: int, batch_size: int, generator: torch.Generator):
    """An endless stream of batches of row indices: a fresh permutation of all n rows each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def data_streams(n: int, args, seeds: list[int]) -> list:
    """One batch stream shared by every seed, or with --vary-data-order one per seed, whose order depends
    only on (data seed, seed), not on the seeds trained beside it."""
    if not args.vary_data_order:
        return [batch_order(n, args.batch_size, torch.Generator().manual_seed(args.data_seed))]
    return [batch_order(n, args.batch_size, torch.Generator().manual_seed((args.data_seed * 1_000_003 + seed) % 2**64))
            for seed in seeds]


@dataclass
class Divergence:
    """Why training stopped early: the step whose check failed, and the steps behind the weights kept."""
    step: int
    reason: str
    good_steps: int


@dataclass
class Training:
    logs: dict[int, list[dict]]          # per seed, one row per logged step
    snapshots: dict[int, dict]           # per seed, step<T>.<tensor> -> weights
    snapshot_fvu: dict[int, list[float]]
    snapshot_steps: list[int]
    seconds: float
    divergence: Divergence | None


def train(sae, trainer: SAETrainer, acts: torch.Tensor, seeds: list[int], args, config: dict,
          n_snapshots: int) -> Training:
    """Run the trainer for --steps steps, taking snapshots (with full-data FVU) at log-spaced steps from 0
    and logging every --log-every steps; stop at the first step whose check fails (SAETrainer.step)."""
    from tqdm import tqdm
    steps = args.steps
    snapshot_steps = sorted({0, steps} | {round(t) for t in np.geomspace(1, steps, n_snapshots - 1)})
    streams = data_streams(len(acts), args, seeds)
    run = Training({seed: [] for seed in seeds}, {seed: {} for seed in seeds}, {seed: [] for seed in seeds},
                   snapshot_steps, 0.0, None)

    def take_snapshot(step: int) -> None:
        for s, seed in enumerate(seeds):
            tensors = sae.export(s)
            run.snapshots[seed].update({f"step{step}.{key}": value for key, value in tensors.items()})
            run.snapshot_fvu[seed].append(reconstruction_metrics(tensors, config, acts.cpu())["fvu"])

    start = time.time()
    with tqdm(range(steps), unit="step", mininterval=0.5) as bar:
        for step in bar:
            if step in snapshot_steps:
                take_snapshot(step)
            batch = torch.stack([acts[next(stream).to(acts.device)] for stream in streams])
            try:
                metrics = trainer.step(batch[0] if len(streams) == 1 else batch)
            except FloatingPointError as e:
                run.divergence = Divergence(step, str(e), trainer.good_steps)
                break
            if step % args.log_every == 0 or step == steps - 1:
                means = {key: value.mean().item() for key, value in metrics.items()}
                bar.set_postfix(loss=f"{means['loss']:.3g}", fvu=f"{means['fvu']:.4f}", l0=f"{means['l0']:.1f}",
                                dead=f"{means['dead']:.3f}")
                for s, seed in enumerate(seeds):
                    run.logs[seed].append({"step": step, **{key: round(value[s].item(), 6)
                                                             for key, value in metrics.items()}})
    if run.divergence is None:
        take_snapshot(steps)
    run.seconds = time.time() - start
    return run


# --------------------------------------------------------------------------------------------------
# Evaluation


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
    hook, and the loss recovered against zero- and mean-ablation (None where the ablation does not
    change the loss, so nothing can be recovered)."""
    ce_sae, acc_sae = spliced_loss(model, tokens, labels, hook, lambda a: sae_reconstruct(tensors, config, a))
    r = references

    def recovered(ce_ablated: float) -> float | None:
        return (ce_ablated - ce_sae) / (ce_ablated - r["ce_clean"]) if ce_ablated != r["ce_clean"] else None
    return dict(r, acc_sae=acc_sae, ce_sae=ce_sae, loss_recovered_zero=recovered(r["ce_zero"]),
                loss_recovered_mean=recovered(r["ce_mean"]))


def describe_seed(seed: int, metrics: dict, path: Path) -> str:
    line = f"seed {seed}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.1%}"
    if "acc_sae" in metrics:
        line += f", accuracy {metrics['acc_sae']:.4f} (clean {metrics['acc_clean']:.4f})"
        recovered = [f"{metrics[key]:.3f} vs {against}" for key, against in
                     (("loss_recovered_zero", "zero"), ("loss_recovered_mean", "mean")) if metrics[key] is not None]
        line += f", loss recovered {' / '.join(recovered)}" if recovered else ""
    return f"{line} -> {path}"


# --------------------------------------------------------------------------------------------------
# A run's files


def run_name(seeds: list[int]) -> str:
    """One invocation's name in its folder: its seed set, sorted ("seeds-0-1-2"); a long set is named by its
    range, size and a hash of the whole list. The same seed set is the same run (what --force replaces)."""
    listed = "-".join(map(str, sorted(seeds)))
    if len(listed) > 64:
        digest = hashlib.sha256(listed.encode()).hexdigest()[:12]
        listed = f"{min(seeds)}-to-{max(seeds)}-n{len(seeds)}-{digest}"
    return f"seeds-{listed}"


def log_file_name(seed: int) -> str:
    return f"seed{seed}.log.jsonl"


def last_good_file_name(seed: int) -> str:
    return f"last-good-seed{seed}.safetensors"


def run_entries(seeds: list[int]) -> list[str]:
    """Every file a run may write, seed by seed."""
    return [name(seed) for seed in seeds
            for name in (sae_file_name, snapshot_file_name, log_file_name, last_good_file_name)]


def overlap_advice(other: dict) -> str:
    """What to do when this run's seeds overlap another run's (RunOutput's advice)."""
    return (f"a run is one invocation's seed set, and this one shares seeds with {other['run']!r}: rerun exactly "
            f"that command with --force to replace it, give this run only seeds no other run in the folder has, "
            f"or choose another --out")


def checked(label: str, tensors: dict[str, torch.Tensor], metrics: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors, after checking that every one of them (and every metric) is finite: no file is ever
    written with a NaN or an infinity in it."""
    bad = non_finite_tensors(tensors)
    bad += [name for name, value in (metrics or {}).items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise HusaiError(f"{label}: {', '.join(bad)} not finite; nothing was saved")
    return tensors


def write_seed_files(run: RunOutput, seed: int, tensors: dict, metrics: dict, training: Training, config: dict,
                     provenance: dict) -> None:
    """A trained seed's SAE, snapshots and log, into the run's staging folder, every tensor checked finite."""
    save_tensors(run.path(sae_file_name(seed)), checked(f"seed {seed}", tensors, metrics), SAE_FORMAT, SAE_VERSION,
                 {"config": config, "metrics": metrics, "provenance": provenance})
    snapshot_fvu = {f"FVU at step {t}": v for t, v in zip(training.snapshot_steps, training.snapshot_fvu[seed])}
    save_tensors(run.path(snapshot_file_name(seed)), checked(f"seed {seed}'s snapshots", training.snapshots[seed],
                                                             snapshot_fvu),
                 SNAPSHOT_FORMAT, SAE_VERSION,
                 {"steps": training.snapshot_steps, "fvu": training.snapshot_fvu[seed], "config": config})
    write_log(run.path(log_file_name(seed)), training.logs[seed],
              {"status": "finished", "steps": config["steps"], "train_seconds": round(training.seconds, 1)})


def write_last_good(run: RunOutput, sae, seeds: list[int], training: Training, config: dict,
                    provenance: dict) -> None:
    """After a divergence: each seed's last good weights (the ensemble holds them again) and its log."""
    stop = training.divergence
    status = {"status": "diverged", "diverged_at_step": stop.step, "reason": stop.reason}
    for s, seed in enumerate(seeds):
        save_tensors(run.path(last_good_file_name(seed)), checked(f"seed {seed}'s last good weights", sae.export(s)),
                     SAE_FORMAT, SAE_VERSION, {"config": dict(config, seed=seed), "provenance": provenance,
                                               **status, "steps": stop.good_steps})
        write_log(run.path(log_file_name(seed)), training.logs[seed],
                  {**status, "good_steps": stop.good_steps, "train_seconds": round(training.seconds, 1)})


def write_log(path: Path, rows: list[dict], last: dict) -> None:
    """The training log: one JSON object per logged step, then the run's last line (status and seconds)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, last]))


# --------------------------------------------------------------------------------------------------


def main() -> None:
    args = build_parser().parse_args()
    validate(args)
    device = pick_device(args.device)
    seeds = seeds_of(args)

    # ---- activations, checked -------------------------------------------------------------------
    if args.acts:
        provenance = {"source": "acts", "acts": args.acts, "transformer": None, "transformer_sha256": None,
                      "hook": None, "position": None, "checkpoint": None}
    else:
        provenance = {"source": "transformer", "transformer": args.transformer or DEFAULT_TRANSFORMER,
                      "hook": args.hook, "position": "eq", "checkpoint": args.checkpoint, "acts": None,
                      "acts_sha256": None}
    acts, model, tokens, labels, hook = activations_from(provenance, device)
    if args.acts:
        provenance["acts_sha256"] = file_sha256(args.acts)
        check_activations(acts, f"--acts {args.acts}")
    else:
        provenance.update(hook=hook, transformer_sha256=file_sha256(provenance["transformer"]))
        check_activations(acts, f"the activations of {provenance['transformer']} at {hook}")
    n, d = acts.shape

    # ---- the ensemble's settings, its memory, and where it goes -----------------------------------
    width = args.width if args.width is not None else round(args.expansion * d)
    if not 1 <= width <= MAX_SETTING:
        raise HusaiError(f"--expansion {args.expansion} with d = {d}: width {width:.3g}; "
                         f"must lie in [1, {MAX_SETTING}]")
    cfg = SAEConfig(**{f.name: getattr(args, f.name) for f in flagged_settings()}, d_in=d, width=width)
    if args.batch_size > n:
        raise HusaiError(f"--batch-size {args.batch_size} is larger than the {n} activations")
    ARCHITECTURES[cfg.arch].check_data(cfg, n)
    n_snapshots = min(args.snapshots, args.steps + 1)
    check_memory(memory_estimate(n, d, width, len(seeds), args.batch_size, n_snapshots), device,
                 f"--width {width} (d = {d}, N = {n}) with {len(seeds)} seed(s), --batch-size {args.batch_size} "
                 f"and {n_snapshots} snapshots")
    lr = args.lr if args.lr is not None else width_scaled_lr(width)
    name = f"{cfg.arch}-w{width}-{cfg.folder_label}"
    if args.acts:
        name += f"-acts-{Path(args.acts).stem}"
    elif args.hook or args.checkpoint is not None:
        name += f"-{provenance['hook']}" + (f"-epoch{args.checkpoint}" if args.checkpoint is not None else "")
    out_dir = Path(args.out or Path("runs/sae") / name)
    config = dict(asdict(cfg), seed=None, data_seed=args.data_seed, vary_data_order=args.vary_data_order,
                  steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=args.warmup_steps,
                  decay_frac=args.decay_frac, kernels=not args.no_kernels, device=str(device),
                  torch=torch.__version__)

    with RunOutput(out_dir, run_name(seeds), run_entries(seeds), args.force, advice=overlap_advice) as run:
        torch.set_flush_denormal(True)   # tiny Adam moments as denormals slow a CPU step ~10x
        sae = build_sae(cfg, seeds).to(device)
        sae.init_from_data(acts)
        trainer = SAETrainer(sae, lr, args.steps, args.warmup_steps, round(args.decay_frac * args.steps),
                             use_kernels=not args.no_kernels)
        print(f"{len(seeds)} x {cfg.arch} SAE, d={d} -> m={width}, {cfg.sparsity_name}, lr {lr:.2e}, "
              f"{args.steps} steps of {args.batch_size} on {n} activations ({provenance['hook'] or args.acts}), "
              f"{device}")
        training = train(sae, trainer, acts, seeds, args, config, n_snapshots)

        if training.divergence:
            write_last_good(run, sae, seeds, training, config, provenance)
            run.commit()
            stop = training.divergence
            raise HusaiError(f"training diverged: {stop.reason}; the last good weights (after {stop.good_steps} "
                             f"steps) are in {out_dir}/last-good-seed<N>.safetensors and no seed<N>.safetensors was "
                             f"written; try a lower --lr")
        acts = acts.cpu()
        references = None
        if model is not None:
            model, tokens, labels = model.cpu(), tokens.cpu(), labels.cpu()
            references = ablation_references(model, tokens, labels, provenance["hook"], acts)
        lines = []
        for s, seed in enumerate(seeds):
            tensors, seed_config = sae.export(s), dict(config, seed=seed)
            metrics = reconstruction_metrics(tensors, seed_config, acts)
            if model is not None:
                metrics.update(downstream_metrics(references, model, tokens, labels, provenance["hook"], tensors,
                                                  seed_config))
            write_seed_files(run, seed, tensors, metrics, training, seed_config, provenance)
            lines.append(describe_seed(seed, metrics, run.final_path(sae_file_name(seed))))
        run.commit()
    print("\n".join(lines))
    print(f"trained {len(seeds)} seed(s) in {training.seconds:.1f} s")


if __name__ == "__main__":
    run_cli(main, unit_outputs=True)
