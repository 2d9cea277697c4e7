import pytest
import torch
from transformers import ViTConfig, ViTModel

from hf_dino.configuration_dino import build_backbone_config
from hf_dino.evaluation.linear import LinearProbeConfig, default_probe_layout, probe_features, train_linear_probe


def tiny_vit(hidden_size=32, layers=3):
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * hidden_size, image_size=16, patch_size=4, layer_norm_eps=1e-6)
    return ViTModel(config, add_pooling_layer=False).eval()


def test_probe_features_are_normed_cls_tokens_of_the_last_blocks():
    model = tiny_vit()
    pixels = torch.randn(5, 3, 16, 16)
    block_outputs = []  # captured independently, by hooks on each block
    hooks = [layer.register_forward_hook(lambda module, args, output: block_outputs.append(
        output[0] if isinstance(output, tuple) else output)) for layer in model.layers]
    with torch.no_grad():
        features = probe_features(model, pixels, n_last_blocks=2, avgpool_patchtokens=True)
    for hook in hooks:
        hook.remove()
    norm = model.layernorm
    expected_blocks = [torch.nn.functional.layer_norm(h, (32,), norm.weight, norm.bias, 1e-6)
                       for h in block_outputs[-2:]]
    expected = torch.cat([expected_blocks[0][:, 0], expected_blocks[1][:, 0], expected_blocks[1][:, 1:].mean(1)], 1)
    assert features.shape == (5, 3 * 32)
    torch.testing.assert_close(features, expected)


def test_last_block_cls_equals_the_models_output_feature():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(probe_features(model, pixels, n_last_blocks=1),
                                   model(pixel_values=pixels).last_hidden_state[:, 0])


def test_too_many_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="n_last_blocks=4 but the backbone has 3 blocks"):
        probe_features(tiny_vit(), torch.randn(1, 3, 16, 16), n_last_blocks=4)


def test_reference_layout_per_architecture():
    assert default_probe_layout(ViTModel(build_backbone_config("vit_small", 16, 224, num_hidden_layers=4))) == (4, False)
    assert default_probe_layout(ViTModel(build_backbone_config("vit_base", 16, 224, num_hidden_layers=1))) == (1, True)


def colour_classes(num_per_class=40, seed=0):
    """Images whose dominant colour channel is the class: linearly separable in any sane feature."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(num_per_class)
    pixels = 0.3 * torch.randn(len(labels), 3, 16, 16, generator=generator)
    pixels[torch.arange(len(labels)), labels] += 2.0
    return [{"pixel_values": p, "labels": l, "num_skipped": 0}
            for p, l in zip(pixels.split(16), labels.split(16))]


def test_probe_learns_a_separable_problem_and_reports_the_protocol():
    batches = colour_classes()
    config = LinearProbeConfig(epochs=8, batch_size=16, lrs=(0.0001, 0.5), augment=False)
    result = train_linear_probe(tiny_vit(), batches, colour_classes(seed=1), 3, config, train_eval_loader=batches)
    assert result["lr"] == 0.5 and result["top1"] > 95.0
    assert result["per_lr"]["0.0001"]["top1"] < result["top1"]
    assert result["best_top1"] >= result["top1"] and 1 <= result["best_epoch"] <= 8
    assert (result["feature_dim"], result["n_last_blocks"], result["num_train"], result["num_val"]) == (96, 3, 120, 120)


def test_heads_of_a_sweep_train_independently():
    """Each lr's head in a sweep ends exactly where a run with that lr alone ends."""
    batches = colour_classes()
    runs = {}
    for lrs in ((0.05,), (0.05, 3.0)):
        config = LinearProbeConfig(epochs=2, batch_size=16, lrs=lrs, augment=False, n_last_blocks=1)
        runs[lrs] = train_linear_probe(tiny_vit(), batches, batches, 3, config, train_eval_loader=batches)
    alone, swept = runs[(0.05,)], runs[(0.05, 3.0)]["per_lr"]["0.05"]
    assert alone["per_lr"]["0.05"]["history"] == swept["history"]


def test_augmented_training_runs_the_backbone_each_epoch():
    calls = []
    model = tiny_vit()
    model.register_forward_hook(lambda *args: calls.append(1))
    batches = colour_classes(num_per_class=8)  # 2 batches
    config = LinearProbeConfig(epochs=3, batch_size=16, augment=True, n_last_blocks=1)
    train_linear_probe(model, batches, batches, 3, config)
    assert len(calls) == 2 + 3 * 2  # val features once, then train batches every epoch
