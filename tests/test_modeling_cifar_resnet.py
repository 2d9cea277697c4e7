import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModel, ResNetModel

import hf_dino  # noqa: F401  (registers the Auto classes)
from hf_dino.configuration_cifar_resnet import CifarResNetConfig
from hf_dino.configuration_dino import DinoConfig, build_backbone_config
from hf_dino.modeling_cifar_resnet import CifarResNetModel
from hf_dino.modeling_dino import DinoModel


def parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_resnet_presets_have_torchvisions_parameter_counts():
    # torchvision resnet18 / resnet50 without their 1000-way fc: 11,689,512 - 513,000 and 25,557,032 - 2,049,000.
    assert parameter_count(ResNetModel(build_backbone_config("resnet18"))) == 11_176_512
    assert parameter_count(ResNetModel(build_backbone_config("resnet50"))) == 23_508_032
    # The CIFAR stem (He et al. 2016, Sec. 4.2): a 3x3 convolution of 3 -> 64 channels instead of 7x7:
    # (49 - 9) * 3 * 64 = 7,680 weights fewer, the max-pool had none.
    cifar = CifarResNetModel(build_backbone_config("resnet18", image_size=32, resnet_stem="cifar"))
    assert parameter_count(cifar) == 11_176_512 - 7_680


def test_cifar_stem_keeps_full_resolution_into_the_first_stage():
    config = build_backbone_config("resnet18", image_size=32, resnet_stem="cifar", hidden_size=8)
    assert isinstance(config, CifarResNetConfig) and config.hidden_sizes == [8, 16, 32, 64] and config.image_size == 32
    pixels = torch.randn(2, 3, 32, 32)
    cifar = CifarResNetModel(config).eval()(pixel_values=pixels, output_hidden_states=True)
    assert [tuple(h.shape[-3:]) for h in cifar.hidden_states] == [(8, 32, 32), (8, 32, 32), (16, 16, 16),
                                                                   (32, 8, 8), (64, 4, 4)]
    assert cifar.pooler_output.shape == (2, 64, 1, 1)
    imagenet = ResNetModel(build_backbone_config("resnet18", hidden_size=8)).eval()
    assert imagenet(pixel_values=pixels, output_hidden_states=True).hidden_states[0].shape[-2:] == (8, 8)


def test_cifar_stem_is_conv3x3_stride1_batchnorm_relu():
    model = CifarResNetModel(build_backbone_config("resnet18", image_size=32, resnet_stem="cifar", hidden_size=8))
    stem = model.embedder.embedder
    with torch.no_grad():
        stem.normalization.running_mean.uniform_(-0.5, 0.5)
        stem.normalization.running_var.uniform_(0.5, 2.0)
        stem.normalization.weight.uniform_(0.5, 1.5)
        stem.normalization.bias.uniform_(-0.5, 0.5)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    bn = stem.normalization
    expected = F.conv2d(pixels, stem.convolution.weight, stride=1, padding=1)
    expected = (expected - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    expected = torch.relu(expected * bn.weight[:, None, None] + bn.bias[:, None, None])
    assert stem.convolution.weight.shape == (8, 3, 3, 3)
    torch.testing.assert_close(model.embedder(pixels), expected)
    with pytest.raises(ValueError, match="4 channels but the model expects 3"):
        model(pixel_values=torch.randn(1, 4, 32, 32))


def test_resnet_options_are_checked():
    with pytest.raises(ValueError, match="ViT settings"):
        build_backbone_config("resnet18", num_hidden_layers=3)
    with pytest.raises(ValueError, match="resnet_stem 'tiny' is unknown"):
        build_backbone_config("resnet18", resnet_stem="tiny")
    assert build_backbone_config("resnet50", hidden_size=32).hidden_sizes == [128, 256, 512, 1024]


def test_dino_model_on_a_cifar_resnet_feeds_pooled_features_to_the_head():
    backbone = build_backbone_config("resnet18", image_size=32, resnet_stem="cifar", hidden_size=8)
    model = DinoModel(DinoConfig(backbone_config=backbone, out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8))
    model.eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    output = model(crops)
    assert output.features.shape == (7, 64) and output.logits.shape == (7, 16)
    torch.testing.assert_close(output.features[4:], model.backbone(pixel_values=crops[2]).pooler_output.flatten(1))


FRESH_PROCESS = textwrap.dedent("""
    import sys
    sys.modules["hf_dino"] = None  # the saved remote code must not need hf_dino
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    pixels = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        output = model(pixel_values=pixels)
    features = output.features if hasattr(output, "features") else output.pooler_output.flatten(1)
    torch.save({"class": type(model).__name__, "features": features}, sys.argv[3])
""")


def load_in_fresh_process(folder, pixels, tmp_path):
    torch.save(pixels, tmp_path / "pixels.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=240, cwd=tmp_path)
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.mark.timeout(300)
def test_saved_cifar_resnet_and_dino_model_load_as_remote_code_without_hf_dino(tmp_path):
    torch.manual_seed(0)
    backbone_config = build_backbone_config("resnet18", image_size=32, resnet_stem="cifar", hidden_size=8)
    dino = DinoModel(DinoConfig(backbone_config=backbone_config, out_dim=16, head_hidden_dim=32,
                                head_bottleneck_dim=8)).eval()
    dino.backbone.save_pretrained(tmp_path / "backbone")
    dino.save_pretrained(tmp_path / "dino")
    assert (tmp_path / "backbone" / "modeling_cifar_resnet.py").exists()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = dino.backbone(pixel_values=pixels).pooler_output.flatten(1)
    for folder, class_name in (("backbone", "CifarResNetModel"), ("dino", "DinoModel")):
        loaded = load_in_fresh_process(tmp_path / folder, pixels, tmp_path)
        assert loaded["class"] == class_name
        torch.testing.assert_close(loaded["features"], expected)
    # With hf_dino imported the registered classes load it without remote code.
    in_process = AutoModel.from_pretrained(tmp_path / "backbone").eval()
    assert type(in_process) is CifarResNetModel
    torch.testing.assert_close(in_process(pixel_values=pixels).pooler_output.flatten(1), expected)
