"""Conversion of reference checkpoints, checked against an independent reference ViT forward."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, ResNetModel, ViTModel

import hf_dino  # noqa: F401
from hf_dino.configuration_dino import build_backbone_config
from hf_dino.conversion import (HEAD_KEYS, RESNET_KEYS, VIT_KEYS, convert_reference_checkpoint,
                                reference_to_transformers, transformers_to_reference)

REPO = Path(__file__).resolve().parents[1]


def reference_vit_weights(dim=384, depth=12, patch=16, image_size=224, seed=0) -> dict:
    """A state dict in the reference VisionTransformer layout, random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02):
        return torch.randn(*shape, generator=generator) * scale

    grid = image_size // patch
    weights = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, grid * grid + 1, dim),
               "patch_embed.proj.weight": rand(dim, 3, patch, patch), "patch_embed.proj.bias": rand(dim),
               "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}
    for i in range(depth):
        weights.update({
            f"blocks.{i}.norm1.weight": 1 + rand(dim), f"blocks.{i}.norm1.bias": rand(dim),
            f"blocks.{i}.attn.qkv.weight": rand(3 * dim, dim), f"blocks.{i}.attn.qkv.bias": rand(3 * dim),
            f"blocks.{i}.attn.proj.weight": rand(dim, dim), f"blocks.{i}.attn.proj.bias": rand(dim),
            f"blocks.{i}.norm2.weight": 1 + rand(dim), f"blocks.{i}.norm2.bias": rand(dim),
            f"blocks.{i}.mlp.fc1.weight": rand(4 * dim, dim), f"blocks.{i}.mlp.fc1.bias": rand(4 * dim),
            f"blocks.{i}.mlp.fc2.weight": rand(dim, 4 * dim), f"blocks.{i}.mlp.fc2.bias": rand(dim)})
    return weights


