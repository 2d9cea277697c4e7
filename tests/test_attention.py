import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

import conftest
from hf_dino.visualization.attention import (attention_mass_masks, cls_attention_and_feature, eager_attention,
                               last_block_cls_attention, save_attention_figures, upsample_to_image)

REPO = Path(__file__).resolve().parents[1]


def tiny_vit():
    return conftest.tiny_vit(num_hidden_layers=2, layer_norm_eps=1e-6)


def test_cls_attention_matches_softmax_of_the_last_blocks_queries_and_keys():
    model = tiny_vit()
    assert model.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 16, 24)  # non-square, through the interpolated position grid
    normed_inputs = []
    last = model.layers[-1]
    last.layernorm_before.register_forward_hook(lambda module, args, output: normed_inputs.append(output))
    with torch.no_grad():
        sdpa_output = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        attention = last_block_cls_attention(model, pixels)
        with eager_attention(model):
            eager_output = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(eager_output, sdpa_output, rtol=1e-5, atol=1e-5)  # eager: same model
    tokens = normed_inputs[-1]  # (B, 1 + N, D)
    heads, head_dim = 2, 16
    q = last.attention.q_proj(tokens).view(2, -1, heads, head_dim).transpose(1, 2)
    k = last.attention.k_proj(tokens).view(2, -1, heads, head_dim).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)[:, :, 0, 1:]
    assert attention.shape == (2, 2, 4, 6)
    torch.testing.assert_close(attention, expected.reshape(2, 2, 4, 6), rtol=1e-5, atol=1e-6)


def test_one_pass_equals_the_eager_models_last_attention_matrix_and_feature():
    """The CLS row computed alone equals row 0 of the last block's full eager attention matrix
    (`output_attentions=True`), and the feature equals `last_hidden_state[:, 0]`, for a ViT and
    through a DinoModel, on a non-square image."""
    from hf_dino.configuration_dino import DinoConfig
    from hf_dino.modeling_dino import DinoModel

    torch.manual_seed(1)
    vit = tiny_vit()
    with torch.no_grad():  # peaky attention, so that the rows are far from uniform
        for layer in vit.layers:
            layer.attention.q_proj.weight.normal_(0, 1.0)
    dino = DinoModel(DinoConfig(backbone_config=vit.config, out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4))
    dino.backbone.load_state_dict(vit.state_dict())
    pixels = torch.randn(3, 3, 20, 28)
    with torch.no_grad(), eager_attention(vit):
        eager = vit(pixel_values=pixels, interpolate_pos_encoding=True, output_attentions=True)
    expected_maps = eager.attentions[-1][:, :, 0, 1:].reshape(3, 2, 5, 7)
    assert expected_maps.amax() > 5 * expected_maps.mean()
    for model in (vit, dino.eval()):
        maps, feature = cls_attention_and_feature(model, pixels)
        assert maps.shape == (3, 2, 5, 7) and feature.shape == (3, 32)
        torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(feature, eager.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    assert cls_attention_and_feature(vit, pixels, return_feature=False)[1] is None


def test_one_pass_runs_sdpa_below_the_last_block_and_never_eager(monkeypatch):
    """No block builds a (1 + N) x (1 + N) attention matrix through the eager path, also for a model
    set to eager: the blocks below the last go through SDPA, the last computes the CLS row only."""
    import transformers.models.vit.modeling_vit as modeling_vit

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was used")

    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(modeling_vit, "eager_attention_forward", no_eager)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda query, *args, **kwargs: sdpa_calls.append(query.shape) or sdpa(query, *args, **kwargs))
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             image_size=16, patch_size=4), add_pooling_layer=False).eval()
    for implementation in ("sdpa", "eager"):
        vit.set_attn_implementation(implementation)
        sdpa_calls.clear()
        maps = last_block_cls_attention(vit, torch.randn(2, 3, 32, 32))
        assert maps.shape == (2, 2, 8, 8)
        assert sdpa_calls == [(2, 2, 65, 16)] * 2  # blocks 0 and 1 of 3, 1 + 64 tokens
        assert vit.config._attn_implementation == implementation  # restored


