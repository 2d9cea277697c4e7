"""Convert facebookresearch/dino checkpoints to transformers models, and back.

Two kinds of files are released or written by the reference:
- backbone weights (`dino_deitsmall16_pretrain.pth`, `dino_resnet50_pretrain.pth`, ...): a flat
  state dict of the reference `VisionTransformer` or torchvision `resnet50`;
- full training checkpoints (`checkpoint.pth`): {"student", "teacher", "optimizer", "epoch",
  "args", "dino_loss", ...}, network keys prefixed by `module.` (DDP) and `backbone.` / `head.`
  (MultiCropWrapper).

Keys are renamed through one table per architecture, usable in both directions; the reference's
fused `qkv` projection is split into transformers' q/k/v (and fused back). Files are loaded with
`torch.load(weights_only=True)`, allowing only `argparse.Namespace` (the checkpoint's `args`)
beyond tensors and builtin containers.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig, ViTConfig

from .configuration_dino import VIT_LAYER_NORM_EPS, DinoConfig, build_backbone_config

# (reference key, transformers key). Placeholders: {i} any index, {p} weight|bias, {b} a batch-norm
# entry; {stage} and {conv} are 1-based in the reference and 0-based in transformers. A tuple on the
# right means the reference tensor is the concatenation (dim 0) of those transformers tensors.
VIT_KEYS = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "layers.{i}.layernorm_before.{p}"),
    ("blocks.{i}.attn.qkv.{p}", ("layers.{i}.attention.q_proj.{p}", "layers.{i}.attention.k_proj.{p}",
                                 "layers.{i}.attention.v_proj.{p}")),
    ("blocks.{i}.attn.proj.{p}", "layers.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.norm2.{p}", "layers.{i}.layernorm_after.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "layernorm.{p}"),
)
RESNET_KEYS = (
    ("conv1.weight", "embedder.embedder.convolution.weight"),
    ("bn1.{b}", "embedder.embedder.normalization.{b}"),
    ("layer{stage}.{i}.conv{conv}.weight", "encoder.stages.{stage}.layers.{i}.layer.{conv}.convolution.weight"),
    ("layer{stage}.{i}.bn{conv}.{b}", "encoder.stages.{stage}.layers.{i}.layer.{conv}.normalization.{b}"),
    ("layer{stage}.{i}.downsample.0.weight", "encoder.stages.{stage}.layers.{i}.shortcut.convolution.weight"),
    ("layer{stage}.{i}.downsample.1.{b}", "encoder.stages.{stage}.layers.{i}.shortcut.normalization.{b}"),
)
HEAD_KEYS = (
    ("mlp.{i}.{b}", "mlp.{i}.{b}"),  # Linear / BatchNorm1d / GELU positions coincide
    ("mlp.{p}", "mlp.0.{p}"),  # a 1-layer head is a bare Linear in the reference
    ("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
    ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
)
# torchvision's classifier (`fc`) is replaced by the identity in DINO; drop it when present.
DROPPED_REFERENCE_KEYS = re.compile(r"^fc\.(weight|bias)$")
# Newer PyTorch saves weight-normed layers with the parametrizations naming already.
PARAMETRIZED_LAST_LAYER = re.compile(r"^last_layer\.parametrizations\.weight\.original[01]$")

_PLACEHOLDERS = {"i": r"\d+", "stage": r"\d+", "conv": r"\d+", "p": r"weight|bias",
                 "b": r"weight|bias|running_mean|running_var|num_batches_tracked"}
_ONE_BASED = ("stage", "conv")  # reference value = transformers value + 1


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, body in _PLACEHOLDERS.items():
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{body})")
    return re.compile(f"^{regex}$")


def _rename(key: str, source: str, target, to_reference: bool):
    match = _pattern(source).match(key)
    if match is None:
        return None
    values = dict(match.groupdict())
    for name in _ONE_BASED:
        if name in values:
            values[name] = str(int(values[name]) + (1 if to_reference else -1))
    if isinstance(target, tuple):
        return tuple(t.format(**values) for t in target)
    return target.format(**values)


def reference_to_transformers(state_dict: Mapping[str, torch.Tensor], table) -> tuple[dict, list[str]]:
    """Rename a reference state dict through `table`; returns (converted, unknown keys)."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        for reference_template, transformers_template in table:
            target = _rename(key, reference_template, transformers_template, to_reference=False)
            if target is None:
                continue
            if isinstance(target, tuple):  # fused projection: split into equal parts
                for name, part in zip(target, tensor.chunk(len(target), dim=0)):
                    converted[name] = part.clone()
            else:
                converted[target] = tensor
            break
        else:
            unknown.append(key)
    return converted, unknown


