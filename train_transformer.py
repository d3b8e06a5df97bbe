"""Stage 1: train a small transformer until it groks modular arithmetic.

    python train_transformer.py                 # default: fast, about a minute on a 2-core CPU
    python train_transformer.py --frac 0.3      # the published recipe (Nanda et al. 2023): slow, faithful
    python train_transformer.py --extract runs/transformer/model.safetensors --shards runs/acts
                                                # no training: a trained model's activations as shards

The model reads [a, b, =] (or [a, op, b, =]) and predicts c = a op b mod p at the `=` position; c is
never an input token. Training is full batch AdamW with weight decay 1.0, which is what makes the model
generalise by learning a handful of Fourier frequencies. A run's files are named after --out
(default runs/transformer/model.safetensors), so several runs can share a folder:
    model.safetensors       weights, the train/test split, config, metrics and progress measures
    model.log.jsonl         one line of metrics per evaluation, with the wall-clock seconds (the only
                            timing: the same command writes byte-identical model and checkpoint files)
    model.checkpoints/      epochNNNNNN.safetensors every --ckpt-every epochs (stage 2 can train on them)
    model.curves.png, model.fourier.png
    model.last-finite.safetensors   only when training diverged: the last weights whose loss was finite
They are written beside the folder and moved into place together when the run ends (sae_core.RunOutput):
an interrupted, failed or concurrent run never leaves a mix of two runs, and --force replaces only
this run's earlier files. A run whose loss or weights stop being finite stops there, keeps the last
finite weights in model.last-finite.safetensors (and no model.safetensors), and exits with status 2.

This file is also the library for the model: later stages import make_dataset, load_transformer,
activations_from and run_with_replacement from here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F_nn
from einops import rearrange

from sae_core import (ACTS_INDEX, KEY_FREQUENCY_MIN_SHARE, PURE_NEURON_THRESHOLD, CliParser, HusaiError, RunOutput,
                      embedding_spectrum, file_sha256, fourier_purity, load_tensors, check_memory, pick_device,
                      read_acts_file, run_cli, save_tensors, seed_everything, sum_frequency_directions,
                      write_activation_shards)

FORMAT = "husai.transformer"
VERSION = 1
OPERATIONS = {"add": lambda a, b, p: (a + b) % p, "sub": lambda a, b, p: (a - b) % p,
              "mul": lambda a, b, p: (a * b) % p}
HOOK_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")
MAX_COUNT = 2**31 - 1            # upper bound of every integer flag (sizes, epochs, intervals)


def build_parser() -> CliParser:
    parser = CliParser(description="Stage 1: train a transformer that groks modular arithmetic.")
    add = parser.add_argument
    # the task
    add("--p", type=int, default=113, help="modulus; inputs a, b and answers c live in Z_p")
    add("--op", choices=sorted(OPERATIONS), default="add", help="c = a op b mod p")
    add("--format", dest="token_format", choices=["ab", "aopb"], default="ab",
        help="input tokens: [a, b, =] or [a, op, b, =]; the answer is read at `=` either way")
    add("--frac", type=float, default=0.5,
        help="fraction of the p^2 pairs used for training (0.3 = the published recipe, slower to grok)")
    add("--seed", type=int, default=0, help="seeds the train/test split and the initialisation")
    # the model (defaults: the 1-layer model of Nanda et al.)
    add("--layers", type=int, default=1, help="transformer blocks")
    add("--d-model", type=int, default=128, help="residual stream width")
    add("--heads", type=int, default=4, help="attention heads (d_head = d_model / heads)")
    add("--d-mlp", type=int, default=512, help="MLP neurons per block")
    add("--layernorm", action="store_true", help="add pre-LayerNorms and a final LayerNorm (off in the paper)")
    # optimisation
    add("--epochs", type=int, default=5000, help="maximum epochs (one full-batch step each)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate")
    add("--wd", type=float, default=1.0, help="AdamW weight decay (1.0 drives grokking; 0.01 only memorises)")
    add("--warmup", type=int, default=10, help="epochs of linear learning-rate warm-up")
    add("--target-acc", type=float, default=0.995, help="held-out accuracy that counts as generalised")
    add("--extra-epochs", type=int, default=800,
        help="keep training this many epochs after --target-acc is reached (clean-up phase), then stop")
    add("--eval-every", type=int, default=10, help="evaluate the held-out set every N epochs")
    add("--ckpt-every", type=int, default=100, help="save a checkpoint every N epochs (0: none)")
    # where and how
    add("--out", default="runs/transformer/model.safetensors",
        help="output model file; the run's other files are named after it (model.log.jsonl, ...)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    add("--force", action="store_true",
        help="replace the earlier run of this --out (all its files, never those of another run)")
    # instead of training: a trained model's activations as a shard folder, for train_sae.py --acts
    add("--extract", metavar="MODEL", default=None,
        help="train nothing: write MODEL's activations at --hook on all p^2 inputs (at `=`, row a * p + b) "
             "to the shard folder --shards (--force replaces an earlier extraction there)")
    add("--shards", default=None, help="--extract: the shard folder to write (the format is in sae_core.py)")
    add("--hook", default=None, help="--extract: hook site, e.g. blocks.0.mlp_post (default: last block's resid_post)")
    add("--checkpoint", type=int, default=None, help="--extract: this epoch's checkpoint instead of the final model")
    add("--rows-per-shard", type=int, default=65536, help="--extract: rows per shard file")
    return parser


@dataclass
class ModelConfig:
    p: int = 113
    op: str = "add"
    token_format: str = "ab"
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    layernorm: bool = False

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_ctx(self) -> int:
        return 3 if self.token_format == "ab" else 4

    @property
    def d_vocab(self) -> int:
        return self.p + (1 if self.token_format == "ab" else 2)   # numbers, `=`, and the op token

    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.{site}" for layer in range(self.n_layers) for site in HOOK_SITES]


MODEL_FLAGS = {"p": "--p", "op": "--op", "token_format": "--format", "n_layers": "--layers",
               "d_model": "--d-model", "n_heads": "--heads", "d_mlp": "--d-mlp", "layernorm": "--layernorm"}


def model_config_problem(cfg: ModelConfig, label: Callable[[str], str] = str) -> str | None:
    """What is wrong with a configuration (None if nothing), naming each field by label(field):
    a flag for the command line, the metadata key for a file."""
    for field, low in (("p", 3), ("n_layers", 1), ("d_model", 1), ("n_heads", 1), ("d_mlp", 1)):
        value = getattr(cfg, field)
        if type(value) is not int or not low <= value <= MAX_COUNT:
            return f"{label(field)} {value!r}: must be an integer in [{low}, {MAX_COUNT}]"
    if cfg.op not in OPERATIONS:
        return f"{label('op')} {cfg.op!r}: must be one of {', '.join(sorted(OPERATIONS))}"
    if cfg.token_format not in ("ab", "aopb"):
        return f"{label('token_format')} {cfg.token_format!r}: must be ab or aopb"
    if type(cfg.layernorm) is not bool:
        return f"{label('layernorm')} {cfg.layernorm!r}: must be true or false"
    if cfg.d_model % cfg.n_heads:
        return f"{label('d_model')} {cfg.d_model} is not divisible by {label('n_heads')} {cfg.n_heads}"
    return None


# --------------------------------------------------------------------------------------------------
# Data


def make_dataset(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 inputs and their answers. Row n = a * p + b, so a [p^2, ...] result reshapes to [p, p, ...].
    tokens [p^2, n_ctx] is [a, b, =] or [a, op, b, =] with `=` = p and op = p + 1; labels [p^2] in [0, p)."""
    p = cfg.p
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    equals = torch.full_like(a, p)
    columns = [a, b, equals] if cfg.token_format == "ab" else [a, torch.full_like(a, p + 1), b, equals]
    return torch.stack(columns, dim=1), OPERATIONS[cfg.op](a, b, p)


