"""Rotary embeddings (Triton under TRITON_INTERPRET=1 or compiled on the GPU with
CPTFAST_TEST_DEVICE=cuda, and the reference) against transformers' own apply_rotary_pos_emb in
float64, with position ids that restart in every packed document. No dot product: the
tolerances are the same on every device."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import cptfast


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("CPTFAST_BACKEND", request.param)
    return request.param


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 128), (2, 2, 16)])
def test_rotary_matches_transformers(backend, device, dtype, q_heads, kv_heads, head_dim):
    lengths = [1, 37, 5, 90]
    positions = packed_positions(lengths)
    tokens = len(positions)
    config = LlamaConfig(hidden_size=head_dim * q_heads, num_attention_heads=q_heads,
                         num_key_value_heads=kv_heads, rope_theta=10000.0,
                         max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(head_dim)
    q = torch.randn(tokens, q_heads, head_dim, generator=generator)
    k = torch.randn(tokens, kv_heads, head_dim, generator=generator)
    cos, sin = rotary(q.double(), positions[None, :])  # [1, T, D]
    # transformers' layout: [batch, heads, T, D]
    want_q, want_k = apply_rotary_pos_emb(q.double().transpose(0, 1)[None],
                                          k.double().transpose(0, 1)[None], cos, sin)
    want_q, want_k = want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)

    leaf_q, leaf_k = (t.to(device, dtype).requires_grad_() for t in (q, k))
    q_in, k_in = leaf_q * 1, leaf_k * 1  # non-leaf copies: rotated in place
    out_q, out_k = cptfast.apply_rotary_(q_in, k_in, cos[0].float().to(device),
                                         sin[0].float().to(device))
    assert out_q.data_ptr() == q_in.data_ptr()  # in place
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((out_q, want_q), (out_k, want_k)):
        assert float((got.double().cpu() - want).abs().max() / want.abs().max()) < tolerance
    # Backward: the rotation is orthogonal, so the gradient is the inverse rotation.
    upstream_q = torch.randn(out_q.shape, generator=generator)
    upstream_k = torch.randn(out_k.shape, generator=generator)
    grad_q, grad_k = torch.autograd.grad((out_q, out_k), (leaf_q, leaf_k),
                                         (upstream_q.to(device, dtype),
                                          upstream_k.to(device, dtype)))
    q64 = q.double().requires_grad_()
    k64 = k.double().requires_grad_()
    ref_q, ref_k = apply_rotary_pos_emb(q64.transpose(0, 1)[None], k64.transpose(0, 1)[None],
                                        cos, sin)
    want_grads = torch.autograd.grad(
        (ref_q, ref_k), (q64, k64), (upstream_q.to(dtype).double().transpose(0, 1)[None],
                                     upstream_k.to(dtype).double().transpose(0, 1)[None]))
    for got, want in zip((grad_q, grad_k), want_grads):
        assert float((got.double().cpu() - want).abs().max() / want.abs().max()) < tolerance


def test_rotary_bad_arguments(backend):
    q, k = torch.randn(5, 2, 8), torch.randn(5, 1, 8)
    with pytest.raises(ValueError, match="cos and sin must be"):
        cptfast.apply_rotary_(q, k, torch.ones(4, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="even head_dim"):
        cptfast.apply_rotary_(torch.randn(5, 2, 7), torch.randn(5, 1, 7), torch.ones(5, 7),
                              torch.ones(5, 7))
