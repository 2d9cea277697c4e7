"""Linear probe: a linear classifier trained on frozen backbone features (DINO Sec. 4.1).

The reference protocol: the backbone is frozen; its feature is the concatenated CLS tokens
(after the final layer norm) of the last `n_last_blocks` blocks (4 for ViT-S), plus the
average-pooled patch tokens of the last block for ViT-B (`n_last_blocks=1`); a linear layer
is trained with SGD (momentum 0.9, lr scaled by batch / 256, cosine to 0) on random-resized
crops with flips, and evaluated on resized, centre-cropped images.

Several learning rates can be trained at once: every linear head sees the same frozen
features, so a sweep costs one backbone pass (`lrs=(...)`). The reported head is the one
with the best final top-1, as the reference's later sweep does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .features import extract_features
from .metrics import topk_accuracy
from ..schedules import cosine_schedule


def _vit_of(model: nn.Module) -> nn.Module | None:
    """The `ViTModel` inside a `DinoModel` or the model itself; None for other backbones."""
    backbone = getattr(model, "backbone", model)
    return backbone if getattr(backbone.config, "model_type", None) == "vit" else None


def default_probe_layout(model: nn.Module) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) of the reference: (4, False) for ViTs narrower than
    ViT-B (all blocks of shallower ones), (1, True) for ViT-B and wider."""
    vit = _vit_of(model)
    if vit is None:
        return 1, False
    if vit.config.hidden_size >= 768:
        return 1, True
    return min(4, vit.config.num_hidden_layers), False


def probe_features(model: nn.Module, pixel_values: torch.Tensor, n_last_blocks: int = 4,
                   avgpool_patchtokens: bool = False) -> torch.Tensor:
    """(B, 3, H, W) -> (B, F) frozen features for a linear probe.

    ViT: F = n_last_blocks * D (+ D with `avgpool_patchtokens`): the CLS token of each of the
    last blocks, each passed through the final layer norm. ResNet: the pooled last stage.
    """
    vit = _vit_of(model)
    if vit is None:
        backbone = getattr(model, "backbone", model)
        return backbone(pixel_values=pixel_values).pooler_output.flatten(1)
    num_blocks = vit.config.num_hidden_layers
    if not 1 <= n_last_blocks <= num_blocks:
        raise ValueError(f"n_last_blocks={n_last_blocks} but the backbone has {num_blocks} blocks")
    outputs = vit(pixel_values=pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
    blocks = [vit.layernorm(hidden) for hidden in outputs.hidden_states[-n_last_blocks:]]  # each (B, 1 + N, D)
    features = [block[:, 0] for block in blocks]
    if avgpool_patchtokens:
        features.append(blocks[-1][:, 1:].mean(dim=1))
    return torch.cat(features, dim=-1)


class LinearClassifiers(nn.Module):
    """One linear layer (F -> C) per learning rate; weights N(0, 0.01), zero bias (the reference)."""

    def __init__(self, in_dim: int, num_classes: int, num_heads: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_classes) for _ in range(num_heads))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, F) -> logits (num_heads, B, C)."""
        return torch.stack([head(features) for head in self.heads])


@dataclass
class LinearProbeConfig:
    epochs: int = 100
    batch_size: int = 256
    lrs: Sequence[float] = (0.001,)  # at a batch of 256; scaled by batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    n_last_blocks: int | None = None  # None: the reference's choice for the architecture
    avgpool_patchtokens: bool | None = None
    eval_every: int = 1  # epochs
    augment: bool = True  # False: train on centre crops, with features extracted once (fast on CPU)
    seed: int = 0


def _batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled mini-batches of cached (features (N, F), labels (N,))."""
    for index in torch.randperm(features.shape[0], generator=generator).split(batch_size):
        yield features[index], labels[index]


