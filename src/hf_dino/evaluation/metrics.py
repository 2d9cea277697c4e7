"""Accuracy through hf_dino's packaged `evaluate` modules (loaded by path, so offline)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch

METRICS_DIR = Path(__file__).parents[1] / "metrics"


@functools.cache
def load_metric(name: str):
    """One of hf_dino's `evaluate` modules (`accuracy`, `top_k_accuracy`), loaded by path: the
    Hub copies that `evaluate.load("accuracy")` fetches are unreachable offline."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").exists():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").exists())
        raise ValueError(f"Unknown metric {name!r}; hf_dino ships {', '.join(available)}")
    return evaluate.load(str(path))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percentage of rows of `scores` (N, C) whose label (N,) is among the k highest scores, for
    each k (ties broken by class index), through the packaged `top_k_accuracy` metric."""
    depth = min(max(topk), scores.shape[1])
    ranked = scores.argsort(dim=1, descending=True, stable=True)[:, :depth]
    cutoffs = [min(k, depth) for k in topk]
    fractions = load_metric("top_k_accuracy").compute(predictions=ranked.cpu().numpy(),
                                                      references=labels.cpu().numpy(), k=sorted(set(cutoffs)))
    return {f"top{k}": 100.0 * fractions[f"top{cutoff}"] for k, cutoff in zip(topk, cutoffs)}
