"""Frozen features of a backbone for every evaluation: loading a backbone (folder, Hub id or
`DinoModel`), the DINO feature of an image (CLS after the final norm), the readouts of several
blocks (linear probe, k-NN options) and batched extraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration_dino import RESNET_MODEL_TYPES


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
    if model_type in RESNET_MODEL_TYPES:
        return model(pixel_values=pixel_values).pooler_output.flatten(1)
    kwargs = {"interpolate_pos_encoding": True} if model_type == "vit" else {}
    return model(pixel_values=pixel_values, **kwargs).last_hidden_state[:, 0]


def _vit_of(model: nn.Module) -> nn.Module | None:
    """The `ViTModel` inside a `DinoModel` or the model itself; None for other backbones."""
    backbone = getattr(model, "backbone", model)
    return backbone if getattr(getattr(backbone, "config", None), "model_type", None) == "vit" else None


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


# k-NN readouts of a frozen ViT (`eval_knn --feature`): (n_last_blocks, avgpool_patchtokens) of
# `probe_features`. "cls" is the paper's feature.
KNN_FEATURES = {"cls": (1, False), "cls_mean_patch": (1, True), "last_blocks": (None, False)}


def knn_feature_fn(feature: str = "cls", n_last_blocks: int | None = None,
                   model: nn.Module | None = None) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The `feature_fn` of a k-NN readout: "cls" (`backbone_cls_features`), "cls_mean_patch" (the
    last block's CLS concatenated with its mean patch token, 2D) or "last_blocks" (the CLS tokens of
    the last `n_last_blocks` blocks concatenated, n_last_blocks * D; None: min(4, depth)), all after
    the final norm. A model that is not a ViT (ResNet, `RawPixels`) has its one feature whatever the
    readout. Given `model`, an impossible readout is a ValueError now rather than at the first batch."""
    if feature not in KNN_FEATURES:
        raise ValueError(f"feature {feature!r} is unknown; use one of {', '.join(KNN_FEATURES)}")
    if feature == "cls":
        return backbone_cls_features
    blocks, avgpool = KNN_FEATURES[feature]
    if model is not None and (vit := _vit_of(model)) is not None:
        depth = vit.config.num_hidden_layers
        if blocks is None and n_last_blocks is not None and not 1 <= n_last_blocks <= depth:
            raise ValueError(f"--n_last_blocks {n_last_blocks}: the backbone has {depth} blocks; give 1 to {depth}")

    def readout(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        vit = _vit_of(model)
        if vit is None:
            return backbone_cls_features(model, pixel_values)
        return probe_features(model, pixel_values, blocks or n_last_blocks or min(4, vit.config.num_hidden_layers),
                              avgpool)

    return readout


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


def load_frozen_backbone(name_or_path: str, device: torch.device | str = "cpu", random_init: bool = False,
                         seed: int = 0) -> tuple[nn.Module, int]:
    """Load a backbone for frozen evaluation: a `DinoModel` folder, or any ViT / ResNet model
    (`ViTModel`, e.g. facebook/dino-vits16, or `ResNetModel`). Returns (model, native image size).

    `random_init` builds the same architecture with freshly initialised weights (seeded): the
    baseline that pretraining has to beat.
    """
    from transformers import AutoConfig, AutoModel

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
