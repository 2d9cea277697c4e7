import torch
from torch import nn

from hf_dino.optimization import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    ema_update,
    parameter_groups,
)
from hf_dino.modeling_dino import DinoHead


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