def transformers_to_reference(state_dict: Mapping[str, torch.Tensor], table) -> tuple[dict, list[str]]:
    """Inverse of `reference_to_transformers`: (reference state dict, unknown keys)."""
    converted, unknown, fused_parts = {}, [], {}
    for key, tensor in state_dict.items():
        for reference_template, transformers_template in table:
            targets = transformers_template if isinstance(transformers_template, tuple) else (transformers_template,)
            hit = next(((position, template) for position, template in enumerate(targets)
                        if _pattern(template).match(key)), None)
            if hit is None:
                continue
            position, template = hit
            name = _rename(key, template, reference_template, to_reference=True)
            if len(targets) > 1:
                fused_parts.setdefault(name, [None] * len(targets))[position] = tensor
            else:
                converted[name] = tensor
            break
        else:
            unknown.append(key)
    for name, parts in fused_parts.items():
        if any(part is None for part in parts):
            unknown.append(f"{name} (incomplete: {sum(p is None for p in parts)} of {len(parts)} parts missing)")
        else:
            converted[name] = torch.cat(parts, dim=0)
    return converted, unknown


def load_reference_file(path: str | Path) -> dict:
    """`torch.load` with `weights_only=True`; only `argparse.Namespace` is allowed beyond tensors."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an unsafe global, or not a torch file at all
            raise ValueError(f"Cannot load {path} safely (weights_only=True): {error}") from None


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a network state dict into (backbone, head), removing `module.`/`backbone.`/`head.`."""
    backbone, head = {}, {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("head."):
            head[key.removeprefix("head.")] = tensor
        else:
            backbone[key.removeprefix("backbone.")] = tensor
    return backbone, head


def vit_config_from_reference(backbone: Mapping[str, torch.Tensor], num_attention_heads: int | None = None) -> ViTConfig:
    """Infer the ViT config (width, depth, patch, image size, heads) from reference weights."""
    hidden_size = backbone["cls_token"].shape[-1]
    depth = 1 + max(int(key.split(".")[1]) for key in backbone if key.startswith("blocks."))
    patch_size = backbone["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(backbone["pos_embed"].shape[1] - 1)
    heads = num_attention_heads or {192: 3, 384: 6, 768: 12}.get(hidden_size)
    if heads is None:
        raise ValueError(f"Cannot infer the number of attention heads of a width-{hidden_size} ViT; "
                         "pass --num_attention_heads")
    return ViTConfig(hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=heads,
                     intermediate_size=backbone["blocks.0.mlp.fc1.weight"].shape[0], hidden_act="gelu",
                     layer_norm_eps=VIT_LAYER_NORM_EPS, qkv_bias="blocks.0.attn.qkv.bias" in backbone,
                     image_size=grid * patch_size, patch_size=patch_size,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def head_config_from_reference(head: Mapping[str, torch.Tensor], norm_last_layer: bool = True) -> dict:
    """DinoConfig head fields inferred from reference head weights."""
    direction = head.get("last_layer.weight_v", head.get("last_layer.parametrizations.weight.original1"))
    if direction is None:
        raise ValueError("The head has no weight-normalised last layer (last_layer.weight_v)")
    if "mlp.weight" in head:
        num_layers, hidden_dim = 1, head["mlp.weight"].shape[0]
    else:
        linear_indices = sorted(int(key.split(".")[1]) for key in head
                                if re.fullmatch(r"mlp\.\d+\.weight", key) and head[key].ndim == 2)
        num_layers, hidden_dim = len(linear_indices), head[f"mlp.{linear_indices[0]}.weight"].shape[0]
    return {"out_dim": direction.shape[0], "head_bottleneck_dim": direction.shape[1], "head_hidden_dim": hidden_dim,
            "head_num_layers": num_layers, "norm_last_layer": norm_last_layer,
            "use_bn_in_head": any(key.endswith("running_mean") for key in head)}


@dataclass
class ConvertedCheckpoint:
    backbone_config: PreTrainedConfig
    backbone_state: dict  # transformers keys
    arch: str
    head_state: dict | None = None  # DinoHead keys, full checkpoints only
    dino_config: DinoConfig | None = None
    center: torch.Tensor | None = None  # (1, K) loss centre, full checkpoints only
    args: dict | None = None  # the reference run's arguments, full checkpoints only


def convert_reference_checkpoint(path: str | Path, checkpoint_key: str = "teacher",
                                 num_attention_heads: int | None = None) -> ConvertedCheckpoint:
    """Read a reference backbone release or full training checkpoint and convert its keys.

    Raises ValueError listing unknown reference keys (nothing is silently dropped except
    torchvision's unused `fc` classifier).
    """
    raw = load_reference_file(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    args = center = None
    if checkpoint_key in raw and isinstance(raw[checkpoint_key], Mapping):
        network = raw[checkpoint_key]
        if isinstance(raw.get("args"), argparse.Namespace):
            args = vars(raw["args"])
        if isinstance(raw.get("dino_loss"), Mapping) and "center" in raw["dino_loss"]:
            center = raw["dino_loss"]["center"]
    elif all(isinstance(value, torch.Tensor) for value in raw.values()):
        network = raw
    else:
        raise ValueError(f"{path}: no {checkpoint_key!r} entry (found {', '.join(map(str, raw))}); pass "
                         "--checkpoint_key student|teacher for a full checkpoint")
    backbone, head = strip_prefixes(network)
    dropped = [key for key in backbone if DROPPED_REFERENCE_KEYS.match(key)]
    for key in dropped:
        backbone.pop(key)
    if "cls_token" in backbone:
        arch_table, config = VIT_KEYS, vit_config_from_reference(backbone, num_attention_heads)
        arch = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}.get(config.hidden_size, "vit")
    elif "conv1.weight" in backbone:
        arch_table, config, arch = RESNET_KEYS, build_backbone_config("resnet50"), "resnet50"
    else:
        raise ValueError(f"{path}: neither a reference ViT (cls_token) nor a ResNet (conv1.weight); "
                         f"first keys: {', '.join(list(backbone)[:8])}")
    backbone_state, unknown = reference_to_transformers(backbone, arch_table)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} unknown backbone key(s): {', '.join(unknown[:20])}")
    converted = ConvertedCheckpoint(config, backbone_state, arch, center=center, args=args)
    if head:
        head_state, unknown = reference_to_transformers(head, HEAD_KEYS)
        for key in list(head):  # weight-norm already stored with the parametrizations naming
            if PARAMETRIZED_LAST_LAYER.match(key):
                head_state[key] = head[key]
                unknown.remove(key)
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} unknown head key(s): {', '.join(unknown[:20])}")
        norm_last_layer = bool(args.get("norm_last_layer", True)) if args else True
        converted.head_state = head_state
        converted.dino_config = DinoConfig(backbone_config=config,
                                           **head_config_from_reference(head, norm_last_layer))
    return converted


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict` that names every missing and unexpected key in one clear error."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model: missing {missing[:20]} ({len(missing)}), "
                         f"unexpected {unexpected[:20]} ({len(unexpected)})")
    model.load_state_dict(state_dict, strict=True)


def reference_vit_state_dict(model_state: Mapping[str, torch.Tensor]) -> dict:
    """A transformers `ViTModel` state dict -> the reference layout (pooler weights ignored)."""
    state = {k: v for k, v in model_state.items() if not k.startswith("pooler.")}
    converted, unknown = transformers_to_reference(state, VIT_KEYS)
    if unknown:
        raise ValueError(f"Keys without a reference counterpart: {unknown}")
    return converted


def recipe_of(converted: ConvertedCheckpoint):
    """A `DinoRecipe` describing the converted model (the reference run's args where known), for
    its image processor and model card."""
    import dataclasses

    from .recipe import DinoRecipe

    known = {f.name for f in dataclasses.fields(DinoRecipe)} - {"output_dir", "dataset_name", "num_workers"}
    values = {key: value for key, value in (converted.args or {}).items() if key in known}
    values["arch"] = converted.arch if converted.arch != "vit" else "vit_small"
    image_size = getattr(converted.backbone_config, "image_size", 224)
    values.update(patch_size=getattr(converted.backbone_config, "patch_size", 16), global_crop_size=image_size)
    try:
        return DinoRecipe.from_dict(values, source="checkpoint args")
    except (TypeError, ValueError):  # args of another code version: keep the architecture only
        return DinoRecipe(arch=values["arch"], patch_size=values["patch_size"], global_crop_size=image_size)


def save_converted(converted: ConvertedCheckpoint, output_dir: str | Path, source: str) -> dict:
    """Write the backbone folder (config, safetensors, image processor, card) to `output_dir`
    and, for full checkpoints, the `DinoModel` (with `dino_loss.safetensors`) to `output_dir/dino`."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    from .hub import save_backbone_folder
    from .modeling_dino import DinoModel

    output_dir = Path(output_dir)
    kwargs = {"add_pooling_layer": False} if converted.backbone_config.model_type == "vit" else {}
    backbone = AutoModel.from_config(converted.backbone_config, **kwargs)
    load_strict(backbone, converted.backbone_state, f"{source} (backbone)")
    recipe = recipe_of(converted)
    save_backbone_folder(backbone, output_dir, recipe, {"source": source})
    written = {"backbone": str(output_dir), "arch": converted.arch}
    if converted.head_state is not None:
        model = DinoModel(converted.dino_config)
        state = {f"backbone.{k}": v for k, v in converted.backbone_state.items()}
        state.update({f"head.{k}": v for k, v in converted.head_state.items()})
        load_strict(model, state, f"{source} (backbone + head)")
        model.save_pretrained(output_dir / "dino")
        if converted.center is not None:
            save_file({"center": converted.center.contiguous()}, str(output_dir / "dino" / "dino_loss.safetensors"))
        written["dino"] = str(output_dir / "dino")
    return written


__all__ = [
    "ConvertedCheckpoint", "HEAD_KEYS", "RESNET_KEYS", "VIT_KEYS", "convert_reference_checkpoint",
    "load_reference_file", "load_strict", "reference_to_transformers", "reference_vit_state_dict",
    "transformers_to_reference", "vit_config_from_reference",
]