def reference_vit_forward(w: dict, images: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The paper's ViT (pre-norm blocks, fused qkv, GELU MLP, LayerNorm eps 1e-6), from scratch:
    returns the final-norm CLS token (B, D)."""
    f = torch.nn.functional
    dim = w["cls_token"].shape[-1]
    x = f.conv2d(images, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
                 stride=w["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        h = f.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        batch, tokens, _ = h.shape
        qkv = (h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]).reshape(batch, tokens, 3, num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + h @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = f.layer_norm(x, (dim,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        h = f.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    return f.layer_norm(x, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)[:, 0]


def reference_head_weights(in_dim=384, hidden=64, bottleneck=16, out_dim=128, use_bn=False, seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    dims = [in_dim, hidden, hidden, bottleneck]
    weights, index = {}, 0
    for layer, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        weights[f"mlp.{index}.weight"] = torch.randn(d_out, d_in, generator=generator) * 0.02
        weights[f"mlp.{index}.bias"] = torch.randn(d_out, generator=generator) * 0.02
        index += 1
        if layer < 2:
            if use_bn:
                weights.update({f"mlp.{index}.weight": torch.rand(d_out, generator=generator) + 0.5,
                                f"mlp.{index}.bias": torch.randn(d_out, generator=generator) * 0.1,
                                f"mlp.{index}.running_mean": torch.randn(d_out, generator=generator) * 0.1,
                                f"mlp.{index}.running_var": torch.rand(d_out, generator=generator) + 0.5,
                                f"mlp.{index}.num_batches_tracked": torch.tensor(7)})
                index += 1
            index += 1  # GELU
    weights["last_layer.weight_g"] = torch.ones(out_dim, 1)
    weights["last_layer.weight_v"] = torch.randn(out_dim, bottleneck, generator=generator)
    return weights


def torchvision_resnet50_weights(seed=0) -> dict:
    """torchvision resnet50 key layout, derived from transformers' model through the inverse table
    (so that the forward round trip below is a real check of both directions)."""
    torch.manual_seed(seed)
    model = ResNetModel(build_backbone_config("resnet50"))
    reference, unknown = transformers_to_reference(model.state_dict(), RESNET_KEYS)
    assert not unknown
    return reference


def test_vit_key_mapping_round_trips_both_ways():
    reference = reference_vit_weights(dim=64, depth=3)
    converted, unknown = reference_to_transformers(reference, VIT_KEYS)
    assert not unknown
    assert set(converted) == set(ViTModel(build_backbone_config("vit_tiny", 16, 224, num_hidden_layers=3),
                                          add_pooling_layer=False).state_dict())
    back, unknown = transformers_to_reference(converted, VIT_KEYS)
    assert not unknown and back.keys() == reference.keys()
    for key in reference:
        assert torch.equal(back[key], reference[key]), key
    torch.testing.assert_close(converted["layers.1.attention.k_proj.weight"],
                               reference["blocks.1.attn.qkv.weight"][64:128])


def test_resnet_key_mapping_uses_torchvision_names_and_round_trips():
    reference = torchvision_resnet50_weights()
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer4.2.bn3.weight",
            "layer3.0.downsample.0.weight", "layer2.0.downsample.1.num_batches_tracked"} <= set(reference)
    assert len([k for k in reference if k.endswith("conv1.weight")]) == 1 + 3 + 4 + 6 + 3
    converted, unknown = reference_to_transformers(reference, RESNET_KEYS)
    assert not unknown
    back, _ = transformers_to_reference(converted, RESNET_KEYS)
    assert all(torch.equal(back[k], v) for k, v in reference.items())


@pytest.mark.parametrize("use_bn", [False, True])
def test_head_key_mapping_round_trips(use_bn):
    reference = reference_head_weights(use_bn=use_bn)
    converted, unknown = reference_to_transformers(reference, HEAD_KEYS)
    assert not unknown
    back, unknown = transformers_to_reference(converted, HEAD_KEYS)
    assert not unknown and all(torch.equal(back[k], v) for k, v in reference.items())


def test_converted_vit_small_16_matches_the_reference_forward(tmp_path):
    reference = reference_vit_weights()  # ViT-S/16 at 224 px, as dino_deitsmall16_pretrain.pth
    torch.save(reference, tmp_path / "dino_deitsmall16_pretrain.pth")
    converted = convert_reference_checkpoint(tmp_path / "dino_deitsmall16_pretrain.pth")
    assert converted.arch == "vit_small" and converted.backbone_config.num_attention_heads == 6
    from hf_dino.conversion import save_converted

    save_converted(converted, tmp_path / "out", "dino_deitsmall16_pretrain.pth")
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(model) is ViTModel
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(pixel_values=images).last_hidden_state[:, 0]
        expected = reference_vit_forward(reference, images, num_heads=6)
        pooled = model(pixel_values=images).pooler_output
    assert (ours - expected).abs().max().item() < 1e-5
    torch.testing.assert_close(pooled, ours, rtol=0, atol=0)  # identity pooler: pool=True gives the DINO feature
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())  # the reference's eval
    assert processor["size"] == {"shortest_edge": 256} and processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["do_center_crop"] and processor["do_convert_rgb"] and processor["resample"] == 3  # bicubic


def full_checkpoint(tmp_path, use_bn=False, with_module_prefix=True) -> Path:
    backbone = reference_vit_weights(dim=192, depth=2, patch=8, image_size=32)
    head = reference_head_weights(in_dim=192, use_bn=use_bn)
    prefix = "module." if with_module_prefix else ""
    student = {f"{prefix}backbone.{k}": v for k, v in backbone.items()} | {f"{prefix}head.{k}": v for k, v in head.items()}
    teacher = {f"backbone.{k}": v + 1 for k, v in backbone.items()} | {f"head.{k}": v for k, v in head.items()}
    args = argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=128, norm_last_layer=True, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), momentum_teacher=0.996, some_future_flag="x")
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "args": args, "dino_loss": {"center": torch.arange(128.0)[None]}}, path)
    return path


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_full_training_checkpoint_gives_backbone_and_dino_model(tmp_path, key):
    path = full_checkpoint(tmp_path, use_bn=True)
    completed = subprocess.run([sys.executable, str(REPO / "scripts/convert_dino_checkpoint.py"), "--checkpoint",
                                str(path), "--output_dir", str(tmp_path / "out"), "--checkpoint_key", key],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    written = json.loads(completed.stdout[completed.stdout.index("{"):])
    assert written["arch"] == "vit_tiny"
    raw = torch.load(path, weights_only=False)[key]
    backbone = AutoModel.from_pretrained(tmp_path / "out")
    expected_cls = raw[("module." if key == "student" else "") + "backbone.cls_token"]
    torch.testing.assert_close(backbone.embeddings.cls_token, expected_cls)
    dino = AutoModel.from_pretrained(tmp_path / "out" / "dino")
    assert dino.config.use_bn_in_head and dino.config.out_dim == 128 and dino.config.head_hidden_dim == 64
    torch.testing.assert_close(dino.head.mlp[1].running_mean, raw[("module." if key == "student" else "") +
                                                                   "head.mlp.1.running_mean"])
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "out/dino/dino_loss.safetensors"))["center"], torch.arange(128.0)[None])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "checkpoint.pth" in card and "| `momentum_teacher` | `0.996` |" in card
    assert str(tmp_path) not in card  # the source file's name only, never its local path


def test_unknown_keys_are_listed(tmp_path):
    weights = reference_vit_weights(dim=64, depth=1)
    weights["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    torch.save(weights, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"1 unknown backbone key\(s\): blocks.0.attn.rel_pos_bias"):
        convert_reference_checkpoint(tmp_path / "odd.pth", num_attention_heads=2)


def test_missing_keys_are_listed(tmp_path):
    from hf_dino.conversion import save_converted

    weights = reference_vit_weights(dim=64, depth=2)
    del weights["blocks.1.mlp.fc2.bias"]
    torch.save(weights, tmp_path / "partial.pth")
    converted = convert_reference_checkpoint(tmp_path / "partial.pth", num_attention_heads=2)
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.fc2.bias'\]"):
        save_converted(converted, tmp_path / "out", "partial.pth")


def test_unsafe_pickles_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(1), "payload": Path("/etc/passwd")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_reference_checkpoint(tmp_path / "evil.pth")


def test_torchvision_resnet50_release_converts(tmp_path):
    reference = torchvision_resnet50_weights(seed=4)
    reference["fc.weight"], reference["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # dropped
    torch.save(reference, tmp_path / "dino_resnet50_pretrain.pth")
    converted = convert_reference_checkpoint(tmp_path / "dino_resnet50_pretrain.pth")
    assert converted.arch == "resnet50"
    torch.manual_seed(4)
    original = ResNetModel(build_backbone_config("resnet50")).eval()
    model = ResNetModel(converted.backbone_config).eval()
    model.load_state_dict(converted.backbone_state)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images).pooler_output, original(images).pooler_output)
