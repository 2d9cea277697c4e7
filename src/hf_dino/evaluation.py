"""Frozen-feature evaluation: feature extraction and the paper's weighted k-NN classifier.

k-NN (Wu et al. 2018, as used by DINO Sec. 4.1): for each test feature, take the k most
cosine-similar training features; each votes for its label with weight exp(similarity / T);
the class scores rank the predictions (top-1 / top-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


class RawPixels(nn.Module):
    """Baseline "backbone" whose feature is the flattened normalised image (B, 3 * H * W)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(1)

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values)


def backbone_cls_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) frozen features of a `DinoModel`, `ViTModel` or `ResNetModel`.

    ViT: the CLS token after the final layer norm (the DINO feature; not `pooler_output`).
    ResNet: the globally pooled last stage.
    """
    if hasattr(model, "backbone_features"):
        return model.backbone_features(pixel_values)
    model_type = getattr(model.config, "model_type", None)
    if model_type == "resnet":
        return model(pixel_values=pixel_values).pooler_output.flatten(1)
    kwargs = {"interpolate_pos_encoding": True} if model_type == "vit" else {}
    return model(pixel_values=pixel_values, **kwargs).last_hidden_state[:, 0]


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
                     description: str = "features", disable_progress: bool = False,
                     feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = backbone_cls_features,
                     normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run a frozen model over batches {"pixel_values", "labels", "num_skipped"}.

    Returns features (N, D) float32 (`feature_fn(model, pixels)`, L2-normalised unless
    `normalize=False`), labels (N,) long, and the number of skipped (undecodable) images.
    """
    was_training = model.training
    model.eval()
    features, labels, skipped = [], [], 0
    for batch in tqdm(batches, desc=description, disable=disable_progress, leave=False):
        skipped += int(batch.get("num_skipped", 0))
        if batch["pixel_values"].numel() == 0:
            continue
        output = feature_fn(model, batch["pixel_values"].to(device)).float()
        features.append((nn.functional.normalize(output, dim=-1) if normalize else output).cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    if not features:
        raise ValueError("No decodable image in the evaluation data.")
    return torch.cat(features), torch.cat(labels), skipped


@torch.no_grad()
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     k: int, temperature: float, num_classes: int, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted k-NN class scores (N_test, C), computed `chunk_size` test rows at a time.

    Features must be L2-normalised: train (N_train, D), test (N_test, D); labels (N_train,).
    Memory is O(chunk_size * N_train), whatever N_test.
    """
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start:start + chunk_size] @ train_features.T  # (n, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (n, k)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(top_index.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


METRICS_DIR = Path(__file__).parent / "metrics"


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


def knn_evaluate(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024) -> dict[int, dict[str, float]]:
    """{k: {"top1", "top5"}} (percentages) for each k."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results = {}
    for k in ks:
        scores = knn_class_scores(train_features, train_labels, test_features, k, temperature, num_classes,
                                  chunk_size)
        results[k] = topk_accuracy(scores, test_labels, (1, 5))
    return results


def knn_evaluate_splits(model: nn.Module, train_split, val_split, *, crop_size: int, ks: Sequence[int] = (20,),
                        temperature: float = 0.07, image_column: str = "image", label_column: str = "label",
                        batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                        max_train_samples: int | None = None, chunk_size: int = 1024,
                        resize_ratio: float = 256 / 224) -> dict:
    """k-NN of a frozen model: `train_split` (a 🤗 `Dataset`) is the memory bank, `val_split` the
    queries, both resized to crop_size * resize_ratio and centre-cropped to crop_size (the
    reference's 256/224 by default; 1.0 keeps whole low-resolution images such as CIFAR's).
    Returns the `eval_knn` contract: {"top1", "top5", "k", "temperature", "num_train",
    "num_val", "num_skipped"} for the first k, plus {"per_k": {k: {"top1", "top5"}}}."""
    from .data import LabelledImageDataset, collate_labelled
    from .transforms import evaluation_transform

    if max_train_samples is not None:
        train_split = train_split.select(range(min(max_train_samples, len(train_split))))
    transform = evaluation_transform(crop_size, resize_ratio)
    extracted = {}
    for name, split in (("train", train_split), ("val", val_split)):
        loader = torch.utils.data.DataLoader(
            LabelledImageDataset(split, transform, image_column, label_column), batch_size=batch_size,
            num_workers=num_workers, collate_fn=collate_labelled)
        extracted[name] = extract_features(model, loader, device, f"k-NN {name} features")
    label_feature = (train_split.features or {}).get(label_column)
    num_classes = getattr(label_feature, "num_classes", None)
    (train_features, train_labels, train_skipped), (val_features, val_labels, val_skipped) = extracted.values()
    per_k = knn_evaluate(train_features, train_labels, val_features, val_labels, ks=ks, temperature=temperature,
                         num_classes=num_classes, chunk_size=chunk_size)
    first = per_k[ks[0]]
    return {"top1": first["top1"], "top5": first["top5"], "k": ks[0], "temperature": temperature,
            "num_train": len(train_labels), "num_val": len(val_labels), "num_skipped": train_skipped + val_skipped,
            "per_k": {int(k): v for k, v in per_k.items()}}


def load_frozen_backbone(name_or_path: str, device: torch.device | str = "cpu", random_init: bool = False,
                         seed: int = 0) -> tuple[nn.Module, int]:
    """Load a backbone for frozen evaluation: a `DinoModel` folder, or any ViT / ResNet model
    (`ViTModel`, e.g. facebook/dino-vits16, or `ResNetModel`). Returns (model, native image size).

    `random_init` builds the same architecture with freshly initialised weights (seeded): the
    baseline that pretraining has to beat.
    """
    from transformers import AutoConfig, AutoModel

    from . import DinoConfig  # noqa: F401  (registers DinoModel with AutoModel)

    config = AutoConfig.from_pretrained(name_or_path)
    if random_init:
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    else:
        model = AutoModel.from_pretrained(name_or_path)
    model = model.to(device).eval()
    backbone_config = getattr(config, "backbone_config", None) or config
    image_size = getattr(backbone_config, "image_size", 224)
    return model, int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
