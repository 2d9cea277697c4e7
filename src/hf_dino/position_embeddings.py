"""2-D sine-cosine position embeddings, to initialise a ViT's learned position embeddings.

transformers' `ViTModel` (like the reference) starts its position embeddings from a truncated
normal of std 0.02, an order of magnitude below the patch embeddings (std ~0.3 at initialisation),
so a freshly initialised ViT is close to permutation-invariant: it sees a bag of patches until
training has taught it where each patch lies. Runs of a few hundred steps spend much of
themselves doing that. Starting from the fixed sinusoids of MAE and MoCo v3 (Vaswani et al.'s
sinusoids along each image axis) gives the model the patch grid from the first step; the
embeddings stay trainable, and the saved model is an ordinary `ViTModel`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_position_embedding(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid_size ** 2, dim) embedding of a grid_size x grid_size patch grid, patches in row-major order
    (the order of ViT's patch embedding: index = row * grid_size + column).

    Channels [0, dim / 2) encode the column x, [dim / 2, dim) the row y (MAE's order). Within each half,
    with q = dim / 4 and frequencies w_k = temperature ** (-k / q) for k = 0 .. q - 1: channel k is
    sin(w_k * position) and channel q + k is cos(w_k * position).
    """
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    frequencies = temperature ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (q,)
    rows, columns = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                   torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def axis(positions: torch.Tensor) -> torch.Tensor:  # (grid, grid) -> (grid ** 2, dim / 2)
        angles = positions.reshape(-1, 1) * frequencies  # (grid ** 2, q)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(columns), axis(rows)], dim=1).float()


@torch.no_grad()
def initialize_sincos_position_embeddings_(vit: nn.Module) -> None:
    """Set a transformers ViT's position embeddings (1, 1 + N, D) in place: zeros for the [CLS] token (as
    MAE), `sincos_position_embedding` for the N = (image_size / patch_size) ** 2 patches."""
    position_embeddings = vit.embeddings.position_embeddings
    num_patches, dim = position_embeddings.shape[1] - 1, position_embeddings.shape[2]
    grid_size = math.isqrt(num_patches)
    if grid_size * grid_size != num_patches:
        raise ValueError(f"{num_patches} patch positions do not form a square grid")
    position_embeddings[0, 0].zero_()
    position_embeddings[0, 1:].copy_(sincos_position_embedding(grid_size, dim).to(position_embeddings.dtype))


def initialize_position_embeddings_(vit: nn.Module, method: str) -> None:
    """A recipe's `position_embedding_init` on a freshly built transformers ViT: "random" keeps the
    model's own initialisation (truncated normal, std 0.02), "sincos" applies
    `initialize_sincos_position_embeddings_`."""
    if method == "sincos":
        initialize_sincos_position_embeddings_(vit)
    elif method != "random":
        raise ValueError(f"position_embedding_init {method!r} is unknown; use random or sincos")
