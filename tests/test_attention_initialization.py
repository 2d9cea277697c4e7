import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

from hf_dino.attention_initialization import initialize_attention_, initialize_mimetic_attention_, low_rank_factors
from hf_dino.position_embeddings import initialize_sincos_position_embeddings_
from hf_dino.student_teacher import build_student_and_teacher
from test_trainer import tiny_recipe


def small_vit(width=64, heads=4, layers=2, image_size=32, patch_size=4):
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
                       intermediate_size=2 * width, image_size=image_size, patch_size=patch_size)
    return ViTModel(config, add_pooling_layer=False).eval()


def test_low_rank_factors_of_a_diagonal_matrix_worked_by_hand():
    target = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    a, b = low_rank_factors(target, 2)
    assert a.shape == b.shape == (2, 3)
    # the best rank-2 approximation keeps the two largest singular values, 3 and 2
    torch.testing.assert_close(a.T @ b, torch.diag(torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64)))


def test_low_rank_factors_are_the_eckart_young_optimum():
    target = torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    singular_values = np.linalg.svd(target.numpy(), compute_uv=False)
    for rank in (3, 12):
        a, b = low_rank_factors(target, rank)
        error = torch.linalg.matrix_norm(target - a.T @ b).item() ** 2
        assert error == pytest.approx(float((singular_values[rank:] ** 2).sum()), abs=1e-9)
        assert torch.linalg.matrix_rank(a.T @ b).item() == rank


def test_mimetic_products_have_the_paper_s_structure():
    vit = small_vit(width=64, heads=4)
    initialize_mimetic_attention_(vit, seed=0)
    for layer in vit.layers:
        attention = layer.attention
        # value-output product: 0.4 Z - 0.4 I, Z ~ N(0, 1/64), full rank
        product = attention.v_proj.weight.T @ attention.o_proj.weight.T  # x -> x W_v^T W_o^T
        off_diagonal = product[~torch.eye(64, dtype=torch.bool)]
        assert product.diagonal().mean().item() == pytest.approx(-0.4, abs=0.03)
        assert off_diagonal.std().item() == pytest.approx(0.4 / 8, rel=0.1)
        for head in range(4):
            rows = slice(16 * head, 16 * (head + 1))
            query_key = attention.q_proj.weight[rows].T @ attention.k_proj.weight[rows]  # (64, 64), rank 16
            assert torch.linalg.matrix_rank(query_key).item() == 16
            # its trace is that of the best rank-16 approximation of 0.7 Z + 0.7 I: positive, several times
            # what the noise alone gives (the trace of a random product is ~0)
            assert query_key.trace().item() > 10
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            assert torch.count_nonzero(linear.bias) == 0


def test_mimetic_attention_with_sincos_positions_attends_to_neighbours():
    # width 192 with 3 heads (head dim 64); no image content: the tokens are the [CLS] token and
    # the position embeddings of an 8 x 8 grid
    def attention_on_the_3x3_neighbourhood(vit):
        embeddings = vit.embeddings.position_embeddings.detach()  # (1, 65, 192)
        hidden = vit.layers[0].layernorm_before(embeddings)
        attention = vit.layers[0].attention
        queries = attention.q_proj(hidden).view(1, 65, 3, 64).transpose(1, 2)
        keys = attention.k_proj(hidden).view(1, 65, 3, 64).transpose(1, 2)
        weights = (queries @ keys.transpose(-1, -2) / 8).softmax(-1)[0, :, 1:, 1:]  # (heads, 64, 64) patches
        rows, columns = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        rows, columns = rows.flatten(), columns.flatten()
        near = ((rows[:, None] - rows[None]).abs() <= 1) & ((columns[:, None] - columns[None]).abs() <= 1)
        return (weights * near).sum(-1).mean().item()  # attention mass within the 3 x 3 block, per query

    random_vit = small_vit(width=192, heads=3, layers=1)
    initialize_sincos_position_embeddings_(random_vit)
    mimetic_vit = small_vit(width=192, heads=3, layers=1)
    initialize_sincos_position_embeddings_(mimetic_vit)
    initialize_mimetic_attention_(mimetic_vit, seed=0)
    # uniform attention over 64 patches puts 7.6 / 64 = 0.12 on a 3 x 3 block (fewer neighbours at the borders)
    assert attention_on_the_3x3_neighbourhood(random_vit) < 0.15
    assert attention_on_the_3x3_neighbourhood(mimetic_vit) > 0.3  # 0.44 measured


def test_mimetic_init_changes_only_the_attention_projections_and_follows_the_seed():
    reference = small_vit()
    vit = small_vit()
    initialize_mimetic_attention_(vit, seed=3)
    for name, value in vit.state_dict().items():
        changed = not torch.equal(value, reference.state_dict()[name])
        # (transformers' init already zeroes the biases)
        assert changed == any(name.endswith(f"{part}.weight") for part in ("q_proj", "k_proj", "v_proj", "o_proj")), name
    again, other = small_vit(), small_vit()
    initialize_mimetic_attention_(again, seed=3)
    initialize_mimetic_attention_(other, seed=4)
    weight = vit.layers[1].attention.q_proj.weight
    assert torch.equal(weight, again.layers[1].attention.q_proj.weight)
    assert not torch.equal(weight, other.layers[1].attention.q_proj.weight)


def test_the_recipe_s_attention_init_reaches_student_and_teacher(tmp_path):
    student, teacher = build_student_and_teacher(tiny_recipe(tmp_path, attention_init="mimetic"))
    for model in (student, teacher):
        attention = model.backbone.layers[0].attention
        product = attention.v_proj.weight.T @ attention.o_proj.weight.T
        assert product.diagonal().mean().item() == pytest.approx(-0.4, abs=0.05)
    for name, value in student.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    assert student.backbone.layers[0].attention.q_proj.weight.requires_grad


def test_random_keeps_the_model_s_init_and_an_unknown_method_is_refused():
    vit = small_vit()
    before = vit.layers[0].attention.q_proj.weight.detach().clone()
    initialize_attention_(vit, "random", seed=0)
    assert torch.equal(vit.layers[0].attention.q_proj.weight, before)
    with pytest.raises(ValueError, match="attention_init 'identity' is unknown"):
        initialize_attention_(vit, "identity", seed=0)
