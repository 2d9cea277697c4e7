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


def _strip_keys(folder, drop) -> None:
    """Rewrite `folder/model.safetensors` without the keys for which `drop(key)` is true."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not drop(k)}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def assert_reference_head_init(head: DinoHead, bottleneck_dim: int) -> None:
    """The reference's DINOHead init, from its formulas: MLP weights trunc_normal(std 0.02) (cut at
    +-2, i.e. a plain N(0, 0.02^2)), biases 0; the last layer nn.Linear's default init of the
    direction v, U(-1/sqrt(bottleneck), 1/sqrt(bottleneck)), and gain g = 1."""
    for linear in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):
        weight = linear.weight.detach()
        assert weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert abs(weight.mean().item()) < 1e-3
        # normal, not uniform: ~4.6% of N(0, s^2) lies beyond 2s (a uniform of that std has none)
        assert (weight.abs() > 0.04).float().mean().item() == pytest.approx(0.0455, abs=0.006)
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))
    direction = head.last_layer.parametrizations.weight.original1.detach()
    bound = bottleneck_dim ** -0.5
    assert direction.abs().max().item() <= bound
    assert direction.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)  # U(-b, b) has std b/sqrt(3)
    assert (direction.abs() < bound / 2).float().mean().item() == pytest.approx(0.5, abs=0.02)  # uniform
    assert torch.equal(head.last_layer_gain.detach(), torch.ones_like(head.last_layer_gain))


def statistics_config(**overrides) -> DinoConfig:
    """Head big enough for statistics: 512 x 192, 512 x 512, 256 x 512 and 4096 x 256."""
    return tiny_config(out_dim=4096, head_hidden_dim=512, head_bottleneck_dim=256, **overrides)


def test_a_fresh_head_is_initialised_as_the_reference():
    torch.manual_seed(0)
    assert_reference_head_init(DinoModel(statistics_config()).head, 256)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weights_missing_from_a_checkpoint_are_initialised_as_the_reference(tmp_path, norm_last_layer):
    """transformers 5 loads on the meta device: weights absent from the file (a dino/ folder
    without its head, a backbone-only file, a lost layer) must get the paper's init, not
    whatever memory `torch.empty` returns."""
    torch.manual_seed(0)
    model = DinoModel(statistics_config(norm_last_layer=norm_last_layer))
    model.save_pretrained(tmp_path)
    lost = ("backbone.layers.0.mlp.fc1.weight", "backbone.layers.0.mlp.fc1.bias", "backbone.layernorm.weight",
            "backbone.layernorm.bias")
    _strip_keys(tmp_path, lambda key: key.startswith("head.") or key in lost)  # backbone-only, minus a few
    loaded = AutoModel.from_pretrained(tmp_path)
    assert_reference_head_init(loaded.head, 256)
    assert loaded.head.last_layer_gain.requires_grad is (not norm_last_layer)
    fc1 = loaded.backbone.layers[0].mlp.fc1  # ViT's own init: N(0, 0.02^2), bias 0
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.03) and not fc1.bias.any()
    norm = loaded.backbone.layernorm
    assert torch.equal(norm.weight.detach(), torch.ones(192)) and not norm.bias.any()
    saved = model.state_dict()
    for name, value in loaded.state_dict().items():  # what the file had is loaded, not re-initialised
        if name.startswith("backbone.") and name not in lost:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def test_a_complete_checkpoint_loads_unchanged_with_the_gain_frozen(tmp_path):
    torch.manual_seed(0)
    model = DinoModel(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert not loaded.head.last_layer_gain.requires_grad
