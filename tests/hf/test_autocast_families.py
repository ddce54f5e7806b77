"""cptfast.accelerate under bf16 mixed precision (``torch.autocast``) on the Triton path, for
every family of tests/hf/families.py and a Phi-3 with partial rotary: the accelerated model
trains (forward on a packed batch, backward, optimizer step, twice) and its losses match the
stock model's under the same autocast, documents taken alone (the independent oracle). On the
test device: the CPU (the kernels under the interpreter, CPU autocast) or, with
CPTFAST_TEST_DEVICE=cuda, the GPU (compiled kernels, CUDA autocast).

Under autocast the stock attention runs in the autocast dtype (SDPA is on autocast's
lower-precision list; eager's matmuls are too) while its RoPE may promote q and k to fp32
(fp32 rotary tables times bf16 projections: Phi-3's fused qkv_proj and partial rotary take
transformers' own rotary, Qwen 3's q/k norms return fp32). cptfast's attention gets q, k and v
in the autocast dtype whatever the rotary did.

Tolerances: the stock model builds bf16 logits, the fused loss works from the fp32 hidden state,
and the two attentions round bf16 differently; bf16 keeps 8 significant bits (4e-3 per
rounding), so the losses are compared to 2e-2 relative and the whole model's gradient to 1e-1
(the norm of the difference over the norm). Measured on the CPU: losses within 1.5e-3 and
gradients within 3.5e-2, about what the stock model's own bf16 autocast is off from its fp32 run
(1e-3 and 3e-2). A fault is far larger: a document seeing the other moves the loss by ~1e-1
(tests/hf/test_accelerate.py's negative control), and mixed dtypes fail outright.
"""

import copy

import pytest
import torch
import transformers

import cptfast
from cptfast import hf, ops
from families import COMMON, CONFIGS

CASES = {
    **CONFIGS,
    # Rotary on half of each head: the fused kernel does not apply, transformers' rotary runs.
    "phi3_partial_rotary": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5),
}
DOCUMENTS = [8, 11]  # both longer than the sliding window (6)
LOSS_TOLERANCE = 2e-2
GRAD_TOLERANCE = 1e-1
AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def packed_batch(device):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (1, sum(DOCUMENTS)), generator=generator)
    bounds = torch.tensor([0, *DOCUMENTS]).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
    labels = ids.clone()
    labels[0, bounds[:-1]] = -100  # no document learns to predict the next one
    cu_seqlens = bounds.to(device, torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                        max_length_q=max(DOCUMENTS), max_length_k=max(DOCUMENTS))
    return ids.to(device), labels.to(device), positions.to(device), bounds.tolist(), flash_kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_trains_under_bf16_autocast_like_the_stock_model(case, monkeypatch, device):
    monkeypatch.setenv("CPTFAST_BACKEND", "triton")  # attention, RoPE, loss: Triton kernels
    dtypes = []  # what reaches cptfast's attention
    real = ops.varlen_attention

    def spy(q, k, v, *args, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hf.ops, "varlen_attention", spy)
    rotated = []  # q/k dtypes the fused RoPE kernel rotates in place
    real_rotary = ops.apply_rotary_

    def rotary_spy(q, k, cos, sin):
        rotated.append((q.dtype, k.dtype))
        return real_rotary(q, k, cos, sin)

    monkeypatch.setattr(hf.ops, "apply_rotary_", rotary_spy)
    torch.manual_seed(0)
    stock = transformers.AutoModelForCausalLM.from_config(CASES[case]()).train().to(device)
    assert next(stock.parameters()).dtype == torch.float32
    fast = cptfast.accelerate(copy.deepcopy(stock))
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.05)
    ids, labels, positions, bounds, flash_kwargs = packed_batch(device)
    targets = sum(n - 1 for n in DOCUMENTS)
    losses = []
    for step in range(2):
        # The oracle holds the accelerated model's current weights: both are compared at the
        # same point (two trajectories of a tiny random model drift apart by more than bf16).
        stock.load_state_dict(fast.state_dict())
        stock.zero_grad()
        with torch.autocast(device.type, torch.bfloat16):
            got = fast(input_ids=ids, labels=labels, position_ids=positions, **flash_kwargs).loss
            want = sum(stock(input_ids=ids[:, a:b], labels=ids[:, a:b],
                             num_items_in_batch=targets).loss
                       for a, b in zip(bounds[:-1], bounds[1:]))
        assert torch.isfinite(got), (step, got)
        losses.append(float(got))
        assert relative_error(got, want) < LOSS_TOLERANCE, (step, float(got), float(want))
        got.backward()
        want.backward()
        wanted, gotten = [], []
        for (name, a), b in zip(stock.named_parameters(), fast.parameters()):
            if a.grad is None:
                assert b.grad is None or not b.grad.any(), (step, name)
                continue
            assert torch.isfinite(b.grad).all(), (step, name)
            wanted.append(a.grad.flatten())
            gotten.append(b.grad.flatten())
        wanted, gotten = torch.cat(wanted), torch.cat(gotten)
        error = float((gotten - wanted).norm() / wanted.norm())
        assert error < GRAD_TOLERANCE, (step, error)
        optimizer.step()
        optimizer.zero_grad()
    assert losses[1] < losses[0], losses  # the step went downhill on the same batch
    calls = 2 * stock.config.num_hidden_layers  # one per layer and step
    assert dtypes == [(torch.bfloat16,) * 3] * calls
    # The fused RoPE runs where it applies, on the projections' own dtype (bf16 under
    # autocast; fp32 after Qwen 3's fp32 q/k norms); Phi-3's fused qkv_proj takes
    # transformers' rotary, which promotes q and k to fp32 (the crash this file guards).
    if case.startswith("phi3"):
        assert rotated == []
    else:
        own = torch.float32 if case == "qwen3" else torch.bfloat16
        assert rotated == [(own, own)] * calls


class _Module:
    is_causal = True


def test_attention_brings_q_k_v_to_one_dtype():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, heads, 7, 16, generator=generator)
                         for heads in (4, 2, 2))
    # A direct call with mixed dtypes is still refused, with the dtypes named.
    with pytest.raises(ValueError, match="share one float dtype"):
        ops.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1),
                             value[0].transpose(0, 1).bfloat16(),
                             torch.tensor([0, 7], dtype=torch.int32), 7)
    # Outside autocast: v's dtype (RoPE promoted q and k; v is the projection's own).
    want, _ = hf.attention_forward(_Module(), query.bfloat16(), key.bfloat16(), value.bfloat16(),
                                   None)
    got, _ = hf.attention_forward(_Module(), query, key, value.bfloat16(), None)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    # Under autocast: the autocast dtype, as SDPA would run, even from fp32 inputs.
    with torch.autocast(**AUTOCAST):
        got, _ = hf.attention_forward(_Module(), query, key, value.bfloat16(), None)
        all_fp32, _ = hf.attention_forward(_Module(), query, key, value, None)
    assert got.dtype == all_fp32.dtype == torch.bfloat16
    assert torch.equal(got, want) and torch.equal(all_fp32, want)
    # Decoding with a KV cache (queries fewer than keys) takes the same dtype.
    with torch.autocast(**AUTOCAST):
        cached, _ = hf.attention_forward(_Module(), query[:, :, -2:], key, value, None)
    assert cached.dtype == torch.bfloat16
