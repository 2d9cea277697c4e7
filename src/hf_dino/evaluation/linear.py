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

from .features import _vit_of, extract_features, probe_features
from .metrics import topk_accuracy
from ..schedules import cosine_schedule


def default_probe_layout(model: nn.Module) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patchtokens) of the reference: (4, False) for ViTs narrower than
    ViT-B (all blocks of shallower ones), (1, True) for ViT-B and wider."""
    vit = _vit_of(model)
    if vit is None:
        return 1, False
    if vit.config.hidden_size >= 768:
        return 1, True
    return min(4, vit.config.num_hidden_layers), False


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


def class_names(features, label_column: str, num_classes: int) -> list[str]:
    """The label names of a 🤗 dataset's `ClassLabel` column, else "0", "1", ... (num_classes)."""
    names = getattr((features or {}).get(label_column), "names", None)
    return list(names) if names and len(names) == num_classes else [str(index) for index in range(num_classes)]


def classifier_layout_problem(model: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool) -> str | None:
    """Why a probe with this layout has no transformers image-classification equivalent, or None.

    `ViTForImageClassification` applies its classifier to the final-norm CLS token of the last
    block only, so a probe on several blocks' CLS tokens (the reference's ViT-S layout) or with
    pooled patch tokens (its ViT-B layout) cannot be expressed as one.
    `ResNetForImageClassification` applies it to the pooled last stage: the ResNet probe feature.
    """
    backbone = getattr(model, "backbone", model)
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type == "resnet":
        return None
    if model_type != "vit":
        return f"a {model_type!r} backbone has no transformers image-classification counterpart here"
    if n_last_blocks != 1 or avgpool_patchtokens:
        return (f"the probe reads {n_last_blocks} blocks' CLS tokens{' and pooled patch tokens' if avgpool_patchtokens else ''}, "
                "but ViTForImageClassification classifies the last block's CLS token only; "
                "train with --n_last_blocks 1 --avgpool_patchtokens false to get one")
    return None


def save_image_classifier(model: nn.Module, classifier: nn.Linear, output_dir, labels: Sequence[str],
                          image_size: int, resize_ratio: float = 256 / 224, result: dict | None = None):
    """Write the frozen backbone + the trained linear layer as a transformers image classifier
    (`ViTForImageClassification` / `ResNetForImageClassification`): config with `id2label` /
    `label2id` from `labels`, `model.safetensors`, the evaluation image processor (shortest edge
    `image_size * resize_ratio`, centre crop `image_size`, as the probe was evaluated) and a
    short model card. `pipeline("image-classification", model=output_dir)` then predicts what the
    probe predicts, and `AutoModelForImageClassification` fine-tunes it further.

    Returns the folder, or None (with a log line saying why) when the probe's feature layout has
    no such counterpart (`classifier_layout_problem`); nothing is written then.
    `classifier`: Linear(F, C) with C = len(labels); `result`: `train_linear_probe`'s, for the card.
    """
    import copy
    import logging
    from pathlib import Path

    from transformers import ResNetForImageClassification, ViTForImageClassification

    from ..hub import evaluation_image_processor

    result = result or {}
    backbone = getattr(model, "backbone", model)
    n_last_blocks = int(result.get("n_last_blocks", 1))
    avgpool = bool(result.get("avgpool_patchtokens", False))
    problem = classifier_layout_problem(model, n_last_blocks, avgpool)
    if problem:
        logging.getLogger(__name__).warning("No image-classification folder saved: %s.", problem)
        return None
    if classifier.out_features != len(labels):
        raise ValueError(f"the classifier has {classifier.out_features} outputs but {len(labels)} labels were given")
    config = copy.deepcopy(backbone.config)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(map(str, labels)))
    config.label2id = {str(name): index for index, name in enumerate(labels)}
    backbone_state = {key: value for key, value in backbone.state_dict().items() if not key.startswith("pooler.")}
    if config.model_type == "vit":
        config.architectures = ["ViTForImageClassification"]
        image_classifier = ViTForImageClassification(config)
        state = {f"vit.{key}": value for key, value in backbone_state.items()}
        state.update({f"classifier.{key}": value for key, value in classifier.state_dict().items()})
    else:
        config.architectures = ["ResNetForImageClassification"]
        image_classifier = ResNetForImageClassification(config)
        state = {f"resnet.{key}": value for key, value in backbone_state.items()}
        state.update({f"classifier.1.{key}": value for key, value in classifier.state_dict().items()})
    image_classifier.load_state_dict({key: value.detach().cpu() for key, value in state.items()}, strict=True)
    output_dir = Path(output_dir)
    image_classifier.eval().save_pretrained(output_dir)
    evaluation_image_processor(image_size, resize_ratio).save_pretrained(output_dir)
    _image_classifier_card(config, result, image_size).save(output_dir / "README.md")
    return output_dir


def _image_classifier_card(config, result: dict, image_size: int):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="image-classification", license="apache-2.0",
                         tags=["dino", "self-supervised", "linear-probe", "hf_dino"])
    measured = (f"Top-1 **{result['top1']:.2f}%**, top-5 {result['top5']:.2f}% on {result.get('num_val', '?')} "
                f"held-out images after {result.get('epochs', '?')} epochs (lr {result.get('lr', '?')})."
                if "top1" in result else "")
    return ModelCard(f"""---
{data.to_yaml()}
---

# DINO linear probe: {config.architectures[0]}

A frozen DINO backbone with the linear classifier that hf_dino's linear evaluation
(`hf-dino-eval-linear`, the reference protocol) trained on its final-norm features, saved as a
plain `transformers.{config.architectures[0]}` with {config.num_labels} labels. {measured}

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="PATH_OR_HUB_ID")
classifier("image.jpg")  # [{{"label": ..., "score": ...}}, ...]
```

The image processor is the evaluation's: shortest edge resized, centre crop {image_size} px.
""")
