"""`DinoConfig`: the configuration of a DINO network (backbone + projection head).

The backbone is a transformers vision model config (`ViTConfig`, `ResNetConfig`, or hf_dino's
`CifarResNetConfig`: a ResNet with the small-image stem); the head
hyper-parameters follow Caron et al. 2021, Sec. 3.1 / Appendix (3-layer MLP, hidden 2048,
bottleneck 256, weight-normalised last layer of `out_dim` prototypes).
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig, ResNetConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_cifar_resnet import CifarResNetConfig

# A DinoConfig's backbone_config is parsed through AutoConfig, also where this file runs as remote code.
AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)

# Reference ViT dimensions (facebookresearch/dino vision_transformer.py, DeiT sizes).
VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3},
    "vit_small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "vit_base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
}
VIT_MLP_RATIO = 4
VIT_LAYER_NORM_EPS = 1e-6  # the reference's nn.LayerNorm(eps=1e-6); transformers defaults to 1e-12
# ResNet depths (blocks per stage) and block type, He et al. 2016 Table 1; the widths double per
# stage from `RESNET_WIDTH` (x4 at the output of a bottleneck stage).
RESNET_PRESETS: dict[str, dict] = {
    "resnet18": {"depths": [2, 2, 2, 2], "layer_type": "basic"},
    "resnet34": {"depths": [3, 4, 6, 3], "layer_type": "basic"},
    "resnet50": {"depths": [3, 4, 6, 3], "layer_type": "bottleneck"},
}
RESNET_WIDTH = 64
RESNET_ARCHS = tuple(RESNET_PRESETS)
RESNET_STEMS = ("imagenet", "cifar")
RESNET_MODEL_TYPES = ("resnet", CifarResNetConfig.model_type)
SUPPORTED_ARCHS = (*VIT_PRESETS, *RESNET_ARCHS)


def vit_dimensions(arch: str, num_hidden_layers: int | None = None, hidden_size: int | None = None,
                   num_attention_heads: int | None = None) -> dict[str, int]:
    """{"hidden_size", "num_hidden_layers", "num_attention_heads"} of a ViT preset with the given
    overrides (None keeps the preset's). ValueError when the heads do not divide the width."""
    dims = dict(VIT_PRESETS[arch])
    overrides = {"num_hidden_layers": num_hidden_layers, "hidden_size": hidden_size,
                 "num_attention_heads": num_attention_heads}
    dims.update({name: value for name, value in overrides.items() if value is not None})
    if min(dims["hidden_size"], dims["num_attention_heads"]) < 1 or dims["hidden_size"] % dims["num_attention_heads"]:
        raise ValueError(f"hidden_size {dims['hidden_size']} must be a positive multiple of num_attention_heads "
                         f"{dims['num_attention_heads']}")
    return dims


def build_backbone_config(
    arch: str,
    patch_size: int = 16,
    image_size: int = 224,
    *,
    num_hidden_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    resnet_stem: str = "imagenet",
) -> ViTConfig | ResNetConfig:
    """Return the transformers config of a named backbone preset.

    Args:
        arch: one of `SUPPORTED_ARCHS`.
        patch_size: ViT patch size in pixels (8 or 16 in the paper; any divisor of `image_size`).
        image_size: the global-crop resolution; other resolutions use `interpolate_pos_encoding`.
        num_hidden_layers: override the preset depth (small CPU demos); `None` keeps the preset.
        hidden_size / num_attention_heads: override the preset width and heads (the MLP stays 4x
            the width); `None` keeps the preset's. The width must be a multiple of the heads.
            For a ResNet, `hidden_size` is the stem's and first stage's width (64 in the paper's
            ResNets; the stages double it) and the other two must stay `None`.
        resnet_stem: "imagenet" (7x7 stride-2 convolution + max-pool: transformers' `ResNetConfig`) or
            "cifar" (3x3 stride-1 convolution, no max-pool, for 32 px images: `CifarResNetConfig`).
    """
    if arch in VIT_PRESETS:
        dims = vit_dimensions(arch, num_hidden_layers, hidden_size, num_attention_heads)
        return ViTConfig(
            **dims,
            intermediate_size=VIT_MLP_RATIO * dims["hidden_size"],
            hidden_act="gelu",
            layer_norm_eps=VIT_LAYER_NORM_EPS,
            qkv_bias=True,
            image_size=image_size,
            patch_size=patch_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    if arch in RESNET_PRESETS:
        if num_hidden_layers is not None or num_attention_heads is not None:
            raise ValueError(f"num_hidden_layers / num_attention_heads are ViT settings; {arch} takes only hidden_size "
                             "(its first stage's width)")
        if resnet_stem not in RESNET_STEMS:
            raise ValueError(f"resnet_stem {resnet_stem!r} is unknown; use one of {', '.join(RESNET_STEMS)}")
        width = RESNET_WIDTH if hidden_size is None else hidden_size
        if width < 1:
            raise ValueError(f"hidden_size {width} (the ResNet width) must be positive")
        preset = RESNET_PRESETS[arch]
        expansion = 4 if preset["layer_type"] == "bottleneck" else 1
        stem = {"image_size": image_size} if resnet_stem == "cifar" else {}
        return (CifarResNetConfig if resnet_stem == "cifar" else ResNetConfig)(
            **stem,
            embedding_size=width,
            hidden_sizes=[width * expansion * 2**stage for stage in range(len(preset["depths"]))],
            depths=list(preset["depths"]),
            layer_type=preset["layer_type"],
            hidden_act="relu",
        )
    raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}.")


class DinoConfig(PreTrainedConfig):
    r"""Configuration of [`DinoModel`]: a backbone and the DINO projection head.

    Args:
        backbone_config: config of the backbone (`ViTConfig` or `ResNetConfig`, or its dict).
        out_dim: number of prototypes K of the last head layer (65536 in the paper).
        head_hidden_dim: width of the two hidden MLP layers (2048).
        head_bottleneck_dim: dimension of the L2-normalised bottleneck (256).
        head_num_layers: number of MLP layers before the bottleneck (3).
        use_bn_in_head: batch norm after each hidden MLP layer (the ResNet-50 recipe).
        norm_last_layer: fix the weight-norm gain of the last layer to 1 (stabilises ViT training).
        drop_path_rate: stochastic depth of the ViT blocks during training (0.1 for the student).
    """

    model_type = "hf_dino"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit")}

    backbone_config: dict | PreTrainedConfig | None = None
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_num_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02

    @property
    def backbone_feature_dim(self) -> int:
        """Width of the feature the head receives: ViT CLS token or ResNet pooled output."""
        if self.backbone_config.model_type in RESNET_MODEL_TYPES:
            return self.backbone_config.hidden_sizes[-1]
        return self.backbone_config.hidden_size