def train_linear_probe(model: nn.Module, train_loader, val_loader, num_classes: int, config: LinearProbeConfig,
                       device: torch.device | str = "cpu", train_eval_loader=None) -> dict:
    """Train `len(config.lrs)` linear heads on the frozen `model` and evaluate them every
    `eval_every` epochs on `val_loader` (batches {"pixel_values", "labels", "num_skipped"}).

    With `config.augment` the backbone runs on `train_loader`'s augmented batches every epoch;
    otherwise the features of `train_eval_loader` (centre crops) are extracted once.
    Returns {"top1", "top5" (final, best lr), "best_top1", "best_top5", "best_epoch", "lr",
    "per_lr": {lr: {...}}, "feature_dim", "n_last_blocks", "avgpool_patchtokens", "num_train", "num_val"}.
    """
    default_blocks, default_avgpool = default_probe_layout(model)
    n_last_blocks = config.n_last_blocks or default_blocks
    avgpool = default_avgpool if config.avgpool_patchtokens is None else config.avgpool_patchtokens

    def feature_fn(backbone, pixels):
        return probe_features(backbone, pixels, n_last_blocks, avgpool)

    model.eval().requires_grad_(False)
    val_features, val_labels, _ = extract_features(model, val_loader, device, "linear probe val features",
                                                   feature_fn=feature_fn, normalize=False)
    cached = None
    if not config.augment:
        cached = extract_features(model, train_eval_loader, device, "linear probe train features",
                                  feature_fn=feature_fn, normalize=False)[:2]
    torch.manual_seed(config.seed)
    classifiers = LinearClassifiers(val_features.shape[1], num_classes, len(config.lrs)).to(device)
    scaled_lrs = [lr * config.batch_size / 256.0 for lr in config.lrs]
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(classifiers.heads, scaled_lrs)],
        momentum=config.momentum, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(cached[0]) // config.batch_size) if cached else len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    history = {lr: [] for lr in config.lrs}
    num_train, step = 0, 0
    for epoch in tqdm(range(config.epochs), desc="linear probe epochs", leave=False):
        classifiers.train()
        num_train = 0
        if cached:
            batches = _batches(cached[0], cached[1], config.batch_size, generator)
        else:
            batches = ((feature_fn(model, batch["pixel_values"].to(device)).float(), batch["labels"])
                       for batch in train_loader if batch["pixel_values"].numel())
        for features, labels in batches:
            for group, lr in zip(optimizer.param_groups, scaled_lrs):
                group["lr"] = cosine_schedule(step, total_steps, lr, 0.0)
            features, labels = features.to(device), labels.to(device)
            logits = classifiers(features.detach())  # (H, B, C)
            # heads have disjoint parameters: one backward trains each on its own loss
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(len(config.lrs)),
                                               reduction="sum") / labels.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            num_train += labels.shape[0]
            step += 1
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            classifiers.eval()
            with torch.no_grad():
                val_logits = torch.cat([classifiers(chunk.to(device)).cpu()
                                        for chunk in val_features.split(4096)], dim=1)
            for lr, logits in zip(config.lrs, val_logits):
                history[lr].append({"epoch": epoch + 1, **topk_accuracy(logits, val_labels, (1, 5))})

    per_lr = {}
    for lr, rows in history.items():
        best = max(rows, key=lambda row: row["top1"])
        per_lr[lr] = {"top1": rows[-1]["top1"], "top5": rows[-1]["top5"], "best_top1": best["top1"],
                      "best_top5": best["top5"], "best_epoch": best["epoch"], "history": rows}
    chosen = max(config.lrs, key=lambda lr: per_lr[lr]["top1"])
    result = {key: per_lr[chosen][key] for key in ("top1", "top5", "best_top1", "best_top5", "best_epoch")}
    result.update(lr=chosen, per_lr={str(lr): values for lr, values in per_lr.items()}, epochs=config.epochs,
                  batch_size=config.batch_size, feature_dim=int(val_features.shape[1]), n_last_blocks=n_last_blocks,
                  avgpool_patchtokens=avgpool, augment=config.augment, num_train=num_train,
                  num_val=int(val_labels.shape[0]), classifier=classifiers.heads[config.lrs.index(chosen)])
    return result