def train_test_split(p: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of the p^2 pairs into disjoint train and held-out sets."""
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(frac * p * p)
    return order[:n_train].sort().values, order[n_train:].sort().values


# --------------------------------------------------------------------------------------------------
# Model
#
# A hook site is a named activation: forward(..., cache=dict) records it, forward(..., patch={name: fn})
# replaces it with fn(activation). Only the `=` position's prediction is ever used, so with
# last_only=True the final block computes its keys and values at every position but everything after
# attention (queries, MLP, unembedding) at the last position alone: a third of the work, same logits.


class Attention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        self.W_Q = torch.nn.Parameter(torch.randn(h, d, dh) / d**0.5)
        self.W_K = torch.nn.Parameter(torch.randn(h, d, dh) / d**0.5)
        self.W_V = torch.nn.Parameter(torch.randn(h, d, dh) / d**0.5)
        self.W_O = torch.nn.Parameter(torch.randn(h, dh, d) / (h * dh) ** 0.5)

    def forward(self, x: torch.Tensor, n_queries: int) -> torch.Tensor:
        """x [batch, pos, d] -> attention output for the last n_queries positions [batch, n_queries, d].

        With 3-4 positions, scores are elementwise products summed over e rather than batched matmuls:
        millions of 1x32x3 matmuls are what made the straightforward version slow on a CPU."""
        def project(inputs, W):   # [batch, pos, d] @ [h, d, e] as one matmul -> [batch, pos, h, e]
            return (inputs @ rearrange(W, "h d e -> d (h e)")).unflatten(-1, W.shape[::2])
        q = project(x[:, -n_queries:], self.W_Q)[:, :, None]          # [batch, query, 1, h, e]
        k, v = project(x, self.W_K)[:, None], project(x, self.W_V)    # [batch, 1, key, h, e], [batch, key, h, e]
        scores = (q * k).sum(-1) / self.W_Q.shape[-1] ** 0.5          # [batch, query, key, h]
        query_pos = torch.arange(x.shape[1] - n_queries, x.shape[1], device=x.device)
        causal = torch.arange(x.shape[1], device=x.device)[None, :] <= query_pos[:, None]
        pattern = scores.masked_fill(~causal[:, :, None], float("-inf")).softmax(dim=2)
        z = (pattern[..., None] * v[:, None]).sum(2)                  # [batch, query, h, e]
        return z.flatten(-2) @ rearrange(self.W_O, "h e d -> (h e) d")


class Block(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.name = f"blocks.{layer}"
        self.attn = Attention(cfg)
        self.W_in = torch.nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) / cfg.d_model**0.5)
        self.b_in = torch.nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = torch.nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) / cfg.d_mlp**0.5)
        self.b_out = torch.nn.Parameter(torch.zeros(cfg.d_model))
        norm = torch.nn.LayerNorm if cfg.layernorm else lambda d: torch.nn.Identity()
        self.ln_attn, self.ln_mlp = norm(cfg.d_model), norm(cfg.d_model)

    def forward(self, x: torch.Tensor, hook: Callable, last_only: bool) -> torch.Tensor:
        x = hook(f"{self.name}.resid_pre", x)
        n_queries = 1 if last_only else x.shape[1]
        attn_out = hook(f"{self.name}.attn_out", self.attn(self.ln_attn(x), n_queries))
        resid_mid = hook(f"{self.name}.resid_mid", x[:, -n_queries:] + attn_out)
        mlp_post = hook(f"{self.name}.mlp_post", torch.relu(self.ln_mlp(resid_mid) @ self.W_in + self.b_in))
        mlp_out = hook(f"{self.name}.mlp_out", mlp_post @ self.W_out + self.b_out)
        return hook(f"{self.name}.resid_post", resid_mid + mlp_out)


class Transformer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = torch.nn.Parameter(torch.randn(cfg.d_vocab, cfg.d_model) / cfg.d_model**0.5)
        self.W_pos = torch.nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) / cfg.d_model**0.5)
        self.blocks = torch.nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = torch.nn.LayerNorm(cfg.d_model) if cfg.layernorm else torch.nn.Identity()
        self.W_U = torch.nn.Parameter(torch.randn(cfg.d_model, cfg.p) / cfg.d_model**0.5)

    def forward(self, tokens: torch.Tensor, cache: dict | None = None,
                patch: dict[str, Callable] | None = None) -> torch.Tensor:
        """tokens [batch, n_ctx] -> logits over the p answers at the `=` position [batch, p].

        cache: a dict whose keys name hook sites to record (values are filled in). patch: hook site
        name -> function of the activation returning its replacement. In the last block, sites after
        attention hold the `=` position only ([batch, 1, d])."""
        unknown = set(cache or ()) | set(patch or ())
        unknown -= set(self.cfg.hook_names())
        if unknown:
            raise HusaiError(f"unknown hook {sorted(unknown)[0]!r}; valid: {', '.join(self.cfg.hook_names())}")

        def hook(name: str, x: torch.Tensor) -> torch.Tensor:
            if patch and name in patch:
                x = patch[name](x)
            if cache is not None and name in cache:
                cache[name] = x
            return x

        x = F_nn.embedding(tokens, self.W_E) + self.W_pos
        for i, block in enumerate(self.blocks):
            x = block(x, hook, last_only=i == len(self.blocks) - 1)
        return self.ln_final(x[:, -1]) @ self.W_U


# --------------------------------------------------------------------------------------------------
# Reading and replacing activations (what stages 2 and 3 use)


def collect_activations(model: Transformer, tokens: torch.Tensor, hook: str, batch_size: int = 4096) -> torch.Tensor:
    """Activations [N, d] at `hook` at the `=` position, for every row of tokens."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            cache = {hook: None}
            model(tokens[start:start + batch_size], cache=cache)
            chunks.append(cache[hook][:, -1])
    return torch.cat(chunks)


class Activations(NamedTuple):
    """Activations named by a provenance, with the model behind them when there is one."""
    acts: torch.Tensor                 # [N, d]; from a transformer, N = p^2 in the order a * p + b
    model: Transformer | None
    tokens: torch.Tensor | None        # every input, and its answer
    labels: torch.Tensor | None
    hook: str | None


def activations_from(provenance: dict, device: str | torch.device = "cpu") -> Activations:
    """The activations a provenance names: the activation file (`source` "acts"), or the transformer (at
    its checkpoint) run on every input and read at its hook (default: the last block's resid_post) at `=`.
    train_sae.py trains on these and analyze.py recomputes them from the SAE files, with this one function."""
    if provenance["source"] == "acts":
        return Activations(read_acts_file(provenance["acts"]).to(device), None, None, None, None)
    path = provenance["transformer"]
    if not Path(path).is_file():
        raise HusaiError(f"{path}: no transformer file; create it with `python train_transformer.py`")
    model, _ = load_transformer(path, provenance["checkpoint"], device)
    hook = provenance["hook"] or f"blocks.{model.cfg.n_layers - 1}.resid_post"
    if hook not in model.cfg.hook_names():
        raise HusaiError(f"--hook {hook}: no such hook site; valid: {', '.join(model.cfg.hook_names())}")
    tokens, labels = (t.to(device) for t in make_dataset(model.cfg))
    return Activations(collect_activations(model, tokens, hook).float(), model, tokens, labels, hook)


def run_with_replacement(model: Transformer, tokens: torch.Tensor, hook: str,
                         replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits [N, p] with the `=`-position activation at `hook` ([N, d]) replaced by replace(activation)."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1] = replace(x[:, -1])
        return x
    with torch.no_grad():
        return model(tokens, patch={hook: patch})


def run_files(model_path: str | Path) -> dict[str, str]:
    """The entries of the stage-1 run whose model file is `model_path`, all in its folder and named
    after it: for runs/t/model.safetensors, model.log.jsonl, model.checkpoints (a folder), etc."""
    name = Path(model_path).name
    base = name.removesuffix(".safetensors")
    return {"model": name, "last_finite": f"{base}.last-finite.safetensors", "log": f"{base}.log.jsonl",
            "curves": f"{base}.curves.png", "fourier": f"{base}.fourier.png", "checkpoints": f"{base}.checkpoints"}


def training_log_path(model_path: str | Path) -> Path:
    return Path(model_path).parent / run_files(model_path)["log"]


def checkpoint_folder(model_path: str | Path) -> Path:
    return Path(model_path).parent / run_files(model_path)["checkpoints"]


def checkpoint_path(model_path: str | Path, epoch: int) -> Path:
    return checkpoint_folder(model_path) / checkpoint_name(epoch)


def checkpoint_name(epoch: int) -> str:
    return f"epoch{epoch:06d}.safetensors"


def list_checkpoints(model_path: str | Path) -> list[int]:
    return sorted(int(f.stem.removeprefix("epoch")) for f in checkpoint_folder(model_path).glob("epoch*.safetensors"))


def config_from_metadata(meta: dict, file: Path) -> ModelConfig:
    """The ModelConfig a file's metadata describes; a missing key, an unknown key or an impossible
    value is a HusaiError naming the file and the key."""
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise HusaiError(f"{file}: metadata 'config' lacks the key 'model' (the model's configuration)")
    values = config["model"]
    names = [field.name for field in fields(ModelConfig)]
    missing = [name for name in names if name not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        raise HusaiError(f"{file}: metadata config.model " + (f"lacks the key {missing[0]!r}" if missing
                                                               else f"has an unknown key {unknown[0]!r}"))
    cfg = ModelConfig(**values)
    problem = model_config_problem(cfg, label=lambda field: f"config.model.{field}")
    if problem:
        raise HusaiError(f"{file}: metadata {problem}")
    return cfg


def load_transformer(path: str | Path, checkpoint: int | None = None,
                     device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Load a model written by this stage (or one of its checkpoints, by epoch). Returns (model in
    eval mode, metadata with config, split and metrics). The model is built on the meta device and
    takes the file's tensors after their names and shapes are checked, so a bad file allocates nothing."""
    file = checkpoint_path(path, checkpoint) if checkpoint is not None else Path(path)
    if checkpoint is not None and not file.is_file():
        raise HusaiError(f"{file}: no checkpoint at epoch {checkpoint}; saved epochs: "
                         f"{', '.join(str(e) for e in list_checkpoints(path)) or 'none'}")
    tensors, meta = load_tensors(file, FORMAT, VERSION, required=("split.train_indices",),
                                 hint="python train_transformer.py")
    with torch.device("meta"):
        model = Transformer(config_from_metadata(meta, file))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise HusaiError(f"{file}: missing tensor(s) {', '.join(missing)}")
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise HusaiError(f"{file}: tensor {name} has shape {list(tensors[name].shape)}, "
                             f"the configuration needs {list(tensor.shape)}")
    model.load_state_dict({name: tensors[name].float() for name in expected}, assign=True)
    meta["train_indices"] = tensors["split.train_indices"]
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------------
# Progress measures (Nanda et al. 2023)


def progress_measures(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor,
                      train_idx: torch.Tensor) -> dict:
    """Key frequencies (from the embedding), per-layer fraction of MLP neurons explained by one
    frequency, and the restricted / excluded losses."""
    cfg = model.cfg
    with torch.no_grad():
        shares, keys = embedding_spectrum(model.W_E[: cfg.p])
        cache = {f"blocks.{layer}.mlp_post": None for layer in range(cfg.n_layers)}
        logits = model(tokens, cache=cache).double()
    neurons = {}
    for name, acts in cache.items():
        purity, best = fourier_purity(rearrange(acts[:, -1], "(a b) n -> a b n", a=cfg.p).cpu())
        explained = purity >= PURE_NEURON_THRESHOLD
        neurons[name] = {
            "frac_explained": float(explained.float().mean()),
            "frac_explained_by_key_freq": float((explained & torch.isin(best, torch.tensor(keys))).float().mean()),
            "explained_per_freq": {int(k): int(n) for k, n in zip(*best[explained].unique(return_counts=True))},
        }
    measures = {"key_frequencies": keys, "key_frequency_rule": f"embedding share >= {KEY_FREQUENCY_MIN_SHARE}",
                "embedding_frequency_shares": [round(float(s), 6) for s in shares],
                "neurons": neurons, "pure_neuron_threshold": PURE_NEURON_THRESHOLD}
    directions = sum_frequency_directions(cfg.p, cfg.op, keys)
    if directions is not None:
        directions = directions.to(logits.device, torch.float64)
        projected = directions @ (directions.T @ logits)
        mean = logits.mean(dim=0, keepdim=True)
        measures["restricted_loss"] = float(F_nn.cross_entropy(mean + projected, labels))
        measures["excluded_loss_train"] = float(F_nn.cross_entropy((logits - projected)[train_idx], labels[train_idx]))
        measures["clean_loss_train"] = float(F_nn.cross_entropy(logits[train_idx], labels[train_idx]))
    return measures


# --------------------------------------------------------------------------------------------------
# Figures


def plot_training_curves(log: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in log]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in log], style, label=split)
        ax_acc.plot(epochs, [row[f"{split}_acc"] for row in log], style, label=split)
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fourier_spectrum(shares: list[float], keys: list[int], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    freqs = list(range(1, len(shares) + 1))
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(freqs, shares, color=["tab:red" if k in keys else "tab:gray" for k in freqs])
    ax.axhline(KEY_FREQUENCY_MIN_SHARE, color="k", lw=0.8, ls=":", label="key-frequency threshold")
    ax.set(xlabel="frequency k", ylabel="share of embedding energy",
           title=f"Embedding Fourier spectrum; key frequencies {keys}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Training


def validate(args) -> None:
    """Every flag, before any work: integers in range, floats finite and in range, a split that leaves
    both training and held-out pairs, and an --out that names a file."""
    cfg = model_config_from_args(args)
    problem = model_config_problem(cfg, label=MODEL_FLAGS.__getitem__)
    if problem:
        raise HusaiError(problem)
    counts = {"--epochs": (args.epochs, 1), "--eval-every": (args.eval_every, 1), "--warmup": (args.warmup, 0),
              "--extra-epochs": (args.extra_epochs, 0), "--ckpt-every": (args.ckpt_every, 0)}
    for flag, (value, low) in counts.items():
        if not low <= value <= MAX_COUNT:
            raise HusaiError(f"{flag} {value}: must be an integer in [{low}, {MAX_COUNT}]")
    if not 0 <= args.seed < 2**63:
        raise HusaiError(f"--seed {args.seed}: must be an integer in [0, 2^63)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise HusaiError(f"--lr {args.lr}: must be a positive finite number")
    if not (math.isfinite(args.wd) and args.wd >= 0):
        raise HusaiError(f"--wd {args.wd}: must be a finite number >= 0")
    for flag, value in (("--frac", args.frac), ("--target-acc", args.target_acc)):
        if not 0 <= value <= 1:
            raise HusaiError(f"{flag} {value}: must be a fraction in [0, 1]")
    n_pairs = cfg.p**2
    n_train = round(args.frac * n_pairs)
    if not 0 < n_train < n_pairs:
        raise HusaiError(f"--frac {args.frac} with --p {cfg.p}: {n_train} training and {n_pairs - n_train} "
                         f"held-out pairs; both need at least one")
    out = Path(args.out)
    if out.is_dir():
        raise HusaiError(f"--out {out}: is a folder; --out names the model file, e.g. {out / 'model.safetensors'}")
    if not out.name.removesuffix(".safetensors") or out.name.startswith("."):
        raise HusaiError(f"--out {args.out!r}: needs a file name that does not start with '.'")


def model_config_from_args(args) -> ModelConfig:
    return ModelConfig(p=args.p, op=args.op, token_format=args.token_format, n_layers=args.layers,
                       d_model=args.d_model, n_heads=args.heads, d_mlp=args.d_mlp, layernorm=args.layernorm)


def memory_estimate(cfg: ModelConfig, n_train: int) -> int:
    """Rough peak memory of a stage-1 run in bytes, from the sizes alone (nothing is allocated).

    Training (full batch of n_train rows, n_ctx positions): per layer about 12 d + 2 n_ctx d + 3 d_mlp
    floats per row and position are held for the backward pass (the attention products are
    [rows, query, key, d]), plus 3 n_train p for the logits; the parameters six times (weights,
    gradients, two Adam moments, two kept copies). The final measurements on all p^2 inputs: logits in
    float and double (3 p^3) and the float64 Fourier transforms of the MLP neurons (8 p^2 d_mlp floats).
    Peak = the larger phase + 0.5 GB for Python and the libraries. Measured on a CPU (peak RSS) this is
    within about 25% for p 61-300, d_model 64-256, 1-3 layers."""
    p, d, ctx = cfg.p, cfg.d_model, cfg.n_ctx
    n_params = cfg.d_vocab * d + ctx * d + cfg.n_layers * (4 * d * d + 2 * d * cfg.d_mlp + cfg.d_mlp + d) + d * p
    train = 6 * n_params + cfg.n_layers * n_train * ctx * (12 * d + 2 * ctx * d + 3 * cfg.d_mlp) + 3 * n_train * p
    measure = 6 * n_params + 3 * p**3 + 8 * p**2 * cfg.d_mlp
    return 4 * max(train, measure) + 2**29


def save_model(path: Path, model: Transformer, train_idx: torch.Tensor, metadata: dict) -> None:
    save_weights(path, model.state_dict(), train_idx, metadata)


def save_weights(path: Path, state: dict[str, torch.Tensor], train_idx: torch.Tensor, metadata: dict) -> None:
    tensors = dict(state)
    tensors["split.train_indices"] = train_idx
    save_tensors(path, tensors, FORMAT, VERSION, metadata)


@dataclass
class Divergence:
    """Why training stopped early, and the weights it kept."""
    epoch: int                        # the epoch whose train loss, or whose update, was not finite
    reason: str
    steps: int                        # optimiser steps that produced the kept weights
    loss: float | None                # their train loss (None when it was not finite)
    state: dict[str, torch.Tensor]    # the last finite weights


@dataclass
class Training:
    log: list[dict]                   # one row per evaluation
    epochs: int                       # epochs run (including a diverged one)
    grokked_at: int | None            # first evaluation with held-out accuracy >= --target-acc
    seconds: float
    divergence: Divergence | None


def train(model: Transformer, args, data: dict[str, torch.Tensor],
          save_checkpoint: Callable[[int, dict], None]) -> Training:
    """Full-batch AdamW on data["train_x"], data["train_y"]; evaluation on the held-out pairs every
    --eval-every epochs; stop --extra-epochs after --target-acc or at --epochs.

    Each epoch checks, with one device sync, that the train loss and the updated weights are finite.
    At the first that is not, training stops and returns a Divergence with the last weights that are
    finite and whose loss was finite (the weights before that epoch's step when its loss was not
    finite, before the step itself when the step broke them). Checkpoints come after the check, so
    save_checkpoint(epoch, metrics) only ever sees finite weights."""
    from tqdm import tqdm
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)))
    params = list(model.parameters())
    log, grokked_at, start = [], None, time.time()
    kept = None                       # (steps, loss tensor, weights) of the last epoch that passed the check
    with tqdm(range(args.epochs), unit="epoch", mininterval=0.5) as bar:
        for epoch in bar:
            logits = model(data["train_x"])
            loss = F_nn.cross_entropy(logits, data["train_y"])
            before = {name: t.detach().clone() for name, t in model.state_dict().items()}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            warmup.step()
            loss_finite, weights_finite = torch.stack(
                [loss.detach().isfinite(), torch.stack([p.isfinite().all() for p in params]).all()]).tolist()
            if not loss_finite:
                steps, kept_loss, state = kept if kept else (0, None, before)
                divergence = Divergence(epoch, f"train loss {loss.item()}", steps,
                                        None if kept_loss is None else kept_loss.item(), state)
            elif not weights_finite:
                divergence = Divergence(epoch, f"its update made the weights non-finite (train loss {loss.item():.4g})",
                                        epoch, loss.item(), before)
            else:
                divergence = None
            if divergence:
                return Training(log, epoch + 1, grokked_at, time.time() - start, divergence)
            kept = (epoch, loss.detach(), before)

            last = epoch == args.epochs - 1 or (grokked_at is not None and epoch >= grokked_at + args.extra_epochs)
            if epoch % args.eval_every == 0 or last:
                with torch.no_grad():
                    test_logits = model(data["test_x"])
                row = {"epoch": epoch, "train_loss": loss.item(),
                       "train_acc": (logits.argmax(-1) == data["train_y"]).float().mean().item(),
                       "test_loss": F_nn.cross_entropy(test_logits, data["test_y"]).item(),
                       "test_acc": (test_logits.argmax(-1) == data["test_y"]).float().mean().item(),
                       "seconds": round(time.time() - start, 2)}
                log.append(row)
                bar.set_postfix(train_loss=f"{row['train_loss']:.2e}", test_loss=f"{row['test_loss']:.2e}",
                                train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}")
                if grokked_at is None and row["test_acc"] >= args.target_acc:
                    grokked_at = epoch
            if args.ckpt_every and epoch % args.ckpt_every == 0:
                save_checkpoint(epoch, without_timing(log[-1]))
            if last:
                break
    return Training(log, epoch + 1, grokked_at, time.time() - start, None)


def without_timing(row: dict) -> dict:
    """A log row without its wall-clock seconds: the log keeps the timings, the model files none, so the
    same command writes byte-identical model and checkpoint files."""
    return {key: value for key, value in row.items() if key != "seconds"}


def extract_shards(args) -> None:
    """--extract: a trained model's activations at --hook, at `=`, on every input in the order a * p + b,
    written as a shard folder (sae_core.write_activation_shards); train_sae.py --acts trains on it
    exactly as it would on the model itself."""
    if not args.shards:
        raise HusaiError("--extract needs --shards DIR, the folder to write the activations to")
    provenance = {"source": "transformer", "transformer": args.extract, "hook": args.hook, "position": "eq",
                  "checkpoint": args.checkpoint}
    data = activations_from(provenance, pick_device(args.device))
    source = dict(provenance, hook=data.hook, transformer_sha256=file_sha256(args.extract),
                  inputs="every pair (a, b), row a * p + b")
    rows, d = write_activation_shards(args.shards, data.acts.split(4096), args.rows_per_shard, source, args.force)
    print(f"wrote {rows} activations of d = {d} at {data.hook} to {args.shards} "
          f"({-(-rows // args.rows_per_shard)} shard(s) and {ACTS_INDEX})")


def main() -> None:
    args = build_parser().parse_args()
    if args.extract:
        extract_shards(args)
        return
    for flag in ("shards", "hook", "checkpoint"):
        if getattr(args, flag) is not None:
            raise HusaiError(f"--{flag} applies to --extract only")
    validate(args)
    cfg = model_config_from_args(args)
    device = pick_device(args.device)
    n_train = round(args.frac * cfg.p**2)
    check_memory(memory_estimate(cfg, n_train), device, f"--p {cfg.p} --d-model {cfg.d_model} --d-mlp {cfg.d_mlp} "
                 f"--layers {cfg.n_layers} with {n_train} training pairs", "choose a smaller model or modulus")
    train_idx, test_idx = train_test_split(cfg.p, args.frac, args.seed)
    out = Path(args.out)
    files = run_files(out)
    with RunOutput(out.parent, out.name, files.values(), args.force) as run:
        seed_everything(args.seed)
        # Once the loss reaches ~1e-7, gradients and Adam's moments underflow into denormal floats, which
        # the CPU processes ~10x slower: flushing them to zero keeps late epochs as fast as early ones.
        torch.set_flush_denormal(True)
        config = {"model": asdict(cfg), "train": {k: v for k, v in vars(args).items() if k not in asdict(cfg)}}
        tokens, labels = make_dataset(cfg)
        tokens, labels = tokens.to(device), labels.to(device)
        data = {"train_x": tokens[train_idx.to(device)], "train_y": labels[train_idx.to(device)],
                "test_x": tokens[test_idx.to(device)], "test_y": labels[test_idx.to(device)]}
        model = Transformer(cfg).to(device)
        print(f"p={cfg.p} op={cfg.op} train {len(train_idx)} / held-out {len(test_idx)} pairs, "
              f"{sum(t.numel() for t in model.parameters()):,} parameters, device {device}")
        if args.ckpt_every:
            run.path(files["checkpoints"]).mkdir()

        def save_checkpoint(epoch: int, metrics: dict) -> None:
            save_model(run.path(files["checkpoints"]) / checkpoint_name(epoch), model, train_idx,
                       {"config": config, "epoch": epoch, "split_seed": args.seed, "metrics": metrics})

        training = train(model, args, data, save_checkpoint)
        log_text = "".join(json.dumps(row) + "\n" for row in training.log)
        run.path(files["log"]).write_text(log_text)
        if training.divergence:
            stop = training.divergence
            save_weights(run.path(files["last_finite"]), stop.state, train_idx,
                       {"config": config, "status": "diverged", "diverged_at_epoch": stop.epoch,
                        "reason": stop.reason, "steps": stop.steps, "train_loss": stop.loss, "split_seed": args.seed})
            run.commit()
            loss = f", train loss {stop.loss:.4g}" if stop.loss is not None else ""
            raise HusaiError(f"training diverged at epoch {stop.epoch}: {stop.reason}; the last finite weights "
                             f"(after {stop.steps} steps{loss}) are in {run.final_path(files['last_finite'])} and "
                             f"there is no {run.final_path(files['model'])}; try a lower --lr")

        model.eval()
        measures = progress_measures(model, tokens, labels, train_idx.to(device))
        final = dict(without_timing(training.log[-1]), epochs_trained=training.epochs,
                     grokked_at_epoch=training.grokked_at, device=str(device))
        save_model(run.path(files["model"]), model, train_idx,
                   {"config": config, "epoch": training.epochs - 1, "split_seed": args.seed, "metrics": final,
                    "progress": measures})
        plot_training_curves(training.log, run.path(files["curves"]),
                             title=f"{cfg.op} mod {cfg.p}, train fraction {args.frac}")
        plot_fourier_spectrum(measures["embedding_frequency_shares"], measures["key_frequencies"],
                              run.path(files["fourier"]))
        run.commit()

    neurons = measures["neurons"][f"blocks.{cfg.n_layers - 1}.mlp_post"]
    print(f"\nsaved {out} and the run's other files in {out.parent} ({training.seconds:.1f} s on {device})")
    print(f"  held-out accuracy {final['test_acc']:.4f}, loss {final['test_loss']:.3g}; train accuracy "
          f"{final['train_acc']:.4f}; passed {args.target_acc} at epoch {training.grokked_at}")
    print(f"  key frequencies {measures['key_frequencies']} ({measures['key_frequency_rule']})")
    print(f"  MLP neurons explained by one frequency (purity >= {PURE_NEURON_THRESHOLD}): "
          f"{neurons['frac_explained']:.1%}, on a key frequency: {neurons['frac_explained_by_key_freq']:.1%}")
    if "restricted_loss" in measures:
        print(f"  restricted loss {measures['restricted_loss']:.3g}, excluded loss (train) "
              f"{measures['excluded_loss_train']:.3g} vs clean {measures['clean_loss_train']:.3g}")
    if training.grokked_at is None:
        print(f"  warning: held-out accuracy never reached {args.target_acc}; raise --epochs or --frac")


if __name__ == "__main__":
    run_cli(main, unit_outputs=True)
