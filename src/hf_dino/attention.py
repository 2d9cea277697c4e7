"""Self-attention maps of the last block (DINO Fig. 1 and 3): where the CLS token looks.

For a ViT with patch size p on an (H, W) image: the last block's attention of the CLS token
to the (H/p) * (W/p) patches, one map per head, upsampled to the image; and the masks that
keep the most-attended patches holding `keep_fraction` (60% in the paper) of each head's mass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn


def vit_backbone(model: nn.Module) -> nn.Module:
    """The `ViTModel` of a `DinoModel` or the model itself; a clear error for other backbones."""
    backbone = getattr(model, "backbone", model)
    if getattr(backbone.config, "model_type", None) != "vit":
        raise ValueError(f"Attention maps need a ViT backbone, got {getattr(backbone.config, 'model_type', None)!r}")
    return backbone


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` (a transformers model) on the eager attention implementation,
    the only one that returns attention weights, then restore the implementation it had (SDPA,
    flash, ...), also when the block raises. Same weights, same outputs."""
    previous = model.config._attn_implementation
    if previous == "eager":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def last_block_cls_attention(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> CLS-to-patch attention of the last block (B, heads, H/p, W/p).

    SDPA and flash attention do not return attention weights, so the backbone runs on the eager
    implementation for this call (`eager_attention`); its own implementation is restored after.
    """
    vit = vit_backbone(model)
    patch = vit.config.patch_size
    height, width = pixel_values.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {patch}")
    with eager_attention(vit):
        outputs = vit(pixel_values=pixel_values, output_attentions=True, interpolate_pos_encoding=True)
    attention = outputs.attentions[-1]  # (B, heads, 1 + N, 1 + N)
    cls_to_patches = attention[:, :, 0, 1:]  # (B, heads, N)
    return cls_to_patches.reshape(*cls_to_patches.shape[:2], height // patch, width // patch)


def attention_mass_masks(attention: torch.Tensor, keep_fraction: float = 0.6) -> torch.Tensor:
    """Boolean masks (same shape as `attention` (..., h, w)) keeping, per map, the fewest
    most-attended patches whose attention sums to at least `keep_fraction` of the map's total."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    flat = attention.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    mass = values / values.sum(dim=-1, keepdim=True)
    mass_before = mass.cumsum(dim=-1) - mass  # mass of the strictly more-attended patches
    keep_sorted = mass_before < keep_fraction
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(attention.shape)


def upsample_to_image(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., h, w) per-patch maps -> (..., h * p, w * p), each patch value repeated (nearest)."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def save_attention_figures(image: np.ndarray, attention: torch.Tensor, masks: torch.Tensor,
                           output_dir: str | Path, keep_fraction: float = 0.6) -> list[Path]:
    """Write the figures for one image.

    image (H, W, 3) uint8; attention (heads, H, W) float and masks (heads, H, W) bool at image
    resolution. Files: `image.png`, `attn-head{i}.png` (per-head heat map), and `overlay.png`
    (the image, then every head's map over it with its mask's outline).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "image.png"]
    plt.imsave(written[0], image)
    for head, heat in enumerate(attention.float().cpu().numpy()):
        path = output_dir / f"attn-head{head}.png"
        plt.imsave(path, heat, cmap="inferno")
        written.append(path)

    num_heads = attention.shape[0]
    columns = min(num_heads + 1, 4)
    rows = -(-(num_heads + 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("input")
    for head in range(num_heads):
        axis = axes.flat[head + 1]
        axis.imshow(image)
        axis.imshow(attention[head].float().cpu().numpy(), cmap="inferno", alpha=0.6)
        axis.contour(masks[head].cpu().numpy().astype(float), levels=[0.5], colors="cyan", linewidths=1)
        axis.set_title(f"head {head} ({int(keep_fraction * 100)}% mass)")
    figure.tight_layout()
    path = output_dir / "overlay.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)
    return written
