"""Train ``examples.digits.DigitsCNN`` on scikit-learn's digits and write the shipped example files.

Writes ``examples/digits_cnn.pth`` (a plain state_dict, with real trained BatchNorm statistics)
and ``examples/digits_val.pt`` (``{"inputs": float32 (N, 1, 8, 8), "labels": int64 (N,)}``, the
held-out 20%).  Seeded and single-threaded, so a rerun gives the same accuracy; it takes a few
seconds on a CPU and is not part of CI.  Needs scikit-learn (the data ships with it, no download).

    python scripts/train_digits.py [--epochs 30] [--out-dir examples]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.digits import DigitsCNN  # noqa: E402


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 digits as (N, 1, 8, 8) float32 in [0, 1]; a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_val = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "examples")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = load_data(args.seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            if len(batch) < 2:  # BatchNorm1d needs more than one sample in training mode
                continue
            opt.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  val accuracy {accuracy(model, x_val, y_val):.4f}")
    model.eval()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / "digits_cnn.pth")
    torch.save({"inputs": x_val.contiguous(), "labels": y_val.contiguous()}, args.out_dir / "digits_val.pt")
    print(f"trained in {time.perf_counter() - t0:.1f} s; train accuracy {accuracy(model, x_train, y_train):.4f}, "
          f"val accuracy {accuracy(model, x_val, y_val):.4f} on {len(y_val)} images")
    print(f"wrote {args.out_dir / 'digits_cnn.pth'} and {args.out_dir / 'digits_val.pt'}")


if __name__ == "__main__":
    main()
