"""Stage 2: train sparse autoencoders on the grokked transformer's activations, many seeds at once.

    python train_sae.py --arch topk --seed 42             # the main command: one TopK SAE
    python train_sae.py --arch topk --seeds 0 1 2 3 4     # five seeds as one batched ensemble
    python train_sae.py --acts my_acts.safetensors        # any [N, d] activations, from any model
    python train_sae.py --acts my_shards/                 # a folder of shards, streamed from disk
    torchrun --nproc_per_node=2 train_sae.py --seeds 0 1 2 3   # the seeds shared out over 2 processes
    python train_sae.py --arch topk relu --width 16 64 --k 4 16 --l1 1 3 --seeds 0 1 2 3 4   # a grid of cells
    python train_sae.py --grid study                      # a named grid (GRIDS below): the stability map's runs

A grid: --arch, --width (or --expansion) and each architecture's numbers and choices (k, l1, l0, delta,
centroids, ...) take several values; every valid cell of their cross product (a setting an architecture
lacks does not multiply its cells) is trained as a seed ensemble into its usual folder, one cell after
another, with files identical to training that cell alone. The activations are read once; every cell is
checked before the first trains, and one refused by its architecture (k > width) is skipped with a note.

Activations: the transformer from stage 1 (default runs/transformer/model.safetensors) run on all p^2
inputs, read at --hook at the `=` position; or [N, d] activations from --acts: one safetensors file or a
folder of shards (the format is described in sae_core.py, "activations streamed from disk"). A set of
at most 100k rows is read into memory, trained on and evaluated whole; a larger one is streamed through
a seeded shuffle buffer and evaluated on a held-out slice (--eval-rows). Seeds share one data order
unless told otherwise, so only the initialisation differs between them. Under torchrun each process
trains its share of the seeds and the first gathers them and writes every file, as one process would
have written it (with --data-parallel each process trains every seed on its part of each batch instead;
with --latent-parallel, TopK only, every seed on the whole batch with 1/N of each SAE's latents).
Outputs, one folder per seed, which SAELens loads as it is (SAE.load_from_disk), in
runs/sae/<arch>-w<width>-<k or penalty>[-<variant>][-varied-order]/ (archetypal's variant: shared or per-seed
centroids; -varied-order with --vary-data-order; --runs-dir replaces runs/sae):
    seed<N>/sae_weights.safetensors W_enc [d, m], W_dec [m, d], b_enc, b_dec (+ threshold), in raw
                                    activation units (archetypal: W_dec its built rows, not unit norm)
    seed<N>/cfg.json                SAELens's keys (architecture: standard for relu, topk for topk and
                                    archetypal, jumprelu for jumprelu, batchtopk and matryoshka, whose global
                                    threshold is the threshold tensor), and "husai": config, metrics, provenance
    seed<N>/snapshots.safetensors   the weights at log-spaced steps from 0, with FVU on the evaluation rows
    seed<N>/log.jsonl               training metrics every --log-every steps, then one line with the
                                    run's status and its wall-clock seconds (the only timing anywhere)
    last-good-seed<N>/              only when training diverged: the last weights that passed the check, as
                                    sae_weights.safetensors and cfg.json, and the log
One invocation's seed set is one run (sae_core.RunOutput): its files are written beside the folder and
moved into place together, so an interruption, a full disk or a second run on the same folder never
leaves a mix; --force with the same seed set replaces that run whole, and never touches the files of
another invocation's seeds in the folder. Every flag, the data and the memory estimate are checked
before any training. Every step checks that the loss is finite, that the batch FVU has not exploded and
that the updated weights are finite; at the first failure the run stops, keeps the last good weights in
last-good-seed<N>/ (no seed<N>/) and exits with status 2. No file holds a
non-finite tensor, and the same command gives byte-identical SAE and snapshot files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sae_core import (ARCHITECTURES, EVAL_CHUNK_ROWS, LOG_FILE, MAX_SETTING, SAE_VERSION, SMALL_ACTS_ROWS,
                      SNAPSHOT_FORMAT, SNAPSHOTS_FILE, ActivationShards, CliParser, DataParallel, HusaiError,
                      LatentShards, Ranks, ShardedTopKSAE,
                      RunOutput, SAEConfig, SAETrainer, build_sae, check_activations, evaluation_metrics, file_sha256,
                      gather_on_rank0, held_out_rows, check_memory, non_finite_tensors, pick_device, run_cli,
                      sae_file_name, sae_reconstruct, save_tensors, seed_folder_name, shuffled_batches,
                      snapshot_file_name, start_ranks, stop_ranks, default_lr, write_sae_folder)
from train_transformer import activations_from, run_with_replacement

DEFAULT_TRANSFORMER = "runs/transformer/model.safetensors"
DEFAULT_SEED = 42
MAX_SEED = 2**63    # seeds and the data seed lie in [0, 2^63)
TARGET_L0_TOLERANCE = 0.1    # a final L0 further than this fraction from --target-l0 is reported as a miss
FLOAT32_MAX = torch.finfo(torch.float32).max   # Adam applies the learning rate to float32 weights

# Named grids (--grid NAME). Each is a list of this stage's command lines, trained in one invocation as if
# each were given alone: a line's several values multiply into cells (grid_cells), and every cell goes into
# its usual folder. A grid's flags cannot also be given on the command line; the others (--acts, --device,
# --runs-dir, --force, ...) apply to every line. The cells, steps and seeds were chosen from cell times
# measured on the 2-core CPU (README, "The stability map"); 500 steps instead of the default 1000 keep the
# study inside its budget (TopK w512 k32 reaches FVU ~0.004 by then, against 0.0017 at 1000), and 5
# snapshots (steps 0, 1, 8, 63 and the last) instead of 12 keep the initialisation null while sparing the
# analysis most of its dynamics, which read every seed at every snapshot (half of a group's time at 12).
GRIDS = {
    # quick: the map's machinery end to end in under 5 minutes (about 2.5 measured on a busy CPU): TopK and
    # ReLU at two widths and two sparsities, 5 seeds, 300 steps (not converged: a smoke test, not a finding)
    "quick": (
        "--arch topk --width 16 64 --k 4 8 --seeds 0 1 2 3 4 --steps 300 --snapshots 5",
        "--arch relu --width 16 64 --l1 0.3 3 --l1-warmup-steps 150 --seeds 0 1 2 3 4 --steps 300 --snapshots 5",
    ),
    # study: the question's map, 5 seeds per cell. TopK over widths 8-1024 and k 1-64 (k > width skipped);
    # the other kinds over widths 16-256 at k 4 and 16; the penalty architectures steered to L0 4 and 16
    # (--target-l0, so that they sit at TopK's k); and two TopK cells again with every seed's own data order.
    "study": (
        "--arch topk --width 8 32 128 512 --k 1 4 16 64 --seeds 0 1 2 3 4 --steps 500 --snapshots 5",
        "--arch topk --width 1024 --k 4 32 --seeds 0 1 2 3 4 --steps 500 --snapshots 5",
        "--arch batchtopk matryoshka archetypal --centroids shared per-seed --width 16 64 256 --k 4 16 "
        "--seeds 0 1 2 3 4 --steps 500 --snapshots 5",
        "--arch relu jumprelu --width 16 64 256 --target-l0 4 16 --seeds 0 1 2 3 4 --steps 500 --snapshots 5",
        "--arch topk --width 32 128 --k 4 16 --vary-data-order --seeds 0 1 2 3 4 --steps 500 --snapshots 5",
    ),
}


def flagged_settings() -> list:
    """The SAEConfig fields that are flags of this stage: all but those whose flag is "" (d_in comes from
    the data, width from --width or --expansion)."""
    return [f for f in fields(SAEConfig) if f.metadata["flag"] != ""]


def flag_of(f) -> str:
    return f"--{f.metadata['flag'] or f.name.replace('_', '-')}"


def grid_settings() -> list[str]:
    """The settings that take several values, whose cross product is the grid: the architecture, and
    every architecture's own number or choice (k, l1, l0, delta, centroids, ...; not its switches or lists)."""
    own = {name for cls in ARCHITECTURES.values() for name in cls.settings}
    return [f.name for f in flagged_settings()
            if f.name == "arch" or (f.name in own and not isinstance(f.default, (bool, tuple)))]


