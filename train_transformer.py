"""Stage 1: train a small transformer until it groks modular arithmetic.

    python train_transformer.py                 # default: fast, about a minute on a 2-core CPU
    python train_transformer.py --frac 0.3      # the published recipe (Nanda et al. 2023): slow, faithful

The model reads [a, b, =] (or [a, op, b, =]) and predicts c = a op b mod p at the `=` position; c is
never an input token. Training is full batch AdamW with weight decay 1.0, which is what makes the model
generalise by learning a handful of Fourier frequencies. Outputs, in --out's folder:
    model.safetensors   weights, the train/test split, config, metrics and progress measures
    log.jsonl           one line of metrics per evaluation
    checkpoints/        epochNNNNNN.safetensors every --ckpt-every epochs (stage 2 can train on them)
    curves.png, fourier.png

This file is also the library for the model: later stages import make_dataset, load_transformer,
activations_from and run_with_replacement from here.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F_nn
from einops import rearrange

from sae_core import (KEY_FREQUENCY_MIN_SHARE, PURE_NEURON_THRESHOLD, CliParser, HusaiError, embedding_spectrum,
                      fourier_purity, load_tensors, pick_device, prepare_output, read_acts_file, run_cli, save_tensors,
                      seed_everything, sum_frequency_directions)

FORMAT = "husai.transformer"
VERSION = 1
OPERATIONS = {"add": lambda a, b, p: (a + b) % p, "sub": lambda a, b, p: (a - b) % p,
              "mul": lambda a, b, p: (a * b) % p}
HOOK_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")


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
    add("--out", default="runs/transformer/model.safetensors", help="output model file")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    add("--force", action="store_true", help="overwrite an existing run at --out")
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


def checkpoint_path(model_path: str | Path, epoch: int) -> Path:
    return Path(model_path).parent / "checkpoints" / f"epoch{epoch:06d}.safetensors"


def load_transformer(path: str | Path, checkpoint: int | None = None,
                     device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Load a model written by this stage (or one of its checkpoints, by epoch). Returns (model in
    eval mode, metadata with config, split and metrics)."""
    file = checkpoint_path(path, checkpoint) if checkpoint is not None else Path(path)
    if checkpoint is not None and not file.is_file():
        raise HusaiError(f"{file}: no checkpoint at epoch {checkpoint}; saved epochs: "
                         f"{', '.join(str(e) for e in list_checkpoints(path)) or 'none'}")
    tensors, meta = load_tensors(file, FORMAT, VERSION, required=("split.train_indices",),
                                 hint="python train_transformer.py")
    model = Transformer(ModelConfig(**meta["config"]["model"]))
    expected = set(model.state_dict())
    missing = sorted(expected - set(tensors))
    if missing:
        raise HusaiError(f"{file}: missing tensor(s) {', '.join(missing)}")
    model.load_state_dict({name: tensors[name] for name in expected})
    meta["train_indices"] = tensors["split.train_indices"]
    return model.to(device).eval(), meta


def list_checkpoints(model_path: str | Path) -> list[int]:
    folder = Path(model_path).parent / "checkpoints"
    return sorted(int(f.stem.removeprefix("epoch")) for f in folder.glob("epoch*.safetensors"))


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
    if args.p < 3:
        raise HusaiError(f"--p {args.p}: the modulus must be at least 3")
    if not 0 < args.frac < 1:
        raise HusaiError(f"--frac {args.frac}: the training fraction must lie strictly between 0 and 1")
    if args.d_model % args.heads:
        raise HusaiError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    positive = {"--layers": args.layers, "--d-model": args.d_model, "--d-mlp": args.d_mlp,
                "--epochs": args.epochs, "--eval-every": args.eval_every, "--lr": args.lr}
    for flag, value in positive.items():
        if value <= 0:
            raise HusaiError(f"{flag} {value}: must be positive")
    if args.wd < 0 or args.warmup < 0 or args.extra_epochs < 0 or args.ckpt_every < 0:
        raise HusaiError("--wd, --warmup, --extra-epochs and --ckpt-every must not be negative")


def save_model(path: Path, model: Transformer, train_idx: torch.Tensor, metadata: dict) -> None:
    tensors = dict(model.state_dict())
    tensors["split.train_indices"] = train_idx
    save_tensors(path, tensors, FORMAT, VERSION, metadata)


