import math

import pytest
import torch

from hf_dino.position_embeddings import (
    initialize_position_embeddings_,
    initialize_sincos_position_embeddings_,
    sincos_position_embedding,
)
from hf_dino.student_teacher import build_student_and_teacher
from test_trainer import tiny_recipe


def test_a_2x2_grid_of_width_4_worked_by_hand():
    # one frequency (w_0 = 1): channels [sin x, cos x, sin y, cos y]; patches (y, x) = (0,0) (0,1) (1,0) (1,1)
    s, c = math.sin(1.0), math.cos(1.0)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                             [s, c, 0.0, 1.0],
                             [0.0, 1.0, s, c],
                             [s, c, s, c]])
    torch.testing.assert_close(sincos_position_embedding(2, 4), expected)


def test_every_channel_of_a_3x3_grid_of_width_8_follows_the_formula():
    # q = 2 frequencies: 1 and 10000 ** (-1/2) = 0.01
    embedding = sincos_position_embedding(3, 8)
    assert embedding.shape == (9, 8)
    for y in range(3):
        for x in range(3):
            row = embedding[y * 3 + x].tolist()
            expected = [math.sin(x), math.sin(0.01 * x), math.cos(x), math.cos(0.01 * x),
                        math.sin(y), math.sin(0.01 * y), math.cos(y), math.cos(0.01 * y)]
            assert row == pytest.approx(expected, abs=1e-6), (y, x)


def test_a_width_not_divisible_by_4_is_refused():
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_position_embedding(2, 6)


def test_sincos_init_reaches_student_and_teacher_and_stays_trainable(tmp_path):
    torch.manual_seed(0)
    student, teacher = build_student_and_teacher(tiny_recipe(tmp_path, position_embedding_init="sincos"))
    # tiny_recipe: 16 px global crops, patch 4 -> a 4x4 grid; width 192
    expected = torch.cat([torch.zeros(1, 192), sincos_position_embedding(4, 192)])[None]
    for model in (student, teacher):
        torch.testing.assert_close(model.backbone.embeddings.position_embeddings.detach(), expected)
    assert student.backbone.embeddings.position_embeddings.requires_grad
    torch.manual_seed(0)
    random_student, _ = build_student_and_teacher(tiny_recipe(tmp_path))  # the default: truncated normal
    assert random_student.backbone.embeddings.position_embeddings.std() < 0.03
    # everything else is the same random initialisation
    for name, value in random_student.state_dict().items():
        if "position_embeddings" not in name:
            assert torch.equal(value, student.state_dict()[name]), name


def test_a_non_square_grid_is_refused():
    class Embeddings(torch.nn.Module):
        position_embeddings = torch.nn.Parameter(torch.zeros(1, 1 + 6, 8))

    class Vit(torch.nn.Module):
        embeddings = Embeddings()

    with pytest.raises(ValueError, match="6 patch positions do not form a square grid"):
        initialize_sincos_position_embeddings_(Vit())


def test_the_recipe_method_random_keeps_the_model_s_init_and_an_unknown_one_is_refused(tmp_path):
    student, _ = build_student_and_teacher(tiny_recipe(tmp_path))
    before = student.backbone.embeddings.position_embeddings.detach().clone()
    initialize_position_embeddings_(student.backbone, "random")
    assert torch.equal(student.backbone.embeddings.position_embeddings, before)
    with pytest.raises(ValueError, match="position_embedding_init 'learned' is unknown"):
        initialize_position_embeddings_(student.backbone, "learned")
