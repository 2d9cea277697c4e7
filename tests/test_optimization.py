import torch
from torch import nn

from hf_dino.modeling_dino import DinoHead
from hf_dino.optimization import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    ema_update,
    parameter_groups,
    set_step_hyperparameters,
)


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))
    model[2].weight.requires_grad_(False)
    decayed, not_decayed = parameter_groups(model)
    assert [p.shape for p in decayed["params"]] == [torch.Size([8, 4])]
    assert sorted(p.numel() for p in not_decayed["params"]) == [8, 8, 8]  # bias, norm weight, norm bias
    assert not_decayed["weight_decay"] == 0.0


def test_per_parameter_clipping_matches_formula():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(2))]
    grads = [torch.randn(5) * 10, torch.randn(3, 3) * 0.01, torch.randn(2) * 3]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients_per_parameter(params, max_norm=3.0)
    for p, g in zip(params, grads):
        norm = g.norm().item()
        coefficient = 3.0 / (norm + 1e-6)
        expected = g * coefficient if coefficient < 1 else g
        torch.testing.assert_close(p.grad, expected)


def test_ema_update_formula():
    teacher = [torch.full((3,), 2.0), torch.full((2, 2), -1.0)]
    student = [torch.full((3,), 4.0), torch.full((2, 2), 1.0)]
    ema_update(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.9 * 2.0 + 0.1 * 4.0))
    torch.testing.assert_close(teacher[1], torch.full((2, 2), 0.9 * -1.0 + 0.1 * 1.0))
    assert student[0][0] == 4.0  # the student is untouched


def test_frozen_last_layer_is_not_updated_by_the_optimizer():
    torch.manual_seed(0)
    head = DinoHead(6, 10, 12, 4, norm_last_layer=False)
    optimizer = build_optimizer(head, "adamw")
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    last_before = [p.detach().clone() for p in head.last_layer.parameters()]
    mlp_before = head.mlp[0].weight.detach().clone()
    head(torch.randn(4, 6)).logsumexp(-1).sum().backward()
    cancel_last_layer_gradients(head)
    optimizer.step()
    for before, after in zip(last_before, head.last_layer.parameters()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.equal(head.mlp[0].weight, mlp_before)


def test_sgd_optimizer():
    optimizer = build_optimizer(nn.Linear(3, 3), "sgd", sgd_momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9


def test_ema_of_a_bf16_student_into_an_fp32_teacher_matches_the_formula():
    """DeepSpeed bf16: the student module holds bf16 weights, the teacher stays fp32."""
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    student = [torch.randn(5, 3, generator=generator).bfloat16(), torch.randn(7, generator=generator).bfloat16()]
    expected = [0.996 * t.double() + 0.004 * s.double() for t, s in zip(teacher, student)]
    ema_update(teacher, student, momentum=0.996)
    for value, formula in zip(teacher, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), formula, rtol=1e-6, atol=1e-7)


def test_parameter_groups_tag_weight_decay_and_the_last_layer():
    head = DinoHead(6, 10, 12, 4, norm_last_layer=False)
    groups = parameter_groups(head)
    names = {id(p): n for n, p in head.named_parameters()}
    by_tags = {(g["apply_weight_decay"], g["last_layer"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_tags == {
        (True, False): ["mlp.0.weight", "mlp.2.weight", "mlp.4.weight"],
        (False, False): ["mlp.0.bias", "mlp.2.bias", "mlp.4.bias"],
        # the gain g is (K, 1): decayed, as the reference's weight_g
        (True, True): ["last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"],
    }
    assert all(g["weight_decay"] == 0.0 for g in groups if not g["apply_weight_decay"])
    assert len(parameter_groups(nn.Linear(3, 3))) == 2  # no last layer: no empty group


def test_frozen_last_layer_stays_put_under_weight_decay_with_zeroed_gradients():
    """DeepSpeed's situation: the last layer's gradients are zeros (not None) and AdamW's decoupled
    weight decay would still shrink it; lr 0 for its groups keeps it exactly in place. Unfrozen,
    with zero gradient and zero moments, AdamW's update is the decay alone: w <- w (1 - lr wd)."""
    torch.manual_seed(0)
    head = DinoHead(6, 10, 12, 4, norm_last_layer=False)
    optimizer = build_optimizer(head, "adamw")
    last_before = [p.detach().clone() for p in head.last_layer.parameters()]
    mlp_before = head.mlp[0].weight.detach().clone()
    for _ in range(2):
        head(torch.randn(4, 6)).logsumexp(-1).sum().backward()
        for parameter in head.last_layer.parameters():
            parameter.grad.zero_()
        set_step_hyperparameters(optimizer, lr=0.1, weight_decay=0.4, last_layer_frozen=True)
        optimizer.step()
        optimizer.zero_grad()
    for before, after in zip(last_before, head.last_layer.parameters()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.equal(head.mlp[0].weight, mlp_before)
    assert {g["weight_decay"] for g in optimizer.param_groups if g["apply_weight_decay"]} == {0.4}

    direction = head.last_layer.parametrizations.weight.original1
    before = direction.detach().clone()
    head(torch.randn(4, 6)).logsumexp(-1).sum().backward()
    for parameter in head.last_layer.parameters():
        parameter.grad.zero_()
    set_step_hyperparameters(optimizer, lr=0.1, weight_decay=0.4, last_layer_frozen=False)
    optimizer.step()
    torch.testing.assert_close(direction.detach(), before * (1 - 0.1 * 0.4), rtol=1e-6, atol=0)
