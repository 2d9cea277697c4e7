import pytest
import torch
from transformers import AutoModel, ViTModel

import hf_dino  # noqa: F401  (registers the Auto classes)
from hf_dino.configuration_dino import DinoConfig, build_backbone_config
from hf_dino.modeling_dino import DinoHead, DinoModel, DropPath, training_attention_implementation


def tiny_config(**overrides) -> DinoConfig:
    backbone = build_backbone_config("vit_tiny", patch_size=4, image_size=16, num_hidden_layers=2)
    values = dict(backbone_config=backbone, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=8)
    values.update(overrides)
    return DinoConfig(**values)


def test_vit_presets_match_reference_dimensions():
    expected = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}
    for arch, (width, heads) in expected.items():
        for patch in (8, 16):
            config = build_backbone_config(arch, patch_size=patch)
            assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (width, heads, 12)
            assert config.intermediate_size == 4 * width
            assert config.layer_norm_eps == 1e-6 and config.qkv_bias and config.patch_size == patch
    with pytest.raises(ValueError, match="Unknown arch"):
        build_backbone_config("vit_giant")


def test_vit_small_parameter_count_is_the_papers_21m():
    model = ViTModel(build_backbone_config("vit_small", 16), add_pooling_layer=False)
    assert 21.5e6 < sum(p.numel() for p in model.parameters()) < 22.2e6  # DeiT-S: 21.7M (22.1M with pos. emb.)


def test_head_shapes_and_normalisation():
    head = DinoHead(in_dim=12, out_dim=50, hidden_dim=24, bottleneck_dim=6)
    features = torch.randn(7, 12)
    assert head(features).shape == (7, 50)
    bottleneck = torch.nn.functional.normalize(head.mlp(features), dim=-1)
    # weight-normalised last layer with unit gain: every prototype has norm 1, so |logit| <= 1
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(50))
    torch.testing.assert_close(head(features), bottleneck @ weight.T)
    assert head(features).abs().max() <= 1 + 1e-6
    linear_layers = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear_layers] == [(12, 24), (24, 24), (24, 6)]


def test_norm_last_layer_freezes_the_gain():
    assert not DinoHead(8, 10, 16, 4, norm_last_layer=True).last_layer_gain.requires_grad
    assert DinoHead(8, 10, 16, 4, norm_last_layer=False).last_layer_gain.requires_grad


def test_batch_norm_head():
    head = DinoHead(8, 10, 16, 4, use_bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == 2
    assert head(torch.randn(5, 8)).shape == (5, 10)


def test_multicrop_forward_groups_resolutions_and_matches_per_crop():
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).eval()
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    calls = []
    handle = model.backbone.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    output = model(crops)
    handle.remove()
    assert len(calls) == 2  # one backbone pass per resolution
    assert output.logits.shape == (12, 64) and output.features.shape == (12, 192)
    with torch.no_grad():
        one_by_one = torch.cat([model(crop).logits for crop in crops])
    torch.testing.assert_close(output.logits, one_by_one, rtol=1e-5, atol=1e-5)


def test_local_crops_use_size_based_bicubic_position_interpolation():
    """Decision (documented in DinoModel): transformers' interpolation to the exact target grid,
    not the reference's scale_factor with a +0.1 offset."""
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).eval()
    embeddings = model.backbone.embeddings
    pixels = torch.randn(2, 3, 8, 8)
    grid = embeddings.position_embeddings[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    positions = torch.cat([embeddings.position_embeddings[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 4, -1)], 1)
    patches = embeddings.patch_embeddings(pixels)
    expected = torch.cat([embeddings.cls_token.expand(2, -1, -1), patches], 1) + positions
    with torch.no_grad():
        torch.testing.assert_close(embeddings(pixels, interpolate_pos_encoding=True), expected)


def test_drop_path_keeps_vitmodel_keys_and_is_stochastic_only_in_training():
    plain = DinoModel(tiny_config(drop_path_rate=0.0))
    with_drop_path = DinoModel(tiny_config(drop_path_rate=0.5))
    assert list(plain.state_dict()) == list(with_drop_path.state_dict())
    rates = [layer.dropout.drop_prob for layer in with_drop_path.backbone.layers]
    assert rates == [0.0, 0.5]  # linear in depth, as the reference's dpr
    with_drop_path.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_drop_path.eval()(x).logits, plain.eval()(x).logits)


def test_drop_path_statistics():
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    out = drop(torch.ones(20000, 3, 2))
    per_sample = out[:, 0, 0]
    values = per_sample.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)
    assert (out[:, :, :] == out[:, :1, :1]).all()  # one decision per sample


def test_resnet50_backbone_feeds_pooled_features_to_head():
    config = DinoConfig(backbone_config=build_backbone_config("resnet50"), out_dim=16, head_hidden_dim=32,
                        head_bottleneck_dim=8, use_bn_in_head=True)
    model = DinoModel(config).eval()
    output = model([torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)])
    assert output.features.shape == (6, 2048) and output.logits.shape == (6, 16)


def test_save_and_load_with_automodel(tmp_path):
    torch.manual_seed(0)
    model = DinoModel(tiny_config(norm_last_layer=False)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DinoModel)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.config.backbone_config.layer_norm_eps == 1e-6


def test_saved_dino_folder_loads_with_remote_code_without_hf_dino(tmp_path):
    """auto_map + the copied source files: a fresh process where `import hf_dino` fails."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = DinoModel(tiny_config()).eval()
    model.save_pretrained(tmp_path / "dino")
    assert {"configuration_dino.py", "modeling_dino.py"} <= {p.name for p in (tmp_path / "dino").iterdir()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "expected.pt")
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import sys
sys.modules["hf_dino"] = None  # any import of hf_dino now raises ImportError
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / 'dino')!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(torch.load({str(tmp_path / 'x.pt')!r})).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
print("remote code OK")
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0 and "remote code OK" in completed.stdout, completed.stderr[-2000:]


def test_auto_attention_is_eager_only_for_low_precision_on_a_cpu():
    assert training_attention_implementation("auto", "cpu", "bf16") == "eager"
    assert training_attention_implementation("auto", "cpu", "fp16") == "eager"
    assert training_attention_implementation("auto", "cpu", "no") == "sdpa"
    assert training_attention_implementation("auto", "cuda", "bf16") == "sdpa"
    assert training_attention_implementation("sdpa", "cpu", "bf16") == "sdpa"  # an explicit choice wins
    with pytest.raises(ValueError, match="attn_implementation 'flash' is unknown"):
        training_attention_implementation("flash", "cpu", "no")


def test_eager_and_sdpa_attention_compute_the_same_model():
    """The kernel switch must not change the maths: same logits and same gradients."""
    torch.manual_seed(0)
    model = DinoModel(tiny_config())
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    results = {}
    for kernel in ("sdpa", "eager"):
        model.set_attn_implementation(kernel)
        assert model.backbone.config._attn_implementation == kernel
        model.zero_grad()
        logits = model(crops).logits
        logits.square().sum().backward()
        results[kernel] = (logits.detach(), model.backbone.layers[0].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], rtol=1e-4, atol=1e-6)
