"""`CifarResNetModel`: transformers' `ResNetModel` with the small-image (CIFAR) stem.

The stem is one 3x3 stride-1 convolution + batch norm + activation and no max-pool (He et al.
2016, Sec. 4.2), so a 32 px image reaches the first stage at 32 x 32 instead of 8 x 8. Stages,
pooling, outputs and state-dict keys are `ResNetModel`'s (only the stem convolution's kernel is
3x3): `outputs.pooler_output` (B, C, 1, 1) is the globally pooled last stage.

transformers saves this file (with `configuration_cifar_resnet.py`) beside the weights as remote
code, so a saved backbone loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`
where hf_dino is not installed: it imports only transformers and torch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

from .configuration_cifar_resnet import CifarResNetConfig


class CifarResNetEmbeddings(nn.Module):
    """The CIFAR stem: (B, num_channels, H, W) -> (B, embedding_size, H, W)."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__()
        # Same submodule names as `ResNetEmbeddings` (embedder.embedder.convolution / .normalization).
        self.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1,
                                        activation=config.hidden_act)
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values have {pixel_values.shape[1]} channels but the model expects "
                             f"{self.num_channels} (config.num_channels)")
        return self.embedder(pixel_values)


class CifarResNetModel(ResNetModel):
    """`ResNetModel` whose stem is `CifarResNetEmbeddings`. Input (B, 3, H, W); `last_hidden_state`
    (B, hidden_sizes[-1], H / 2^(S-1), W / 2^(S-1)) for S stages (first stage not downsampled),
    `pooler_output` (B, hidden_sizes[-1], 1, 1)."""

    config_class = CifarResNetConfig
    config: CifarResNetConfig

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        self.embedder = CifarResNetEmbeddings(config)
        self.post_init()


__all__ = ["CifarResNetModel"]