def attention_implementations(model) -> set:
    """The implementation every module with a config would use now."""
    return {module.config._attn_implementation for module in model.modules() if hasattr(module, "config")}


def test_the_models_attention_implementation_is_restored_after_use():
    from hf_dino.configuration_dino import DinoConfig
    from hf_dino.modeling_dino import DinoModel

    vit = tiny_vit()
    assert attention_implementations(vit) == {"sdpa"}
    last_block_cls_attention(vit, torch.randn(1, 3, 16, 16))
    assert attention_implementations(vit) == {"sdpa"}
    dino = DinoModel(DinoConfig(backbone_config=vit.config, out_dim=8, head_hidden_dim=8, head_bottleneck_dim=4))
    last_block_cls_attention(dino, torch.randn(1, 3, 16, 16))  # through a DinoModel's backbone
    assert attention_implementations(dino.backbone) == {"sdpa"}
    vit.set_attn_implementation("eager")  # a model already on eager stays on eager
    last_block_cls_attention(vit, torch.randn(1, 3, 16, 16))
    assert attention_implementations(vit) == {"eager"}


def test_the_attention_implementation_is_restored_when_the_forward_fails():
    vit = tiny_vit()
    with pytest.raises(RuntimeError, match="boom"):
        with eager_attention(vit):
            assert attention_implementations(vit) == {"eager"}
            raise RuntimeError("boom")
    assert attention_implementations(vit) == {"sdpa"}


def brute_force_mask(values: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Among all subsets of the smallest size reaching the mass, the one of largest mass."""
    total = values.sum()
    for size in range(1, len(values) + 1):
        best = max(itertools.combinations(range(len(values)), size), key=lambda s: values[list(s)].sum())
        if values[list(best)].sum() >= keep_fraction * total:
            mask = np.zeros(len(values), dtype=bool)
            mask[list(best)] = True
            return mask
    raise AssertionError


@pytest.mark.parametrize("keep_fraction", [0.3, 0.6, 0.9, 1.0])
def test_masks_keep_the_fewest_most_attended_patches_holding_the_mass(keep_fraction):
    generator = torch.Generator().manual_seed(int(keep_fraction * 10))
    attention = torch.rand(3, 2, 4, generator=generator) ** 3
    masks = attention_mass_masks(attention, keep_fraction)
    for head in range(3):
        expected = brute_force_mask(attention[head].flatten().numpy(), keep_fraction)
        np.testing.assert_array_equal(masks[head].flatten().numpy(), expected)


def test_mask_fraction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="keep_fraction"):
        attention_mass_masks(torch.rand(2, 2), 0.0)


def test_upsampling_repeats_each_patch():
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    up = upsample_to_image(maps, 3)
    assert up.shape == (6, 6) and (up[:3, 3:] == 2.0).all() and (up[3:, :3] == 3.0).all()


def test_figures_are_pngs_at_image_resolution(tmp_path):
    image = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    attention = torch.rand(2, 16, 24)
    files = save_attention_figures(image, attention, attention > 0.5, tmp_path)
    assert [f.name for f in files] == ["image.png", "attn-head0.png", "attn-head1.png", "overlay.png"]
    for path in files[:-1]:
        assert Image.open(path).size == (24, 16)
    assert Image.open(files[-1]).size[0] > 200


def test_visualize_attention_script(tmp_path):
    model_dir = tmp_path / "vit"
    tiny_vit().save_pretrained(model_dir)
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(image)
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts/visualize_attention.py"), "--model", str(model_dir), "--image", str(image),
         "--output_dir", str(tmp_path / "out"), "--image_size", "34"],
        capture_output=True, text=True, check=True)
    summary = json.loads(completed.stdout[completed.stdout.index("{"):])
    assert summary["image_size"] == 32 and summary["grid"] == [8, 8] and summary["num_heads"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "attn-head0.png", "attn-head1.png", "image.png", "overlay.png"]
