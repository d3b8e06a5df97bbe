"""Planted dictionaries: data whose true features are known, an SAE trained on it as train_sae.py trains,
and the fraction of the true atoms it recovers. The planted tests in test_sae.py use these; as a command
they measure recovery over several seeds, with any setting changed:

    python -m tests.planted ARCH [--seeds 0 1 2 3 4] [--steps 1000] [--decay-frac 0.5] [--lr-factor 1]
                                 [--set name=value ...]

120 atoms in 40 dimensions, 3 active per input, noise 0.01, 16,384 inputs, width 120 at the true L0 (k 3,
or target_l0 3 for the penalty architectures), batches of 1024 in train_sae.py's data order (--data-seed 0
for every seed, as `train_sae.py --seeds ...` trains them). One CPU thread by default: the figures the
README quotes were measured so, and a different thread count rounds differently."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch

import train_sae
from sae_core import ARCHITECTURES, HusaiError, SAEConfig, SAETrainer, build_sae, default_lr, run_cli


def planted_data(n: int, d: int, m_true: int, active: int, seed: int = 1234,
                 noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x = s D + noise: a unit-norm dictionary D [m_true, d] and codes s with `active` entries per row drawn
    from U[0.5, 2.5], plus Gaussian noise of this standard deviation per coordinate. The default seed is
    one no SAE here uses: an SAE seed s draws its decoder with the same randn call from manual_seed(s), so
    with one seed for both an SAE of matching shape would start at the answer."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m_true, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    support = torch.rand(n, m_true, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, m_true).scatter(1, support, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ D + noise * torch.randn(n, d, generator=g), D


def recovered_fraction(D: torch.Tensor, W_dec: torch.Tensor, min_cosine: float = 0.9) -> float:
    """The fraction of true atoms (rows of D, unit) with a learned decoder row at cosine above min_cosine."""
    best = (D @ (W_dec / W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert best.max() <= 1 + 1e-5, "a cosine above 1 is a normalisation bug"
    return (best > min_cosine).double().mean().item()


def train_as_train_sae_does(cfg: SAEConfig, acts: torch.Tensor, steps: int = 1000, batch_size: int = 1024,
                            seed: int = 0, decay_frac: float = 0.5, lr_factor: float = 1.0) -> SAETrainer:
    """One seed trained as train_sae.py trains it by default: its learning rate (times lr_factor), warm-up,
    decay over the last decay_frac of the steps, and data order (--data-seed 0, whatever the seed)."""
    sae = build_sae(cfg, [seed])
    sae.init_from_data(acts)
    trainer = SAETrainer(sae, default_lr(cfg) * lr_factor, steps, 100, round(decay_frac * steps), use_kernels=False)
    stream = train_sae.batch_order(len(acts), batch_size, torch.Generator().manual_seed(0))
    for _ in range(steps):
        trainer.step(acts[next(stream)])
    return trainer


def planted_config(arch: str, **settings) -> SAEConfig:
    """The matched-width SAE of the planted measurement: width 120 at the true L0 of 3."""
    sparsity = {"target_l0": 3.0} if ARCHITECTURES[arch].penalty_coefficient else {"k": 3}
    return SAEConfig(arch=arch, d_in=40, width=120, **{**sparsity, **settings})


KIND_NAMES = {bool: "true or false", tuple: "a comma-separated list of numbers", int: "an integer", float: "a number",
              str: "a string"}


def parse_setting(text: str) -> tuple[str, object]:
    """name=value for an SAEConfig field, the value read as that field's type (lists comma-separated)."""
    name, _, value = text.partition("=")
    types = {f.name: type(f.default) for f in fields(SAEConfig)}
    if name not in types or not value:
        raise HusaiError(f"--set {text}: give name=value for one of the SAE settings ({', '.join(types)})")
    kind = types[name]
    try:
        if kind is bool:
            if value not in ("true", "false"):
                raise ValueError
            return name, value == "true"
        if kind is tuple:
            return name, tuple(float(v) for v in value.split(","))
        return name, kind(value)
    except ValueError:
        raise HusaiError(f"--set {text}: {value!r} is not {KIND_NAMES[kind]}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.planted", description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", choices=tuple(ARCHITECTURES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="SAE seeds, one after another")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (train_sae.py's default)")
    parser.add_argument("--decay-frac", type=float, default=0.5, help="the learning rate decays over this last "
                                                                     "fraction of the steps")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="the default learning rate times this")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="SAE settings, e.g. k_aux=1")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (rounding depends on them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = planted_config(args.arch, **dict(parse_setting(text) for text in args.set))
    acts, D = planted_data(16384, 40, 120, active=3, noise=0.01)
    recovered = []
    for seed in args.seeds:
        trainer = train_as_train_sae_does(cfg, acts, args.steps, seed=seed, decay_frac=args.decay_frac,
                                          lr_factor=args.lr_factor)
        tensors = trainer.sae.export(0)
        recovered.append(recovered_fraction(D, tensors["W_dec"]))
        dead = (trainer.inputs_since_fired[0] >= cfg.dead_window).float().mean().item()
        print(f"seed {seed}: recovered {recovered[-1]:.1%} of 120 atoms, {dead:.1%} of latents dead", flush=True)
    print(f"{' '.join([args.arch, *sys.argv[2:]])}: recovered {min(recovered):.1%}-{max(recovered):.1%} over seeds "
          f"{' '.join(map(str, args.seeds))}")


if __name__ == "__main__":
    run_cli(main)
