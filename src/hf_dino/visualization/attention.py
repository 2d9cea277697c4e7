"""Self-attention maps of the last block (DINO Fig. 1 and 3): where the CLS token looks.

For a ViT with patch size p on an (H, W) image: the last block's attention of the CLS token
to the (H/p) * (W/p) patches, one map per head, upsampled to the image; and the masks that
keep the most-attended patches holding `keep_fraction` (60% in the paper) of each head's mass.

One forward pass gives the maps (`cls_attention_and_feature`): every block but the last runs on
the model's own attention implementation (SDPA unless it was set otherwise; a model set to eager
runs on SDPA for the call), and the last block computes only the CLS token's row of its attention
((B, heads, 1 + N) scores instead of (B, heads, 1 + N, 1 + N) for every block). The app, the
attention figures, the attention video and the attention-segmentation evaluation share it.
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
def attention_implementation(model: nn.Module, implementation: str) -> Iterator[nn.Module]:
    """Run the block with `model` (a transformers model) on `implementation` ("eager", "sdpa",
    ...), then restore the implementation it had, also when the block raises. Same weights, same
    outputs."""
    previous = model.config._attn_implementation
    if previous == implementation:
        yield model
        return
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def eager_attention(model: nn.Module):
    """`attention_implementation(model, "eager")`: the only implementation that returns every
    block's (B, heads, 1 + N, 1 + N) attention weights (`output_attentions=True`)."""
    return attention_implementation(model, "eager")


@torch.no_grad()
def cls_attention_and_feature(model: nn.Module, pixel_values: torch.Tensor, return_feature: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pixel_values (B, 3, H, W), H and W multiples of the patch size p ->
    (CLS-to-patch attention of the last block (B, heads, H/p, W/p), DINO feature (B, D) or None).

    The feature is the CLS token after the final layer norm (`last_hidden_state[:, 0]`), from the
    same pass: the last block is only evaluated for the CLS token, whose output depends on the
    other tokens through its attention row alone. Position embeddings are interpolated to the
    grid as `ViTModel(..., interpolate_pos_encoding=True)` does. Memory: the activations of one
    block plus (B, heads, 1 + N) scores; no (1 + N) x (1 + N) matrix is kept.
    """
    vit = vit_backbone(model)
    patch = vit.config.patch_size
    height, width = pixel_values.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {patch}")
    pixel_values = pixel_values.to(vit.embeddings.patch_embeddings.projection.weight.dtype)
    implementation = "sdpa" if vit.config._attn_implementation == "eager" else vit.config._attn_implementation
    with attention_implementation(vit, implementation):
        hidden = vit.embeddings(pixel_values, interpolate_pos_encoding=True)  # (B, 1 + N, D)
        for layer in vit.layers[:-1]:
            hidden = layer(hidden, None)
    last = vit.layers[-1]
    attention = last.attention
    batch, tokens = hidden.shape[:2]
    normed = last.layernorm_before(hidden)
    query = attention.q_proj(normed[:, :1]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)  # (B, h, 1, d)
    key = attention.k_proj(normed).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)  # (B, h, 1 + N, d)
    scores = torch.matmul(query, key.transpose(2, 3)) * attention.scaling
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, h, 1, 1 + N)
    maps = weights[:, :, 0, 1:].reshape(batch, weights.shape[1], height // patch, width // patch)
    if not return_feature:
        return maps, None
    value = attention.v_proj(normed).view(batch, tokens, -1, attention.head_dim).transpose(1, 2)
    mixed = torch.matmul(weights, value).transpose(1, 2).reshape(batch, 1, -1)  # (B, 1, h * d)
    cls = hidden[:, :1] + last.dropout(attention.o_proj(mixed))
    cls = cls + last.dropout(last.mlp(last.layernorm_after(cls)))
    return maps, vit.layernorm(cls)[:, 0]


def last_block_cls_attention(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> CLS-to-patch attention of the last block (B, heads, H/p, W/p).

    `cls_attention_and_feature` without the feature: one pass, SDPA up to the last block, only
    the CLS row of the last block's attention computed.
    """
    return cls_attention_and_feature(model, pixel_values, return_feature=False)[0]


def attention_mass_masks(attention: torch.Tensor, keep_fraction: float = 0.6) -> torch.Tensor:
    """Boolean masks (same shape as `attention` (..., h, w)) keeping, per map, the fewest
    most-attended patches whose attention sums to at least `keep_fraction` of the map's total.

    The arithmetic is the reference's (`visualize_attention.py --threshold`): the map's values
    sorted in ascending order, divided by their sum, cumulated, and a patch kept when the
    cumulated share up to and including it exceeds `1 - keep_fraction` (compared in the map's
    dtype). So a patch is kept when the patches after it in that order hold less than
    `keep_fraction`; at an exact boundary the patch that completes the share is kept and the
    next one is not. Equal values keep their index order in the (stable) sort: of tied patches
    at the boundary, the later ones (in row-major order) are kept first.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    flat = attention.flatten(-2)
    ascending, order = flat.sort(dim=-1, stable=True)
    share = ascending / ascending.sum(dim=-1, keepdim=True)
    keep_sorted = share.cumsum(dim=-1) > (1 - keep_fraction)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
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
