"""Frozen features of a backbone for every evaluation: loading a backbone (folder, Hub id or
`DinoModel`), the DINO feature of an image (CLS after the final norm) and batched extraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def load_frozen_backbone(name_or_path: str, device: torch.device | str = "cpu", random_init: bool = False,
                         seed: int = 0) -> tuple[nn.Module, int]:
    """Load a backbone for frozen evaluation: a `DinoModel` folder, or any ViT / ResNet model
    (`ViTModel`, e.g. facebook/dino-vits16, or `ResNetModel`). Returns (model, native image size).

    `random_init` builds the same architecture with freshly initialised weights (seeded): the
    baseline that pretraining has to beat.
    """
    from transformers import AutoConfig, AutoModel

    from .. import DinoConfig  # noqa: F401  (registers DinoModel with AutoModel)

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
