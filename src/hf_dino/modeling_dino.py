"""`DinoModel`: a transformers backbone plus the DINO projection head, with multi-crop forward.

Shapes use B = images per crop, V = number of crops (views), D = backbone feature width,
K = `config.out_dim`.

transformers saves this file (and the files it imports relatively) with every `DinoModel` as its
remote code: it imports nothing of hf_dino but `configuration_dino` and the CIFAR-stem ResNet. Building a recipe's student
and teacher lives beside it, in `student_teacher.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import initialization as init
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_cifar_resnet import CifarResNetConfig
from .configuration_dino import DinoConfig
from .modeling_cifar_resnet import CifarResNetModel

# `AutoModel.from_pretrained` of a saved CIFAR-stem ResNet backbone, where hf_dino is imported.
AutoModel.register(CifarResNetConfig, CifarResNetModel, exist_ok=True)

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager")


def training_attention_implementation(requested: str, device_type: str, mixed_precision: str) -> str:
    """The ViT attention kernel to train with: `requested` unless it is "auto".

    "auto" is transformers' SDPA, except on a CPU under bf16/fp16 autocast, where it is "eager"
    (batched matmuls and a float32 softmax, as the reference computes attention): torch's CPU
    flash-attention kernel runs in bf16 2x (197 tokens) to 8x (37 tokens) slower than the
    matmuls, forward + backward, on a CPU with AMX, and 2x to 6x in fp16 (docs/BENCHMARKS.md).
    Both compute the same attention.
    """
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {requested!r} is unknown; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if requested != "auto":
        return requested
    return "eager" if device_type == "cpu" and mixed_precision in ("bf16", "fp16") else "sdpa"


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples during training.

    Replaces a `ViTLayer`'s residual-branch `nn.Dropout` (which holds no parameters), so the
    backbone keeps `ViTModel`'s exact state-dict keys. The surviving samples are scaled by
    1 / (1 - drop_prob) so the expectation is unchanged.
    """

    def __init__(self, drop_prob: float, dropout_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        """branch: (B, N, D) residual-branch output -> same shape."""
        branch = self.dropout(branch)
        if not self.training or self.drop_prob == 0.0:
            return branch
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        keep = torch.empty(mask_shape, dtype=branch.dtype, device=branch.device).bernoulli_(keep_prob)
        return branch * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def add_stochastic_depth(vit_model: nn.Module, drop_path_rate: float) -> None:
    """Give the blocks of a transformers `ViTModel` drop-path rates rising linearly 0 -> rate.

    Works in place and adds no parameters, like the reference's `dpr = linspace(0, rate, depth)`.
    """
    layers = vit_model.layers
    for index, layer in enumerate(layers):
        rate = drop_path_rate * index / max(len(layers) - 1, 1)
        layer.dropout = DropPath(rate, dropout_prob=layer.dropout.p)


def init_weight_norm_(weight_norm: parametrize.ParametrizationList) -> None:
    """The reference's `weight_norm(nn.Linear(bottleneck, K, bias=False))` then `weight_g = 1`:
    the direction v (K, bottleneck) keeps `nn.Linear`'s default init, U(-1/sqrt(bottleneck),
    1/sqrt(bottleneck)) (Kaiming-uniform with a = sqrt(5)), and the gain g (K, 1) is 1, so every
    prototype starts as a unit vector. `weight_norm` is `last_layer.parametrizations.weight`, which
    holds g (`original0`) and v (`original1`). Tensors already loaded from a checkpoint are left alone."""
    init.kaiming_uniform_(weight_norm.original1, a=math.sqrt(5))
    init.ones_(weight_norm.original0)


def dino_module_init_(module: nn.Module, initializer_range: float = 0.02) -> None:
    """The reference's `_init_weights` for one module: `nn.Linear` weights truncated normal
    (std `initializer_range`, cut at +-2), biases 0; LayerNorm / BatchNorm weight 1, bias 0
    (batch-norm statistics reset). The weight-normalised last layer is `init_weight_norm_`'s.

    Uses `transformers.initialization`, whose functions skip tensors that `from_pretrained` has
    already filled: so the same function initialises a fresh model and only the weights a
    checkpoint lacks.
    """
    if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
        init.trunc_normal_(module.weight, std=initializer_range)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        if module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if getattr(module, "running_mean", None) is not None:
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class DinoHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> weight-normalised linear layer of K prototypes.

    Input (N, D) features; output (N, K) logits. The MLP has `num_layers` linear layers
    (D -> hidden -> ... -> bottleneck) with GELU (and optional batch norm) in between.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"head_num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if index < num_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # weight = g * v / ||v|| row-wise; the parametrizations API (unlike the deprecated
        # nn.utils.weight_norm hook) works with torch.compile and deepcopy.
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.norm_last_layer = norm_last_layer
        self.reset_parameters(initializer_range)

    @property
    def last_layer_gain(self) -> nn.Parameter:
        """g of the weight norm, shape (K, 1)."""
        return self.last_layer.parametrizations.weight.original0

    def reset_parameters(self, initializer_range: float) -> None:
        """The reference's initialisation (`dino_module_init_`): truncated-normal MLP weights, zero
        biases, and a `nn.Linear`-initialised last layer whose gain is then set to 1 (frozen if normed)."""
        for module in self.mlp:
            dino_module_init_(module, initializer_range)
        init_weight_norm_(self.last_layer.parametrizations.weight)
        self.last_layer_gain.requires_grad_(not self.norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, D) -> logits (N, K)."""
        bottleneck = nn.functional.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(bottleneck)


@dataclass
class DinoModelOutput(ModelOutput):
    """
    logits: (V * B, K) head outputs, crops in input order (crop 0's batch first).
    features: (V * B, D) backbone features (ViT CLS token after the final norm, or ResNet pooled).
    """

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None


class DinoPreTrainedModel(PreTrainedModel):
    config_class = DinoConfig
    config: DinoConfig
    base_model_prefix = "dino"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the head's modules as the reference does (`dino_module_init_`).

        transformers 5 builds a model on the meta device in `from_pretrained` and then calls this
        hook on every module that holds a weight missing from the checkpoint (e.g. a folder
        without head weights). The backbone, a `PreTrainedModel` of its own, is initialised by
        its own `_init_weights` (ViT: normal(0, 0.02) linear weights, zero biases, LayerNorm 1/0).
        The hook only reaches modules holding parameters directly (hf_dino counts as custom code),
        so the last layer's weight norm is initialised through its `ParametrizationList`.
        """
        if isinstance(module, parametrize.ParametrizationList):  # the head's last layer: (g, v)
            init_weight_norm_(module)
        else:
            dino_module_init_(module, self.config.initializer_range)

class DinoModel(DinoPreTrainedModel):
    """Backbone + DINO head. `forward` takes one tensor or a list of crops of any resolutions.

    Consecutive crops of equal resolution run through the backbone as one batch (ViT crops
    whose size differs from `backbone_config.image_size` use transformers'
    `interpolate_pos_encoding`, i.e. bicubic resizing of the patch position grid to the
    exact target size, without the reference's +0.1 offset); the head then runs once on all
    features, as the reference's MultiCropWrapper does.
    """

    def __init__(self, config: DinoConfig):
        super().__init__(config)
        if config.backbone_config.model_type == CifarResNetConfig.model_type:  # direct: no remote-code prompt
            self.backbone = CifarResNetModel(config.backbone_config)
        else:
            self.backbone = AutoModel.from_config(config.backbone_config, **self._backbone_kwargs(config))
        if config.drop_path_rate > 0 and self.is_vit:
            add_stochastic_depth(self.backbone, config.drop_path_rate)
        self.head = DinoHead(
            in_dim=config.backbone_feature_dim,
            out_dim=config.out_dim,
            hidden_dim=config.head_hidden_dim,
            bottleneck_dim=config.head_bottleneck_dim,
            num_layers=config.head_num_layers,
            use_bn=config.use_bn_in_head,
            norm_last_layer=config.norm_last_layer,
            initializer_range=config.initializer_range,
        )
        self.post_init()

    @staticmethod
    def _backbone_kwargs(config: DinoConfig) -> dict:
        if config.backbone_config.model_type == "vit":
            return {"add_pooling_layer": False}
        return {}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the head's gain frozen again when
        `norm_last_layer` (loading replaces parameters, and with them `requires_grad`)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.head.last_layer_gain.requires_grad_(not model.config.norm_last_layer)
        return loaded

    @property
    def is_vit(self) -> bool:
        return self.config.backbone_config.model_type == "vit"

    def get_input_embeddings(self) -> nn.Module | None:
        """The ViT's patch embedding; None for a ResNet (Accelerate's FSDP2 preparation asks)."""
        return self.backbone.get_input_embeddings() if self.is_vit else None

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> (B, D) features. The pixels take the backbone's dtype (a bf16
        model, e.g. under DeepSpeed bf16, gets bf16 inputs), as transformers' ViT does itself."""
        if self.is_vit:
            output = self.backbone(pixel_values=pixel_values, interpolate_pos_encoding=True)
            return output.last_hidden_state[:, 0]
        pixel_values = pixel_values.to(self.backbone.dtype)
        return self.backbone(pixel_values=pixel_values).pooler_output.flatten(1)

    def forward(self, pixel_values: torch.Tensor | Sequence[torch.Tensor], **kwargs) -> DinoModelOutput:
        """pixel_values: (B, 3, H, W) or a list of V such tensors -> `DinoModelOutput`."""
        crops = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone_features(torch.cat(crops[start:end])))
            start = end
        features = torch.cat(features)
        return DinoModelOutput(logits=self.head(features), features=features)
