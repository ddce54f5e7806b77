"""Rotary embeddings (Triton under TRITON_INTERPRET=1 or compiled on the GPU with
CPTFAST_TEST_DEVICE=cuda, and the reference) against transformers' own apply_rotary_pos_emb in
float64, with position ids that restart in every packed document. No dot product in the
kernel: the tolerances are the same on every device. The Triton path's structure is checked too:
q and k in one launch, cos/sin read once per token, a backward that reads the incoming gradient
and writes a fresh one (no clone)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import cptfast
from cptfast import hf
from cptfast.kernels import rope as rope_module


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("CPTFAST_BACKEND", request.param)
    return request.param


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 128), (2, 2, 16),
                                                       (5, 1, 16), (5, 1, 256), (16, 3, 32)])
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


def tables(positions, head_dim, heads=2):
    config = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads,
                         num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=256)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float64),
                                            positions[None, :])
    return cos[0], sin[0]  # [T, D] float64


def rotated64(x, cos, sin):
    """transformers' rotation of x [T, H, D] in float64 (its [batch, heads, T, D] layout)."""
    out, _ = apply_rotary_pos_emb(x.double().transpose(0, 1)[None], x.double()[:1].transpose(
        0, 1)[None], cos[None], sin[None])
    return out[0].transpose(0, 1)


def relative_error(got, want):
    return float((got.detach().double().cpu() - want.detach()).abs().max()
                 / want.detach().abs().max())


class LaunchRecorder:
    """Stands in for rope_kernel: records each launch's grid and arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.running = kernel, [], False

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            self.running = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.running = False
        return launch


@pytest.fixture
def launches(monkeypatch):
    monkeypatch.setenv("CPTFAST_BACKEND", "triton")
    recorder = LaunchRecorder(rope_module.rope_kernel)
    monkeypatch.setattr(rope_module, "rope_kernel", recorder)
    return recorder


@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 64), (5, 1, 16), (1, 5, 256)])
def test_q_and_k_rotate_in_one_launch(launches, device, q_heads, kv_heads, head_dim):
    tokens = 21
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(tokens, q_heads, head_dim, generator=generator).to(device)
    k = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(device)
    cos, sin = tables(packed_positions([4, 17]), head_dim)
    cptfast.apply_rotary_(q, k, cos.float().to(device), sin.float().to(device))
    assert len(launches.launches) == 1
    grid, args, kwargs = launches.launches[0]
    assert args[0] is q and args[1] is q and args[2] is k and args[3] is k  # in place, both
    # One program per block of BLOCK_T tokens: each reads its tokens' cos/sin once, for all of
    # q's and k's heads.
    assert grid == (-(-tokens // kwargs["BLOCK_T"]),) and not kwargs["BACKWARD"]
    assert kwargs == {"BACKWARD": False,
                      **rope_module.launch_config(min(q_heads, kv_heads), head_dim)}


class Recorded(TorchDispatchMode):
    """The aten ops run outside rope_kernel's launches (the interpreter copies arguments)."""

    def __init__(self, recorder):
        super().__init__()
        self.recorder, self.ops = recorder, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.recorder.running:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("expanded", [False, True], ids=["dense_grad", "expanded_grad"])
