import pytest
import torch
from transformers import ViTModel

from hf_dino.student_teacher import build_student_and_teacher
from test_trainer import tiny_recipe


def test_student_and_teacher_start_equal_and_only_the_student_learns(tmp_path):
    student, teacher = build_student_and_teacher(tiny_recipe(tmp_path, drop_path_rate=0.1), "eager")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name
    assert student.config.drop_path_rate == 0.1 and teacher.config.drop_path_rate == 0.0
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for name, p in student.named_parameters() if "original0" not in name)
    assert student.config.backbone_config._attn_implementation == "eager"


def test_init_backbone_starts_student_and_teacher_from_a_vitmodel(tmp_path):
    from hf_dino.configuration_dino import build_backbone_config

    torch.manual_seed(5)
    source = ViTModel(build_backbone_config("vit_tiny", 4, 64, num_hidden_layers=1))  # other grid, with pooler
    source.save_pretrained(tmp_path / "released")
    recipe = tiny_recipe(tmp_path / "run", init_backbone=str(tmp_path / "released"))
    student, teacher = build_student_and_teacher(recipe)
    for name, value in source.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(student.backbone.state_dict()[name], value), name
            assert torch.equal(teacher.backbone.state_dict()[name], value), name
    assert student.config.backbone_config.image_size == 64  # 16 px crops interpolate the 16x16 grid
    assert student(torch.randn(2, 3, 16, 16)).logits.shape == (2, 64)


def test_init_backbone_of_another_architecture_is_a_clear_error(tmp_path):
    from hf_dino.configuration_dino import build_backbone_config

    ViTModel(build_backbone_config("vit_small", 4, 16, num_hidden_layers=1)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="hidden_size: checkpoint 384 vs recipe 192"):
        build_student_and_teacher(tiny_recipe(tmp_path / "run", init_backbone=str(tmp_path / "small")))
    with pytest.raises(ValueError, match="init_backbone .* does not exist"):
        tiny_recipe(tmp_path / "run", init_backbone=str(tmp_path / "nowhere")).validate()


def test_width_and_heads_override_the_preset(tmp_path):
    """hidden_size 96 with 3 heads: a ViT of width 96 (MLP 4 x 96 = 384), 3 heads of 32 channels;
    a width the heads do not divide fails before any work, naming both."""
    student, teacher = build_student_and_teacher(tiny_recipe(tmp_path, hidden_size=96, num_attention_heads=3))
    config = teacher.config.backbone_config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (96, 3, 384)
    assert student.backbone.layers[0].attention.q_proj.weight.shape == (96, 96)
    assert student(torch.randn(2, 3, 16, 16)).features.shape == (2, 96)
    with pytest.raises(ValueError, match="hidden_size 100 must be a positive multiple of num_attention_heads 3"):
        tiny_recipe(tmp_path, hidden_size=100).validate()