def add_config_flags(parser: CliParser) -> None:
    """One flag per flagged SAEConfig field, its help from the field's metadata: `--name VALUE`, for a
    tuple `--name VALUE [VALUE ...]`, for a switch `--name` / `--no-name`, and for a grid setting
    `--name VALUE [VALUE ...]`, each value a cell of the grid."""
    grid = grid_settings()
    for f in flagged_settings():
        if isinstance(f.default, bool):
            parser.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag_of(f), dest=f.name, nargs="+", type=type(f.default[0]), default=f.default,
                                help=f.metadata["help"])
        else:   # allowed values are checked by SAEConfig itself, with its one-line errors
            choices = f.metadata["choices"]
            parser.add_argument(flag_of(f), dest=f.name, type=type(f.default), default=f.default,
                                nargs="+" if f.name in grid else None,
                                help=f.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
                                + ("; several values: one grid cell each" if f.name in grid else ""))


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 2: train sparse autoencoders (several seeds at once).")
    add = parser.add_argument
    # what to train on
    add("--transformer", default=None, help=f"stage 1's model file (default: {DEFAULT_TRANSFORMER})")
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
    add("--width", type=int, nargs="+", default=None, help="latents m (default: --expansion times d); several "
                                                           "values: one grid cell each")
    add("--expansion", type=float, nargs="+", default=[4.0], help="width as a multiple of the activation dimension d")
    add_config_flags(parser)
    add("--grid", choices=sorted(GRIDS), default=None,
        help="train a named grid (GRIDS at the top of this file: its command lines, one invocation); the flags it "
             "sets cannot be given too")
    # seeds and data order
    add("--seed", type=int, default=None, help=f"one seed (default {DEFAULT_SEED}); or --seeds")
    add("--seeds", type=int, nargs="+", default=None, help="several seeds, trained together as one ensemble")
    add("--data-seed", type=int, default=0, help="seeds the order of training batches")
    add("--vary-data-order", action="store_true",
        help="give every seed its own data order, seeded by (--data-seed, seed) apart from its initialisation "
             "(its own folder: <name>-varied-order)")
    # optimisation
    add("--steps", type=int, default=1000, help="optimiser steps (chosen where FVU has plateaued; see README)")
    add("--batch-size", type=int, default=1024, help="activations per step")
    add("--lr", type=float, default=None, help="Adam learning rate (default: 8 * 2e-4 * (m / 2^14)^-0.5)")
    add("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    add("--decay-frac", type=float, default=0.5, help="final fraction of steps with linear decay to 0")
    add("--snapshots", type=int, default=12, help="log-spaced weight snapshots, step 0 included (at most steps + 1)")
    add("--log-every", type=int, default=25, help="write training metrics every N steps")
    # where and how
    add("--out", default=None, help="output folder of one configuration (default: "
                                    "<--runs-dir>/<arch>-w<width>-<k or penalty>[-<variant>][-varied-order])")
    add("--runs-dir", default="runs/sae", help="where each configuration's folder goes (a grid's cells: one each)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    add("--no-kernels", action="store_true", help="use the plain-torch path even on a GPU")
    add("--force", action="store_true", help="replace this seed set's earlier run in --out")
    add("--data-parallel", action="store_true",
        help="under torchrun: every process trains every seed on its 1/N of each batch, gradients averaged "
             "(deterministic for a fixed N; not bit-identical to one process), instead of sharing out the seeds")
    add("--latent-parallel", action="store_true",
        help="under torchrun, --arch topk: each process holds 1/N of every seed's latents (the width a multiple of "
             "N), top-k candidates merged across processes (deterministic for a fixed N; one process's result up "
             "to rounding)")
    add("--dist-timeout", type=float, default=3600.0,
        help="under torchrun: seconds a process waits at a collective for the others (a dead process is "
             "noticed at once; this bounds the wait for a hung one, and for the slowest to finish its seeds)")
    return parser


# --------------------------------------------------------------------------------------------------
# Checks before any work


def validate(args) -> None:
    """Every flag that can be checked without the data: integers in range, numbers finite and in range,
    seeds distinct, and no contradictory flags. (The SAE settings are checked by SAEConfig, and the batch
    size, width and memory against the data, in main, still before any training.)"""
    counts = {"--steps": (args.steps, 1), "--batch-size": (args.batch_size, 1), "--snapshots": (args.snapshots, 2),
              "--log-every": (args.log_every, 1), "--warmup-steps": (args.warmup_steps, 0),
              "--shuffle-buffer": (args.shuffle_buffer, 1)}
    counts |= {f"--width {i}": (width, 1) for i, width in enumerate(args.width or [])}
    if args.checkpoint is not None:
        counts["--checkpoint"] = (args.checkpoint, 0)
    if args.eval_rows is not None:
        counts["--eval-rows"] = (args.eval_rows, 1)
    for flag, (value, low) in counts.items():
        if not low <= value <= MAX_SETTING:
            raise HusaiError(f"{flag.split()[0]} {value}: must be an integer in [{low}, {MAX_SETTING}]")
    for expansion in args.expansion:
        if not (math.isfinite(expansion) and expansion > 0):
            raise HusaiError(f"--expansion {expansion}: must be a positive finite number")
    if args.lr is not None and not 0 < args.lr <= FLOAT32_MAX:
        raise HusaiError(f"--lr {args.lr}: must be a positive number float32 can hold (at most {FLOAT32_MAX:.3g}), "
                         f"or left out for the default")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise HusaiError(f"--dist-timeout {args.dist_timeout}: must be a positive finite number of seconds")
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
    elif args.eval_rows is not None:
        raise HusaiError("--eval-rows applies to --acts; with the transformer every input is evaluated")
    if args.data_parallel and args.latent_parallel:
        raise HusaiError("--data-parallel and --latent-parallel: choose one way to share the work out")


def seeds_of(args) -> list[int]:
    return args.seeds if args.seeds is not None else [DEFAULT_SEED if args.seed is None else args.seed]


UNSET = object()


def given_settings(parser: CliParser, argv: list[str]) -> set[str]:
    """The settings (argparse dests) that a command line gives, even where it gives their default."""
    blank = argparse.Namespace(**{action.dest: UNSET for action in parser._actions})
    return {dest for dest, value in vars(parser.parse_args(argv, blank)).items() if value is not UNSET}


def command_lines(parser: CliParser, argv: list[str]) -> list[argparse.Namespace]:
    """The settings of each command line this invocation trains, each checked by validate: the one given,
    or with --grid NAME the given one with each line of GRIDS[NAME] added (a flag both give is refused)."""
    args = parser.parse_args(argv)
    lines = [shlex.split(line) for line in GRIDS[args.grid]] if args.grid else [[]]
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    given = given_settings(parser, argv)
    runs = []
    for line in lines:
        both = sorted(given & given_settings(parser, line))
        if both:
            raise HusaiError(f"--grid {args.grid} sets {flags[both[0]]} itself: leave it out (GRIDS in train_sae.py "
                             f"lists each grid's flags), or give a grid of your own with several values per flag")
        runs.append(parser.parse_args(argv + line))
        validate(runs[-1])
    return runs


def setting_values(args, name: str) -> list:
    """A setting's values, each once, in the order given (one value for a setting given once)."""
    value = getattr(args, name)
    return list(dict.fromkeys(value if isinstance(value, list) else [value]))


def widths_of(args, d: int) -> list[int]:
    """--width's values, or each --expansion times d, rounded; each once."""
    if args.width is not None:
        return list(dict.fromkeys(args.width))
    widths = []
    for expansion in args.expansion:
        width = round(expansion * d)
        if not 1 <= width <= MAX_SETTING:
            raise HusaiError(f"--expansion {expansion} with d = {d}: width {width:.3g}; must lie in [1, {MAX_SETTING}]")
        widths.append(width)
    return list(dict.fromkeys(widths))


def grid_cells(args, d: int, eval_rows: int) -> list[SAEConfig]:
    """The configurations one command line trains: per architecture and width, the cross product of the
    values of the grid settings that architecture has. A setting it does not have neither multiplies its
    cells nor enters its files (it keeps its default), so a cell's files are the same whichever grid it was
    trained in. A cell its architecture refuses (k > width, Matryoshka prefixes without a latent, more
    archetypal centroids than rows) is skipped with a note; no cell left, or a value no cell can use, is an
    error (for one cell, its own error, as a single run has always given)."""
    fixed = {f.name: getattr(args, f.name) for f in flagged_settings() if f.name not in grid_settings()}
    cells, accepted, refused = [], [], []
    for arch in setting_values(args, "arch"):
        own = [name for name in grid_settings() if name in getattr(ARCHITECTURES.get(arch), "settings", ())]
        for width in widths_of(args, d):
            for values in itertools.product(*(setting_values(args, name) for name in own)):
                chosen = {"arch": arch, "width": width, **dict(zip(own, values))}
                try:
                    cfg = SAEConfig(**fixed, **chosen, d_in=d)
                    ARCHITECTURES[arch].check_data(cfg, eval_rows)
                    cells.append(cfg)
                    accepted.append(chosen)
                except HusaiError as e:
                    refused.append((chosen, str(e)))
    if not cells:
        raise HusaiError(refused[0][1])
    used = {item for chosen in accepted for item in chosen.items()}    # as given: 0 may stand for a default
    flags = {"width": "--width"} | {f.name: flag_of(f) for f in flagged_settings()}
    for chosen, reason in refused:
        unused = [(name, value) for name, value in chosen.items() if (name, value) not in used]
        if unused:
            name, value = unused[0]
            raise HusaiError(f"{flags[name]} {value}: no cell of the grid can use it ({reason})")
        shown = [name for name in chosen if name in ("arch", "width") or len(setting_values(args, name)) > 1]
        print(f"note: skipped {', '.join(f'{name} {chosen[name]}' for name in shown)}: {reason}")
    return cells


def memory_estimate(n: int, d: int, width: int, n_seeds: int, batch_size: int, n_snapshots: int,
                    evaluated_at_once: int | None = None) -> int:
    """Rough peak memory of a stage-2 run in bytes, from the sizes alone (nothing is allocated). n is the
    number of activation rows held in memory (a streamed set: its evaluation slice and shuffle buffers),
    evaluated_at_once the rows evaluated in one piece (default n; a large slice goes in chunks).

    Per seed, the parameters are 2 d m + 2 m + d floats, held seven times in training (weights,
    gradients, Adam's two moments, the trainer's two kept copies, an export) and n_snapshots times more
    for the snapshots kept until the end. A step holds about 6 [S, B, m] and 4 [S, B, d] floats for the
    backward pass (pre-activations, latents, the dense scatter, their gradients). The activations are
    held three times (float32 and the float64 copy of the data checks); evaluating a seed on N rows at once
    takes about 3 N m floats (pre-activations, latents, masks). Peak = their sum + 0.5 GiB for Python
    and the libraries. Against the peak RSS of CPU runs on N = 12769, d = 128 (all four architectures,
    m 512-16384, 1-4 seeds, B 512-2048) this was 1.03-1.18 times the measured peak: it errs high."""
    params = 2 * d * width + 2 * width + d
    floats = (n_seeds * params * (7 + n_snapshots) + n_seeds * batch_size * (6 * width + 4 * d)
              + 3 * n * d + 3 * (n if evaluated_at_once is None else evaluated_at_once) * width)
    return 4 * floats + 2**29


# --------------------------------------------------------------------------------------------------
# The activations


@dataclass
class TrainingData:
    """The activations of a run: the rows it trains on, in memory or streamed from shards, and the rows
    it is evaluated on (FVU, L0, dead fraction, the initial statistics). A small set is one tensor,
    trained on and evaluated whole; a large --acts set keeps only its held-out last rows in memory."""
    provenance: dict
    rows: int                           # N, the whole set
    d: int
    eval_acts: torch.Tensor             # [eval_rows, d] on the training device
    train_rows: int                     # the first train_rows rows are trained on (all N for a small set)
    train_acts: torch.Tensor | None     # [train_rows, d] on the device, or None when streamed from shards
    shards: ActivationShards | None
    model: object = None                # the transformer and its inputs (None for --acts)
    tokens: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def streamed(self) -> bool:
        return self.train_acts is None

    @property
    def eval_chunk(self) -> int | None:
        """Rows evaluated at a time: a small set in one piece (exactly as before shards existed)."""
        return None if self.rows <= SMALL_ACTS_ROWS else EVAL_CHUNK_ROWS


def read_activations(args, device: torch.device) -> TrainingData:
    """The transformer's activations at --hook on every input, or --acts (one file or a folder of
    shards) read by row range: the held-out slice, and the training rows too when they fit one shuffle
    buffer. Every row held in memory is checked (check_activations); streamed rows are checked finite as
    they are read."""
    if not args.acts:
        provenance = {"source": "transformer", "transformer": args.transformer or DEFAULT_TRANSFORMER,
                      "hook": args.hook, "position": "eq", "checkpoint": args.checkpoint, "acts": None,
                      "acts_sha256": None}
        acts, model, tokens, labels, hook = activations_from(provenance, device)
        provenance.update(hook=hook, transformer_sha256=file_sha256(provenance["transformer"]))
        check_activations(acts, f"the activations of {provenance['transformer']} at {hook}")
        return TrainingData(provenance, len(acts), acts.shape[1], acts, len(acts), acts, None, model, tokens, labels)
    provenance = {"source": "acts", "acts": args.acts, "transformer": None, "transformer_sha256": None,
                  "hook": None, "position": None, "checkpoint": None}
    shards = ActivationShards(args.acts)
    n = shards.rows
    eval_rows = held_out_rows(n, args.eval_rows)
    train_rows = n if eval_rows == n else n - eval_rows
    eval_acts = shards.read(n - eval_rows, n).to(device)
    if train_rows == n:
        train_acts = eval_acts
    else:
        train_acts = None if train_rows > args.shuffle_buffer else shards.read(0, train_rows).to(device)
    for what, acts in (("", eval_acts), (" (training rows)", train_acts)):
        if acts is not None:
            check_activations(acts, f"--acts {args.acts}{what}")
    provenance.update(shards.provenance())
    return TrainingData(provenance, n, shards.d, eval_acts, train_rows, train_acts, shards)


# --------------------------------------------------------------------------------------------------
# Training


def batch_order(n: int, batch_size: int, generator: torch.Generator):
    """An endless stream of batches of row indices: a fresh permutation of all n rows each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def batches(data: TrainingData, batch_size: int, buffer_rows: int, generator: torch.Generator):
    """An endless stream of training batches [batch_size, d] on the data's device: rows of the tensor in
    memory in batch_order, or rows streamed from the shards through a shuffle buffer."""
    device = data.eval_acts.device
    if data.streamed:
        return (batch.to(device) for batch in shuffled_batches(data.shards, data.train_rows, batch_size,
                                                              buffer_rows, generator))
    return (data.train_acts[rows.to(device)] for rows in batch_order(data.train_rows, batch_size, generator))


def data_streams(data: TrainingData, args, seeds: list[int]) -> list:
    """One batch stream shared by every seed, or with --vary-data-order one per seed, whose order depends
    only on (data seed, seed), not on the seeds trained beside it (nor on the process training it)."""
    def stream(seed: int):
        return batches(data, args.batch_size, args.shuffle_buffer, torch.Generator().manual_seed(seed))
    if not args.vary_data_order:
        return [stream(args.data_seed)]
    return [stream((args.data_seed * 1_000_003 + seed) % 2**64) for seed in seeds]


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


def train(sae, trainer: SAETrainer | DataParallel, data: TrainingData, seeds: list[int], args, config: dict,
          n_snapshots: int, ranks: Ranks, snapshots: bool = True, label: str | None = None) -> Training:
    """Run the trainer (or its data-parallel wrapper) for --steps steps, taking snapshots (with FVU on the
    evaluation rows) at log-spaced steps from 0 unless told not to, and logging every --log-every steps;
    stop at the first step whose check fails (SAETrainer.step). Only the first process shows progress,
    after `label` (a grid's cell)."""
    from tqdm import tqdm
    steps = args.steps
    snapshot_steps = sorted({0, steps} | {round(t) for t in np.geomspace(1, steps, n_snapshots - 1)})
    streams = data_streams(data, args, seeds)
    eval_acts = data.eval_acts.cpu()
    run = Training({seed: [] for seed in seeds}, {seed: {} for seed in seeds}, {seed: [] for seed in seeds},
                   snapshot_steps, 0.0, None)

    def take_snapshot(step: int) -> None:
        for s, seed in enumerate(seeds):
            tensors = sae.export(s)
            if tensors is None:       # latents sharded: the whole SAE is gathered on the first process only
                continue
            run.snapshots[seed].update({f"step{step}.{key}": value for key, value in tensors.items()})
            run.snapshot_fvu[seed].append(evaluation_metrics(tensors, config, eval_acts, data.eval_chunk)["fvu"])

    start = time.time()
    with tqdm(range(steps), desc=label, unit="step", mininterval=0.5, disable=ranks.rank != 0) as bar:
        for step in bar:
            if step in snapshot_steps and snapshots:
                take_snapshot(step)
            batch = torch.stack([next(stream) for stream in streams])
            try:
                metrics = trainer.step(batch[0] if len(streams) == 1 else batch)
            except FloatingPointError as e:
                run.divergence = Divergence(step, str(e), (getattr(trainer, "trainer", trainer)).good_steps)
                break
            if step % args.log_every == 0 or step == steps - 1:
                means = {key: value.mean().item() for key, value in metrics.items()}
                bar.set_postfix(loss=f"{means['loss']:.3g}", fvu=f"{means['fvu']:.4f}", l0=f"{means['l0']:.1f}",
                                dead=f"{means['dead']:.3f}")
                for s, seed in enumerate(seeds):
                    run.logs[seed].append({"step": step, **{key: round(value[s].item(), 6)
                                                             for key, value in metrics.items()}})
    if run.divergence is None and snapshots:
        take_snapshot(steps)
    run.seconds = time.time() - start
    return run


# --------------------------------------------------------------------------------------------------
# Several processes


@dataclass
class Part:
    """One ensemble's result, as one process trained it: its seeds' weights (after a divergence the last
    good ones, which the ensemble holds again) and its Training."""
    seeds: list[int]
    weights: dict[int, dict[str, torch.Tensor]]
    training: Training


def own_seeds(all_seeds: list[int], ranks: Ranks, every_seed: bool) -> list[int]:
    """This process's seeds: seeds[rank::N] (a seed trains the same in any ensemble), or every seed (data
    parallel, latents sharded). Refuses more processes than seeds."""
    if every_seed:
        return all_seeds
    if len(all_seeds) < ranks.world:
        raise HusaiError(f"{len(all_seeds)} seed(s) for {ranks.world} processes: give each at least one seed "
                         f"(or train every seed in every process with --data-parallel)")
    return all_seeds[ranks.rank::ranks.world]


def gather_parts(part: Part, stepper, ranks: Ranks, every_seed: bool) -> list[Part] | None:
    """Every process's Part on the first process (None on the others). In data parallel every process
    holds the same SAEs (checked here): the first one's are the result; with latents sharded the first
    process's Part already holds the whole SAEs, gathered (and b_dec, in every process, is checked)."""
    if every_seed:
        if part.training.divergence is None:
            stepper.check_replicas()
        parts = [part] if ranks.rank == 0 else None
    else:
        parts = gather_on_rank0(part, ranks)
    return parts


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


def describe_run(args, data: TrainingData, cfg: SAEConfig, lr: float, seeds: list[int], ranks: Ranks,
                 data_parallel: bool, latent_parallel: bool, device: torch.device) -> str:
    """The line a process prints before training: what it trains, on what, and where."""
    line = f"process {ranks.rank + 1} of {ranks.world}: " if ranks.world > 1 else ""
    line += f"data parallel, {args.batch_size // ranks.world} rows of each batch; " if data_parallel else ""
    line += f"latents sharded, {cfg.width // ranks.world} of each SAE's; " if latent_parallel else ""
    held_out = f", {len(data.eval_acts)} held out for evaluation" if data.train_rows < data.rows else ""
    stream = f", streamed through a {args.shuffle_buffer}-row shuffle buffer" if data.streamed else ""
    return (f"{line}{len(seeds)} x {cfg.arch} SAE, d={data.d} -> m={cfg.width}, {cfg.sparsity_name}, lr {lr:.2e}, "
            f"{args.steps} steps of {args.batch_size} on {data.rows} activations "
            f"({data.provenance['hook'] or args.acts}{held_out}{stream}), {device}")


def describe_seed(seed: int, metrics: dict, path: Path, target_l0: float = 0.0) -> str:
    line = f"seed {seed}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.1%}"
    if target_l0 and abs(metrics["l0"] / target_l0 - 1) > TARGET_L0_TOLERANCE:
        line += (f" (misses --target-l0 {target_l0:g} by {metrics['l0'] / target_l0 - 1:+.0%}: README, "
                 f"\"When --target-l0 misses\")")
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


def last_good_folder_name(seed: int) -> str:
    return f"last-good-{seed_folder_name(seed)}"


def single_file_names(seed: int) -> list[str]:
    """A seed's files in the single-file layout of earlier runs."""
    return [sae_file_name(seed), snapshot_file_name(seed), f"seed{seed}.log.jsonl", f"last-good-seed{seed}.safetensors"]


def run_entries(seeds: list[int]) -> list[str]:
    """Every entry a run may write, seed by seed: its folder, or after a divergence its last-good folder.
    The seed's names in the single-file layout are entries too, though never written: an earlier run's
    files of the same seed are then this run's to replace (--force) or another run's to refuse."""
    return [name for seed in seeds for name in (seed_folder_name(seed), last_good_folder_name(seed),
                                                *single_file_names(seed))]


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
    """A trained seed's folder (SAELens's files, snapshots and log) into the run's staging folder, every
    tensor checked finite."""
    folder = run.path(seed_folder_name(seed))
    folder.mkdir()
    write_sae_folder(folder, checked(f"seed {seed}", tensors, metrics),
                     {"config": config, "metrics": metrics, "provenance": provenance})
    snapshot_fvu = {f"FVU at step {t}": v for t, v in zip(training.snapshot_steps, training.snapshot_fvu[seed])}
    save_tensors(folder / SNAPSHOTS_FILE, checked(f"seed {seed}'s snapshots", training.snapshots[seed], snapshot_fvu),
                 SNAPSHOT_FORMAT, SAE_VERSION,
                 {"steps": training.snapshot_steps, "fvu": training.snapshot_fvu[seed], "config": config})
    write_log(folder / LOG_FILE, training.logs[seed],
              {"status": "finished", "steps": config["steps"], "train_seconds": round(training.seconds, 1)})


def write_last_good(run: RunOutput, part: Part, config: dict, provenance: dict) -> None:
    """After a divergence: each of the ensemble's seeds' last good weights (a folder SAELens loads too)
    and its log."""
    training = part.training
    stop = training.divergence
    status = {"status": "diverged", "diverged_at_step": stop.step, "reason": stop.reason}
    for seed in part.seeds:
        folder = run.path(last_good_folder_name(seed))
        folder.mkdir()
        write_sae_folder(folder, checked(f"seed {seed}'s last good weights", part.weights[seed]),
                         {"config": dict(config, seed=seed), "provenance": provenance, **status,
                          "steps": stop.good_steps})
        write_log(folder / LOG_FILE, training.logs[seed],
                  {**status, "good_steps": stop.good_steps, "train_seconds": round(training.seconds, 1)})


def write_log(path: Path, rows: list[dict], last: dict) -> None:
    """The training log: one JSON object per logged step, then the run's last line (status and seconds)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, last]))


# --------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One configuration of the invocation, checked and ready to train: its command line's settings, its
    SAEConfig, its seeds (this process's share of all_seeds), the config its files record, and where."""
    args: argparse.Namespace
    cfg: SAEConfig
    all_seeds: list[int]
    seeds: list[int]
    data_parallel: bool
    latent_parallel: bool
    lr: float
    n_snapshots: int
    config: dict
    out_dir: Path


def cell_folder(args, cfg: SAEConfig, provenance: dict) -> Path:
    """--out, or <--runs-dir>/<arch>-w<width>-<k or penalty>[-<variant>][-<source>][-varied-order]."""
    name = f"{cfg.arch}-w{cfg.width}-{cfg.folder_label}"
    if args.acts:
        name += f"-acts-{Path(args.acts).stem}"
    elif args.hook or args.checkpoint is not None:
        name += f"-{provenance['hook']}" + (f"-epoch{args.checkpoint}" if args.checkpoint is not None else "")
    name += "-varied-order" if args.vary_data_order else ""
    return Path(args.out or Path(args.runs_dir) / name)


def prepare_cell(args, cfg: SAEConfig, data: TrainingData, ranks: Ranks, device: torch.device) -> Cell:
    """A cell's checks against the data (batch size, memory), its learning rate, config and folder."""
    all_seeds = seeds_of(args)
    data_parallel = args.data_parallel and ranks.world > 1
    latent_parallel = args.latent_parallel and ranks.world > 1
    if latent_parallel and cfg.arch != "topk":
        raise HusaiError(f"--latent-parallel trains --arch topk only (asked: {cfg.arch}); share the seeds out, "
                         f"or use --data-parallel")
    if latent_parallel and cfg.width % ranks.world:
        raise HusaiError(f"--width {cfg.width}: --latent-parallel needs a multiple of the {ranks.world} processes")
    if data_parallel and args.batch_size % ranks.world:
        raise HusaiError(f"--batch-size {args.batch_size}: --data-parallel needs a multiple of the "
                         f"{ranks.world} processes")
    seeds = own_seeds(all_seeds, ranks, data_parallel or latent_parallel)
    n, d, eval_rows, width = data.rows, data.d, len(data.eval_acts), cfg.width
    if args.batch_size > data.train_rows:
        held_out = f" training activations ({eval_rows} of the {n} are held out: lower --eval-rows)"
        raise HusaiError(f"--batch-size {args.batch_size} is larger than the {data.train_rows}"
                         + (held_out if data.train_rows < n else " activations"))
    n_snapshots = min(args.snapshots, args.steps + 1)
    n_streams = len(seeds) if args.vary_data_order else 1
    held = eval_rows + (n_streams * (args.shuffle_buffer + args.batch_size) if data.streamed
                        else data.train_rows if data.train_acts is not data.eval_acts else 0)
    check_memory(memory_estimate(held, d, width, len(seeds), args.batch_size, n_snapshots,
                                 eval_rows if data.eval_chunk is None else min(eval_rows, data.eval_chunk)), device,
                 f"--width {width} (d = {d}, N = {n}) with {len(seeds)} seed(s), --batch-size {args.batch_size} "
                 f"and {n_snapshots} snapshots", "choose a smaller --width, --batch-size, --snapshots or fewer seeds")
    lr = args.lr if args.lr is not None else default_lr(cfg)
    config = dict(asdict(cfg), seed=None, data_seed=args.data_seed, vary_data_order=args.vary_data_order,
                  steps=args.steps, batch_size=args.batch_size, lr=lr, warmup_steps=args.warmup_steps,
                  decay_frac=args.decay_frac, kernels=not args.no_kernels, device=str(device),
                  torch=torch.__version__, eval_rows=eval_rows,
                  shuffle_buffer=args.shuffle_buffer if data.streamed else None,
                  data_parallel_processes=ranks.world if data_parallel else None,
                  latent_parallel_processes=ranks.world if latent_parallel else None)
    return Cell(args, cfg, all_seeds, seeds, data_parallel, latent_parallel, lr, n_snapshots, config,
                cell_folder(args, cfg, data.provenance))


def check_outputs(cells: list[Cell]) -> None:
    """Before a grid trains anything: each cell's folder would take its run (not in use, not another
    run's files, nothing to replace without --force). Each cell checks again when it starts."""
    folders = [cell.out_dir for cell in cells]
    if len(set(folders)) < len(folders):
        twice = next(folder for folder in folders if folders.count(folder) > 1)
        raise HusaiError(f"two cells of the grid write {twice}: with several cells --out cannot name one folder; "
                         f"leave it out (each cell goes to <--runs-dir>/<its name>)")
    for cell in cells:
        with RunOutput(cell.out_dir, run_name(cell.all_seeds), run_entries(cell.all_seeds), cell.args.force,
                       advice=overlap_advice):
            pass


def train_cell(cell: Cell, data: TrainingData, ranks: Ranks, device: torch.device, label: str | None) -> float:
    """Train one cell's seeds as one ensemble, evaluate them and write their files (the first process,
    after gathering every process's seeds), exactly as a single invocation does. Returns the seconds its
    training took. A diverged ensemble writes its last good weights and raises."""
    args, cfg, data_parallel, seeds, config = cell.args, cell.cfg, cell.data_parallel, cell.seeds, cell.config
    provenance = data.provenance
    writer = ranks.rank == 0
    output = (RunOutput(cell.out_dir, run_name(cell.all_seeds), run_entries(cell.all_seeds), args.force,
                        advice=overlap_advice) if writer else contextlib.nullcontext())
    with output as run:
        torch.set_flush_denormal(True)   # tiny Adam moments as denormals slow a CPU step ~10x
        sae = (ShardedTopKSAE(cfg, seeds, ranks) if cell.latent_parallel else build_sae(cfg, seeds)).to(device)
        sae.init_from_data(data.eval_acts)
        trainer = SAETrainer(sae, cell.lr, args.steps, args.warmup_steps, round(args.decay_frac * args.steps),
                             use_kernels=not args.no_kernels)
        stepper = (DataParallel(trainer, ranks) if data_parallel else
                   LatentShards(trainer, ranks) if cell.latent_parallel else trainer)
        print(describe_run(args, data, cfg, cell.lr, seeds, ranks, data_parallel, cell.latent_parallel, device))
        training = train(sae, stepper, data, seeds, args, config, cell.n_snapshots, ranks,
                         snapshots=writer or not data_parallel, label=label)
        part = Part(seeds, {seed: sae.export(s) for s, seed in enumerate(seeds)}, training)
        parts = gather_parts(part, stepper, ranks, data_parallel or cell.latent_parallel)
        if not writer:
            return training.seconds

        # ---- evaluation on every input (or the held-out slice), and the files --------------------
        owner = {seed: part for part in parts for seed in part.seeds}
        finished = [seed for seed in cell.all_seeds if owner[seed].training.divergence is None]
        acts, model, tokens, labels, references = data.eval_acts.cpu(), data.model, data.tokens, data.labels, None
        if model is not None and finished:
            model, tokens, labels = model.cpu(), tokens.cpu(), labels.cpu()
            references = ablation_references(model, tokens, labels, provenance["hook"], acts)
        lines = []
        for seed in finished:
            tensors, seed_config = owner[seed].weights[seed], dict(config, seed=seed)
            metrics = evaluation_metrics(tensors, seed_config, acts, data.eval_chunk)
            if model is not None:
                metrics.update(downstream_metrics(references, model, tokens, labels, provenance["hook"], tensors,
                                                  seed_config))
            write_seed_files(run, seed, tensors, metrics, owner[seed].training, seed_config, provenance)
            lines.append(describe_seed(seed, metrics, run.final_path(seed_folder_name(seed)), cfg.target_l0))
        diverged = [part for part in parts if part.training.divergence]
        for part in diverged:
            write_last_good(run, part, config, provenance)
        run.commit()
    print("\n".join(lines))
    if diverged:
        stop = diverged[0].training.divergence
        raise HusaiError(f"training diverged: {stop.reason}; the last good weights (after {stop.good_steps} "
                         f"steps) are in {cell.out_dir}/last-good-seed<N>/ and no seed<N>/ was "
                         f"written for {'its' if len(parts) == 1 else 'those'} seeds; try a lower --lr")
    processes = f" on {ranks.world} processes" if ranks.world > 1 else ""
    seconds = max(part.training.seconds for part in parts)
    print(f"trained {len(cell.all_seeds)} seed(s) in {seconds:.1f} s{processes}")
    return seconds


def cell_work(cell: Cell) -> float:
    """A cell's rough cost for the grid's time estimate: steps x seeds x (width + 64)."""
    return cell.args.steps * len(cell.all_seeds) * (cell.cfg.width + 64)


def main() -> None:
    runs = command_lines(build_parser(), sys.argv[1:])   # the command line, or each line of a named grid
    first = runs[0]
    ranks, device = start_ranks(pick_device(first.device), first.dist_timeout)

    # ---- activations, read once and checked; then every cell checked before any training -------------
    data = read_activations(first, device)
    cells = [prepare_cell(args, cfg, data, ranks, device)
             for args in runs for cfg in grid_cells(args, data.d, len(data.eval_acts))]
    if len(cells) > 1 and ranks.rank == 0:
        check_outputs(cells)
        print(f"grid: {len(cells)} cells, {sum(len(cell.all_seeds) for cell in cells)} SAEs")

    # ---- the cells, one after another, with the time of each ----------------------------------------
    start, done = time.time(), 0.0
    for i, cell in enumerate(cells):
        label = f"cell {i + 1}/{len(cells)} {cell.out_dir.name}" if len(cells) > 1 else None
        cell_start = time.time()
        train_cell(cell, data, ranks, device, label)
        done += cell_work(cell)
        if label and ranks.rank == 0:
            elapsed = time.time() - start
            left = elapsed * (sum(map(cell_work, cells)) / done - 1)
            print(f"{label}: {time.time() - cell_start:.1f} s; grid {elapsed:.0f} s so far, about {left:.0f} s left")
    stop_ranks(ranks)


if __name__ == "__main__":
    run_cli(main, unit_outputs=True)
