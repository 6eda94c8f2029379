"""A one-minute demo: a small MLP on scikit-learn's digits, with and without normlab BatchNorm.

``python -m normlab.demo`` (``make demo`` until the lab runs its quick suite).
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .nn import BatchNorm1d


def _mlp(batch_norm: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    width_in = 64
    for _ in range(3):
        layers.append(torch.nn.Linear(width_in, 100, bias=not batch_norm))
        if batch_norm:
            layers.append(BatchNorm1d(100))
        layers.append(torch.nn.Sigmoid())
        width_in = 100
    layers.append(torch.nn.Linear(width_in, 10))
    return torch.nn.Sequential(*layers)


def train_digits(
    batch_norm: bool, *, steps: int = 1500, lr: float = 0.5, seed: int = 0
) -> tuple[float, float]:
    """Train on digits with plain SGD; returns (test accuracy, seconds)."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=500, stratify=y, random_state=0)
    xtr_t, xte_t = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr_t, yte_t = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(seed)
    model = _mlp(batch_norm)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr_t), (60,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xtr_t[idx]), ytr_t[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(xte_t).argmax(1) == yte_t).float().mean().item()
    return acc, seconds


def main() -> None:
    print("digits, MLP 64-100-100-100-10 (sigmoid), SGD lr=0.5, batch 60, 1500 steps")
    for bn in (False, True):
        acc, sec = train_digits(bn)
        label = "normlab BatchNorm1d" if bn else "no normalization   "
        print(f"  {label}: test accuracy {acc:.3f}  ({sec:.1f} s)")


if __name__ == "__main__":
    main()
