"""Mimetic initialisation of a ViT's self-attention (Trockman & Kolter, ICML 2023).

In trained ViTs, each head's query-key product W_q^T W_k (what the attention scores x_i^T W_q^T W_k x_j
compare) is close to a positive multiple of the identity plus noise, and the value-output product
W_v^T W_o^T (what the attended tokens add to the residual stream) close to a *negative* multiple of the
identity plus noise. Random weights have neither structure: at initialisation every head attends almost
uniformly. Mimetic initialisation sets the weights so that the products start that way:

    W_q,h^T W_k,h = the best rank-k approximation of  a_qk Z_h + b_qk I    (each head h, head dim k)
    W_v^T W_o^T   = a_vo Z - b_vo I                                          (all heads together)

with Z random of entries N(0, 1 / width), factorised by SVD. Tokens then attend to tokens like
themselves; with sine-cosine position embeddings (`position_embeddings`), to their spatial neighbours,
as convolutions do. Like a convolution's locality, this is an inductive bias that short or small-data runs
lack time to learn (the paper: ViT-Tiny on CIFAR-10 from scratch). The weights stay trainable and the
saved model is an ordinary transformers `ViTModel`.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_INITS = ("random", "mimetic")
QUERY_KEY_SCALES = (0.7, 0.7)  # (a_qk, b_qk): the paper's values
VALUE_OUTPUT_SCALES = (0.4, 0.4)  # (a_vo, b_vo)


def low_rank_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, d) matrices A and B with A^T @ B the best rank-`rank` approximation of `target` (d, d)
    in Frobenius norm (Eckart-Young): A = sqrt(S) U^T and B = sqrt(S) V^T over the top singular triplets."""
    left, singular_values, right_transposed = torch.linalg.svd(target)
    root = singular_values[:rank].sqrt()[:, None]  # (rank, 1)
    return root * left[:, :rank].T, root * right_transposed[:rank]


@torch.no_grad()
def initialize_mimetic_attention_(vit: nn.Module, seed: int, query_key: tuple[float, float] = QUERY_KEY_SCALES,
                                  value_output: tuple[float, float] = VALUE_OUTPUT_SCALES) -> None:
    """Set the query, key, value and output projections of every block of a transformers ViT in place
    (biases zero). Z is drawn from a generator seeded with `seed`, in float64: per block, one (d, d)
    matrix per head for the query-key products, then one for the value-output product.

    Shapes: `q_proj.weight` (d, d) stacks the heads' (k, d) W_q,h; attention scores of head h are
    (x W_q,h^T)(x W_k,h^T)^T / sqrt(k); the attention output adds (weights @ x W_v^T) W_o^T.
    """
    generator = torch.Generator().manual_seed(seed)
    width, heads = vit.config.hidden_size, vit.config.num_attention_heads
    head_dim = width // heads
    identity = torch.eye(width, dtype=torch.float64)
    a_qk, b_qk = query_key
    a_vo, b_vo = value_output
    for layer in vit.layers:
        attention = layer.attention
        query_rows, key_rows = [], []
        for _ in range(heads):
            noise = torch.randn(width, width, generator=generator, dtype=torch.float64) / width ** 0.5
            query, key = low_rank_factors(a_qk * noise + b_qk * identity, head_dim)
            query_rows.append(query)
            key_rows.append(key)
        noise = torch.randn(width, width, generator=generator, dtype=torch.float64) / width ** 0.5
        value, output_transposed = low_rank_factors(a_vo * noise - b_vo * identity, width)
        for linear, weight in ((attention.q_proj, torch.cat(query_rows)), (attention.k_proj, torch.cat(key_rows)),
                               (attention.v_proj, value), (attention.o_proj, output_transposed.T)):
            linear.weight.copy_(weight.to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias.zero_()


def initialize_attention_(vit: nn.Module, method: str, seed: int) -> None:
    """A recipe's `attention_init` on a freshly built transformers ViT: "random" keeps the model's own
    initialisation (truncated normal, std 0.02), "mimetic" applies `initialize_mimetic_attention_`."""
    if method == "mimetic":
        initialize_mimetic_attention_(vit, seed)
    elif method != "random":
        raise ValueError(f"attention_init {method!r} is unknown; use one of {', '.join(ATTENTION_INITS)}")