def test_backward_reads_the_gradient_and_writes_a_fresh_one(launches, device, monkeypatch,
                                                             expanded):
    tokens, head_dim = 19, 16
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(tokens, 5, head_dim, generator=generator)
    k = torch.randn(tokens, 1, head_dim, generator=generator)
    cos, sin = tables(packed_positions([7, 12]), head_dim)
    leaf_q, leaf_k = (t.to(device).requires_grad_() for t in (q, k))
    out_q, out_k = cptfast.apply_rotary_(leaf_q * 1, leaf_k * 1, cos.float().to(device),
                                         sin.float().to(device))
    seen = []  # (incoming gradient, the backward's ops, its result)
    backward = rope_module._Rotated.backward

    def recorded_backward(ctx, grad):
        with Recorded(launches) as mode:
            result = backward(ctx, grad)
        seen.append((grad, mode.ops, result[0]))
        return result

    monkeypatch.setattr(rope_module._Rotated, "backward", staticmethod(recorded_backward))
    del launches.launches[:]
    if expanded:  # sum(): the incoming gradients are expanded ones (stride 0), read as they are
        upstream_q, upstream_k = torch.ones(q.shape), torch.ones(k.shape)
        grad_q, grad_k = torch.autograd.grad(out_q.sum() + out_k.sum(), (leaf_q, leaf_k))
    else:
        upstream_q, upstream_k = (torch.randn(t.shape, generator=generator) for t in (q, k))
        grad_q, grad_k = torch.autograd.grad((out_q, out_k), (leaf_q, leaf_k),
                                             (upstream_q.to(device), upstream_k.to(device)))
    assert len(seen) == 2 and len(launches.launches) == 2  # one launch per gradient
    for (grad, ops, result), (_, args, kwargs) in zip(seen, launches.launches):
        assert ops == [torch.ops.aten.empty.memory_format]  # the output; no clone, no copy
        assert args[0] is grad and args[1] is result and kwargs["BACKWARD"]
        assert result.data_ptr() != grad.data_ptr() and result.is_contiguous()
        assert args[8] == 0  # kv_heads: the one gradient only
    assert (grad.stride() == (0, 0, 0)) == expanded
    for got, upstream in ((grad_q, upstream_q), (grad_k, upstream_k)):
        want = rotated64(upstream, cos, -sin)  # the inverse rotation
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(5, 1, 16), (4, 2, 256), (3, 3, 64)])
@pytest.mark.parametrize("layout", ["projections", "fused_qkv", "hf"])
def test_gradients_through_views_of_projections(backend, device, dtype, q_heads, kv_heads,
                                                head_dim, layout):
    """q and k as views of projection outputs (separate, or slices of one fused qkv output as in
    Phi-3; "hf": the [B, S, H, D] views transposed, through cptfast.hf's rotary), gradients of
    the input and the weights against the same computation in float64."""
    batch, seq, hidden = 2, 13, 24
    positions = torch.cat([packed_positions([5, 8]), packed_positions([13])])
    cos, sin = tables(positions, head_dim)
    generator = torch.Generator().manual_seed(head_dim + q_heads)
    x = torch.randn(batch * seq, hidden, generator=generator)
    widths = (q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    w = torch.randn(hidden, sum(widths), generator=generator) / hidden ** 0.5
    up_q, up_k, up_v = (torch.randn(batch * seq, width, generator=generator)
                        for width in widths)

    def loss(x, w, rotate):
        if layout == "fused_qkv":
            qkv = x @ w
            # Slices as Phi-3 takes them (split() returns several views: none may be modified
            # in place, by autograd's rule, whatever rotates them).
            edges = [0, widths[0], widths[0] + widths[1], sum(widths)]
            q, k, v = (qkv[:, a:b] for a, b in zip(edges, edges[1:]))
        else:  # separate projection outputs (q's and k's own bases)
            q, k, v = (x @ part for part in w.split(widths, dim=1))
        q, k = q.view(-1, q_heads, head_dim), k.view(-1, kv_heads, head_dim)
        q, k = rotate(q, k)
        return (q.reshape(up_q.shape) * up_q.to(q)).sum() + (
            k.reshape(up_k.shape) * up_k.to(k)).sum() + (v * up_v.to(v)).sum()

    def fast(q, k):
        cos_d, sin_d = cos.float().to(device), sin.float().to(device)
        if layout != "hf":
            return cptfast.apply_rotary_(q, k, cos_d, sin_d)
        q4 = q.view(batch, seq, q_heads, head_dim).transpose(1, 2)
        k4 = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q4, k4 = hf._fused_rotary(q4, k4, cos_d.view(batch, seq, -1),
                                  sin_d.view(batch, seq, -1), 1, apply_rotary_pos_emb)
        return (q4.transpose(1, 2).reshape(q.shape), k4.transpose(1, 2).reshape(k.shape))

    x_fast, w_fast = (t.to(device, dtype).requires_grad_() for t in (x, w))
    got = torch.autograd.grad(loss(x_fast, w_fast, fast), (x_fast, w_fast))
    x64, w64 = (t.to(dtype).double().requires_grad_() for t in (x, w))
    want = torch.autograd.grad(
        loss(x64, w64, lambda q, k: (rotated64(q, cos, sin), rotated64(k, cos, sin))),
        (x64, w64))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for g, wanted in zip(got, want):
        assert g.dtype == dtype
        assert relative_error(g, wanted) < tolerance


def test_a_refused_rotation_changes_nothing(monkeypatch, device):
    # Autograd refuses to modify a leaf that requires grad in place; the Triton path's
    # Functions are applied before its launch, so neither q nor k is left rotated. (The
    # reference rotates q, then k, and may leave q rotated.)
    monkeypatch.setenv("CPTFAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(6, 3, 16, generator=generator).to(device)
    k = torch.randn(6, 1, 16, generator=generator).to(device)
    cos, sin = (t.float().to(device) for t in tables(torch.arange(6), 16))
    for leaf in ("q", "k"):
        q_in, k_in = q.clone().requires_grad_(leaf == "q"), k.clone().requires_grad_(leaf == "k")
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            cptfast.apply_rotary_(q_in, k_in, cos, sin)
        assert torch.equal(q_in.detach(), q) and torch.equal(k_in.detach(), k)
