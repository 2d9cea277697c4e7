import json

import pytest
import torch
from transformers import ViTModel

import conftest
from hf_dino.configuration_dino import build_backbone_config
from hf_dino.evaluation.features import probe_features
from hf_dino.evaluation.linear import LinearProbeConfig, default_probe_layout, train_linear_probe


def tiny_vit(hidden_size=32, layers=3):
    return conftest.tiny_vit(hidden_size=hidden_size, num_hidden_layers=layers, layer_norm_eps=1e-6)


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


def pil_images(count=6, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((20 + 3 * i, 24, 3)) * 255).astype(np.uint8)) for i in range(count)]


def test_probe_saves_an_image_classifier_that_the_pipeline_loads(tmp_path):
    """The folder is a plain ViTForImageClassification: the pipeline's scores are the softmax of
    the trained linear layer on the probe feature (final-norm CLS) of the processed image."""
    from transformers import AutoImageProcessor, ViTForImageClassification, pipeline

    from hf_dino.evaluation.linear import save_image_classifier

    model, batches = tiny_vit(), colour_classes()
    config = LinearProbeConfig(epochs=3, batch_size=16, lrs=(0.5,), augment=False, n_last_blocks=1)
    result = train_linear_probe(model, batches, batches, 3, config, train_eval_loader=batches)
    classifier = result.pop("classifier")
    folder = save_image_classifier(model, classifier, tmp_path / "probe", ["red", "green", "blue"], image_size=16,
                                   result=result)
    assert folder == tmp_path / "probe"
    loaded = ViTForImageClassification.from_pretrained(folder)
    assert loaded.config.id2label == {0: "red", 1: "green", 2: "blue"} and loaded.config.label2id["blue"] == 2
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"shortest_edge": 18} and processor.crop_size == {"height": 16, "width": 16}
    classify = pipeline("image-classification", model=str(folder))
    for image in pil_images():
        pixel_values = processor(images=image, return_tensors="pt").pixel_values
        with torch.no_grad():
            expected = torch.softmax(classifier(probe_features(model, pixel_values, n_last_blocks=1)), -1)[0]
        predictions = classify(image, top_k=3)
        scores = torch.tensor([next(p["score"] for p in predictions if p["label"] == name)
                               for name in ("red", "green", "blue")])
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert "pipeline_tag: image-classification" in (folder / "README.md").read_text()


def test_a_probe_on_several_blocks_is_not_saved_as_a_vit_classifier(tmp_path, caplog):
    import logging

    from hf_dino.evaluation.linear import save_image_classifier

    classifier = torch.nn.Linear(2 * 32, 3)
    with caplog.at_level(logging.WARNING):
        saved = save_image_classifier(tiny_vit(), classifier, tmp_path / "probe", ["a", "b", "c"], image_size=16,
                                      result={"n_last_blocks": 2, "avgpool_patchtokens": False})
    assert saved is None and not (tmp_path / "probe").exists()
    assert "--n_last_blocks 1 --avgpool_patchtokens false" in caplog.text


def test_a_resnet_probe_saves_a_resnet_classifier(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetModel

    from hf_dino.evaluation.linear import save_image_classifier

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).eval()
    classifier = torch.nn.Linear(16, 4)
    save_image_classifier(model, classifier, tmp_path, list("abcd"), image_size=32)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, classifier(probe_features(model, pixels)))


def test_class_names_come_from_the_label_feature():
    from datasets import ClassLabel, Features, Value

    from hf_dino.evaluation.linear import class_names

    features = Features({"label": ClassLabel(names=["cat", "dog"]), "other": Value("int64")})
    assert class_names(features, "label", 2) == ["cat", "dog"]
    assert class_names(features, "other", 3) == ["0", "1", "2"]


def test_eval_linear_command_writes_a_pipeline_ready_classifier_with_the_datasets_names(tmp_path):
    """`hf-dino-eval-linear --output_dir` on the embedded CIFAR-10 sample (docs/FINETUNING.md's path)."""
    from transformers import pipeline

    from hf_dino.commands.eval_linear import main
    from hf_dino.data import load_dataset_dict

    model_dir = tmp_path / "backbone"
    tiny_vit().save_pretrained(model_dir)
    main(["--model", str(model_dir), "--max_train_samples", "64", "--max_val_samples", "16", "--epochs", "1",
          "--batch_size", "32", "--num_workers", "0", "--n_last_blocks", "1", "--avgpool_patchtokens", "false",
          "--no_augmentation", "--output_dir", str(tmp_path / "probe"), "--output_json", str(tmp_path / "probe.json")])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["image_classifier"] == str(tmp_path / "probe")
    demo = load_dataset_dict(None)
    names = demo["train"].features["label"].names
    predictions = pipeline("image-classification", model=str(tmp_path / "probe"))(demo["test"][0]["image"], top_k=3)
    assert len(predictions) == 3 and {p["label"] for p in predictions} <= set(names)
    from transformers import ViTForImageClassification  # the guide's fine-tuning start: nothing left to initialise

    model, info = ViTForImageClassification.from_pretrained(tmp_path / "probe", output_loading_info=True)
    assert not info["missing_keys"] and model.config.id2label[0] == names[0]