def main() -> None:
    args = build_parser().parse_args()
    validate(args)
    device = pick_device(args.device)
    out = prepare_output(args.out, args.force)
    if args.force:   # an explicit overwrite: drop the old run's checkpoints so none outlive it
        shutil.rmtree(out.parent / "checkpoints", ignore_errors=True)
    seed_everything(args.seed)
    # Once the loss reaches ~1e-7, gradients and Adam's moments underflow into denormal floats, which
    # the CPU processes ~10x slower: flushing them to zero keeps late epochs as fast as early ones.
    torch.set_flush_denormal(True)

    cfg = ModelConfig(p=args.p, op=args.op, token_format=args.token_format, n_layers=args.layers,
                      d_model=args.d_model, n_heads=args.heads, d_mlp=args.d_mlp, layernorm=args.layernorm)
    config = {"model": asdict(cfg), "train": {k: v for k, v in vars(args).items() if k not in asdict(cfg)}}
    tokens, labels = make_dataset(cfg)
    train_idx, test_idx = train_test_split(cfg.p, args.frac, args.seed)
    tokens, labels = tokens.to(device), labels.to(device)
    train_x, train_y = tokens[train_idx.to(device)], labels[train_idx.to(device)]
    test_x, test_y = tokens[test_idx.to(device)], labels[test_idx.to(device)]
    model = Transformer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)))
    print(f"p={cfg.p} op={cfg.op} train {len(train_idx)} / held-out {len(test_idx)} pairs, "
          f"{sum(t.numel() for t in model.parameters()):,} parameters, device {device}")

    from tqdm import tqdm
    log_path = out.parent / "log.jsonl"
    log, grokked_at, start = [], None, time.time()
    with open(log_path, "w") as log_file, tqdm(range(args.epochs), unit="epoch", mininterval=0.5) as bar:
        for epoch in bar:
            logits = model(train_x)
            loss = F_nn.cross_entropy(logits, train_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            warmup.step()

            last = epoch == args.epochs - 1 or (grokked_at is not None and epoch >= grokked_at + args.extra_epochs)
            if epoch % args.eval_every == 0 or last:
                with torch.no_grad():
                    test_logits = model(test_x)
                row = {"epoch": epoch, "train_loss": loss.item(),
                       "train_acc": (logits.argmax(-1) == train_y).float().mean().item(),
                       "test_loss": F_nn.cross_entropy(test_logits, test_y).item(),
                       "test_acc": (test_logits.argmax(-1) == test_y).float().mean().item(),
                       "seconds": round(time.time() - start, 2)}
                log.append(row)
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(train_loss=f"{row['train_loss']:.2e}", test_loss=f"{row['test_loss']:.2e}",
                                train_acc=f"{row['train_acc']:.3f}", test_acc=f"{row['test_acc']:.3f}")
                if grokked_at is None and row["test_acc"] >= args.target_acc:
                    grokked_at = epoch
            if args.ckpt_every and epoch % args.ckpt_every == 0:
                checkpoint = checkpoint_path(out, epoch)
                checkpoint.parent.mkdir(exist_ok=True)
                save_model(checkpoint, model, train_idx, {"config": config, "epoch": epoch, "split_seed": args.seed,
                                                          "metrics": log[-1]})
            if last:
                break

    model.eval()
    measures = progress_measures(model, tokens, labels, train_idx.to(device))
    final = dict(log[-1], epochs_trained=epoch + 1, grokked_at_epoch=grokked_at,
                 train_seconds=round(time.time() - start, 1), device=str(device))
    save_model(out, model, train_idx, {"config": config, "epoch": epoch, "split_seed": args.seed,
                                       "metrics": final, "progress": measures})
    plot_training_curves(log, out.parent / "curves.png", title=f"{cfg.op} mod {cfg.p}, train fraction {args.frac}")
    plot_fourier_spectrum(measures["embedding_frequency_shares"], measures["key_frequencies"],
                          out.parent / "fourier.png")

    neurons = measures["neurons"][f"blocks.{cfg.n_layers - 1}.mlp_post"]
    print(f"\nsaved {out} ({final['train_seconds']} s on {device})")
    print(f"  held-out accuracy {final['test_acc']:.4f}, loss {final['test_loss']:.3g}; train accuracy "
          f"{final['train_acc']:.4f}; passed {args.target_acc} at epoch {grokked_at}")
    print(f"  key frequencies {measures['key_frequencies']} ({measures['key_frequency_rule']})")
    print(f"  MLP neurons explained by one frequency (purity >= {PURE_NEURON_THRESHOLD}): "
          f"{neurons['frac_explained']:.1%}, on a key frequency: {neurons['frac_explained_by_key_freq']:.1%}")
    if "restricted_loss" in measures:
        print(f"  restricted loss {measures['restricted_loss']:.3g}, excluded loss (train) "
              f"{measures['excluded_loss_train']:.3g} vs clean {measures['clean_loss_train']:.3g}")
    if grokked_at is None:
        print(f"  warning: held-out accuracy never reached {args.target_acc}; raise --epochs or --frac")


if __name__ == "__main__":
    run_cli(main)
