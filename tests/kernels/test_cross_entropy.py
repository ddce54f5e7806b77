"""Cross-entropy and fused linear cross-entropy, Triton (under TRITON_INTERPRET=1, or compiled
on the GPU with CPTFAST_TEST_DEVICE=cuda) and the PyTorch reference, against a float64 oracle
built on torch.nn.functional.cross_entropy. Inputs are drawn on the CPU and moved to the test
device, so both modes check the same numbers."""

import pytest
import torch
import torch.nn.functional as F

import cptfast
from cptfast import reference

OPTION_SETS = {
    "plain": {},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
}


def oracle(logits64, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
           softcap=None, reduction="mean"):
    """float64 loss from PyTorch's own cross-entropy, plus softcap and z-loss around it."""
    z = softcap * torch.tanh(logits64 / softcap) if softcap is not None else logits64
    per_row = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    counted = labels != ignore_index
    per_row = per_row + torch.where(counted, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / counted.sum().clamp(min=1) if reduction == "mean" else total


def relative_error(got, want):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "NaN in the result"
    # Relative to the largest expected magnitude (absolute below 1e-3: all-zero gradients).
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-3))


def tolerance(dtype, tf32=False):
    """bf16 1e-2, fp32 1e-5. ``tf32``: the fp32 result went through a Triton tl.dot on a GPU
    (the fused tile kernel), whose fp32 inputs are rounded to TF32, 4x finer than bf16: 1e-2 / 4.
    The cross-entropy of given logits has no dot: fp32 stays at 1e-5 on every device."""
    if dtype == torch.bfloat16:
        return 1e-2
    return 2.5e-3 if tf32 else 1e-5


def through_tf32(device, backend) -> bool:
    """Whether fp32 matmuls of the fused loss may run through a Triton tl.dot in TF32."""
    return device.type == "cuda" and backend == "triton"


def make_labels(n, vocab, generator, ignore_every=3):
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[::ignore_every] = -100  # ignored rows, including row 0
    return labels


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("CPTFAST_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,vocab", [(1, 1), (17, 7), (255, 1000), (17, 32003)])
def test_cross_entropy(backend, poisoned, device, n, vocab, dtype, options, reduction):
    generator = torch.Generator().manual_seed(n * 7919 + vocab)
    logits = (torch.randn(n, vocab, generator=generator) * 3).to(device, dtype).requires_grad_()
    labels = make_labels(n, vocab, generator).to(device)
    kwargs = dict(OPTION_SETS[options], reduction=reduction)
    loss, lse = cptfast.cross_entropy(logits, labels, return_lse=True, **kwargs)
    upstream = torch.randn(loss.shape, generator=generator).to(device) \
        if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss, logits, upstream)

    x64 = logits.detach().double().requires_grad_()
    want = oracle(x64, labels, **kwargs)
    (want_grad,) = torch.autograd.grad(want, x64, None if upstream is None else upstream.double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert relative_error(loss, want) < tolerance(dtype)
    assert relative_error(grad, want_grad) < tolerance(dtype)
    z = x64.detach() if "softcap" not in kwargs else 4.0 * torch.tanh(x64.detach() / 4.0)
    assert relative_error(lse, torch.logsumexp(z, -1)) < 1e-5


def test_cross_entropy_many_rows_wide_vocab(backend, poisoned, device):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(255, 32003, generator=generator).to(device).requires_grad_()
    labels = make_labels(255, 32003, generator, ignore_every=5).to(device)
    loss = cptfast.cross_entropy(logits, labels, label_smoothing=0.05)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach().double().requires_grad_()
    want = oracle(x64, labels, label_smoothing=0.05)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert relative_error(loss, want) < 1e-5 and relative_error(grad, want_grad) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(backend, poisoned, device, reduction):
    logits = torch.randn(9, 50).to(device).requires_grad_()
    labels = torch.full((9,), -100).to(device)
    loss = cptfast.cross_entropy(logits, labels, reduction=reduction, z_loss=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_nan_input_gives_nan_loss(backend, device):
    logits = torch.randn(4, 300).to(device)
    logits[2, 123] = float("nan")
    labels = torch.tensor([1, 2, 3, 4]).to(device)
    assert torch.isnan(cptfast.cross_entropy(logits, labels))
    assert torch.isnan(cptfast.cross_entropy(logits, labels, reduction="none")[2])
    logits[2, 123] = float("inf")
    assert not torch.isfinite(cptfast.cross_entropy(logits, labels))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_in_an_ignored_row_stay_out_of_loss_and_gradient(backend, poisoned,
                                                                            device, bad):
    # A padding or boundary token whose logits overflowed: ignored, so it must not poison the
    # gradient (0 * NaN is NaN), which would reach grad_weight through grad.T @ hidden.
    generator = torch.Generator().manual_seed(11)
    logits64 = torch.randn(7, 300, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 300, (7,), generator=generator)
    labels[[0, 4]] = -100
    logits64[4, 17], logits64[0] = bad, bad
    logits = logits64.float().to(device).requires_grad_()
    loss = cptfast.cross_entropy(logits, labels.to(device), z_loss=1e-3, label_smoothing=0.1)
    loss.backward()
    counted = labels != -100
    want = oracle(logits64[counted], labels[counted], z_loss=1e-3, label_smoothing=0.1)
    assert relative_error(loss, want) < 1e-5
    grad = logits.grad.cpu()
    assert torch.isfinite(grad).all() and torch.equal(grad[[0, 4]], torch.zeros(2, 300))
    logits64.requires_grad_()
    oracle(logits64[counted], labels[counted], z_loss=1e-3, label_smoothing=0.1).backward()
    assert relative_error(grad[counted], logits64.grad[counted]) < 1e-5


def test_bad_arguments_are_named(backend):
    # CPU tensors in both modes: these checks are made on the host before any launch (on a GPU
    # an out-of-range label trips a device-side assertion instead, which ends the process).
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"label 10 at row 1 is outside \[0, 10\)"):
        cptfast.cross_entropy(logits, torch.tensor([0, 10, -100]))
    with pytest.raises(ValueError, match="label -5 at row 0"):
        cptfast.cross_entropy(logits, torch.tensor([-5, 1, 2]))
    with pytest.raises(ValueError, match="labels must have shape \\[3\\]"):
        cptfast.cross_entropy(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cptfast.cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="softcap must be positive"):
        cptfast.cross_entropy(logits, torch.tensor([0, 1, 2]), softcap=0.0)
    with pytest.raises(ValueError, match="need hidden"):
        cptfast.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 5),
                                           torch.tensor([0, 1, 2]))


def fused_oracle(hidden, weight, labels, bias, **kwargs):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return oracle(logits, labels, **kwargs)


def fused_cases():
    """Every option x reduction x bias x dtype at the small shapes; at V=32,003 (slow under
    the interpreter) every option and reduction once, alternating dtype and bias."""
    cases = []
    for n, vocab, hidden_size in [(5, 1, 16), (1, 7, 16), (17, 1000, 96), (255, 1000, 16)]:
        for dtype in (torch.float32, torch.bfloat16):
            for with_bias in (False, True):
                # V = 1 with z-loss: the gradient is 2 z_loss lse, the difference of O(1) terms,
                # so fp32 cancellation dominates a relative comparison; plain options only.
                for options in OPTION_SETS if vocab > 1 else ["plain"]:
                    for reduction in ("mean", "sum", "none"):
                        cases.append((n, vocab, hidden_size, dtype, with_bias, options, reduction))
    for k, (options, reduction) in enumerate(
            (o, r) for o in OPTION_SETS for r in ("mean", "sum", "none")):
        dtype = (torch.float32, torch.bfloat16)[k % 2]
        cases.append((17, 32003, 16, dtype, k % 3 == 0, options, reduction))
    return [pytest.param(*case, id=f"N{case[0]}-V{case[1]}-H{case[2]}-{str(case[3])[6:]}-"
                                   f"{'bias' if case[4] else 'nobias'}-{case[5]}-{case[6]}")
            for case in cases]


@pytest.mark.parametrize("n,vocab,hidden_size,dtype,with_bias,options,reduction", fused_cases())
def test_fused_linear_cross_entropy(backend, poisoned, monkeypatch, device, n, vocab, hidden_size,
                                    dtype, with_bias, options, reduction):
    # Chunks of ~5 rows, so every case crosses chunk boundaries (the Triton tile kernel's
    # 64 x 64 tiles are crossed by the sizes themselves).
    from cptfast.kernels import _autograd
    monkeypatch.setattr(_autograd, "DEFAULT_CHUNK_BYTES", dict.fromkeys(("cpu", "cuda"),
                                                                        5 * vocab * dtype.itemsize))
    generator = torch.Generator().manual_seed(n + vocab + hidden_size)
    hidden = torch.randn(n, hidden_size, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5 * 3) \
        .to(device, dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(device, dtype).requires_grad_() \
        if with_bias else None
    labels = make_labels(n, vocab, generator).to(device)
    kwargs = dict(OPTION_SETS[options], reduction=reduction)
    loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **kwargs)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    upstream = torch.randn(loss.shape, generator=generator).to(device) \
        if reduction == "none" else None
    grads = torch.autograd.grad(loss, inputs, upstream)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    want = fused_oracle(inputs64[0], inputs64[1], labels, inputs64[2] if with_bias else None,
                        **kwargs)
    want_grads = torch.autograd.grad(want, inputs64,
                                     None if upstream is None else upstream.double())
    # In bf16, weight and bias gradients sum rounded per-element gradients over rows, with
    # cancellation: where PyTorch's own eager bf16 computation is off by more than 1e-2, allow
    # that error, with 1.5x for the different (equally valid) rounding order.
    eager_inputs = [t.detach().requires_grad_() for t in inputs]
    eager = fused_oracle_eager(eager_inputs, labels, with_bias, **kwargs)
    eager_grads = torch.autograd.grad(eager, eager_inputs, upstream)
    tf32 = through_tf32(device, backend)
    assert relative_error(loss, want) < tolerance(dtype, tf32)
    for got, expected, baseline, name in zip(grads, want_grads, eager_grads,
                                             ("hidden", "weight", "bias")):
        assert got.dtype == dtype, name
        allowed = tolerance(dtype, tf32)
        if dtype != torch.float32:
            allowed = max(allowed, 1.5 * relative_error(baseline, expected))
        assert relative_error(got, expected) < allowed, name


def fused_oracle_eager(inputs, labels, with_bias, **kwargs):
    """The same loss computed the way a user would in eager PyTorch, in the inputs' dtype."""
    logits = inputs[0] @ inputs[1].T
    if with_bias:
        logits = logits + inputs[2]
    z = kwargs["softcap"] * torch.tanh(logits / kwargs["softcap"]) if kwargs.get("softcap") \
        else logits
    per_row = F.cross_entropy(z.float(), labels, reduction="none",
                              label_smoothing=kwargs.get("label_smoothing", 0.0))
    per_row = per_row + torch.where(labels != -100,
                                    kwargs.get("z_loss", 0.0) * torch.logsumexp(z.float(), -1) ** 2,
                                    0.0)
    if kwargs["reduction"] == "none":
        return per_row
    return per_row.sum() / ((labels != -100).sum().clamp(min=1)
                            if kwargs["reduction"] == "mean" else 1)


def test_fused_with_weight_tied_to_the_embedding(backend, device):
    # The same parameter as input embedding and output head: gradients from both uses add up.
    torch.manual_seed(0)
    embedding = torch.randn(50, 8).to(device).requires_grad_()
    tokens = torch.randint(0, 50, (12,)).to(device)
    labels = torch.randint(0, 50, (12,)).to(device)
    hidden = torch.tanh(embedding[tokens])
    loss = cptfast.fused_linear_cross_entropy(hidden, embedding, labels)
    (grad,) = torch.autograd.grad(loss, embedding)
    e64 = embedding.detach().double().requires_grad_()
    want = fused_oracle(torch.tanh(e64[tokens]), e64, labels, None)
    (want_grad,) = torch.autograd.grad(want, e64)
    assert relative_error(grad, want_grad) < tolerance(torch.float32, through_tf32(device, backend))


def finite_difference_check(fn, inputs, upstream, eps=1e-6):
    """gradcheck with one backward per graph (the saved gradients are scaled in place, so
    autograd refuses a replay of the same graph): the analytical vector-Jacobian product of
    one backward against central differences of sum(upstream * fn), element by element."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(fn(*inputs), inputs, upstream)
    with torch.no_grad():
        for x, grad in zip(inputs, grads):
            flat = x.view(-1)
            numeric = torch.empty_like(flat)
            for i in range(flat.numel()):
                value = float(flat[i])
                flat[i] = value + eps
                plus = (fn(*inputs) * upstream).sum()
                flat[i] = value - eps
                minus = (fn(*inputs) * upstream).sum()
                flat[i] = value
                numeric[i] = (plus - minus) / (2 * eps)
            assert torch.allclose(grad.view(-1), numeric, rtol=1e-5, atol=1e-7)


def test_reference_gradients_in_float64_against_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(6, 9, dtype=torch.float64)
    labels = torch.tensor([1, -100, 8, 0, 3, 3])
    options = dict(label_smoothing=0.2, z_loss=0.1, softcap=3.0)
    hidden = torch.randn(6, 4, dtype=torch.float64)
    weight = torch.randn(9, 4, dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        upstream = torch.randn(6, dtype=torch.float64) if reduction == "none" \
            else torch.tensor(1.7, dtype=torch.float64)
        finite_difference_check(
            lambda x: reference.cross_entropy(x, labels, reduction=reduction, **options),
            (logits,), upstream)
        finite_difference_check(
            lambda h, w, b: reference.fused_linear_cross_entropy(
                h, w, labels, bias=b, reduction=reduction, chunk_bytes=2 * 9 * 8, **options),
            (hidden, weight, bias), upstream)


def test_second_backward_through_the_same_graph(backend, device):
    # Both paths scale their saved gradients in place (no GPU sync to test for a unit scale),
    # so autograd refuses a second backward rather than scaling twice.
    logits = torch.randn(4, 20).to(device).requires_grad_()
    loss = cptfast.cross_entropy(logits, torch.tensor([1, 2, 3, 4]).to(device)) * 2
    torch.autograd.grad(loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, logits)


def test_strided_inputs(backend, poisoned, device):
    # A transposed view of logits and every-other-element labels: strides the kernel must honour.
    generator = torch.Generator().manual_seed(11)
    storage = torch.randn(300, 2 * 23, generator=generator).to(device)
    logits = storage.T[::2].detach().requires_grad_()       # [23, 300], column stride 46
    labels = torch.randint(0, 300, (46,), generator=generator).to(device)[::2]
    labels[4] = -100
    loss = cptfast.cross_entropy(logits, labels, reduction="sum", z_loss=0.01)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach().double().requires_grad_()
    want = oracle(x64, labels, reduction="sum", z_loss=0.01)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert relative_error(loss, want) < 1e-5 and relative_error(grad, want_grad) < 1e-5
    hidden = torch.randn(40, 8, generator=generator).to(device)[::2].requires_grad_()  # stride 16
    weight = torch.randn(8, 300, generator=generator).to(device).T.requires_grad_()  # transposed
    loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels[:20])
    grads = torch.autograd.grad(loss, (hidden, weight))
    inputs64 = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    want = fused_oracle(*inputs64, labels[:20], None)
    for got, expected in zip(grads, torch.autograd.grad(want, inputs64)):
        assert relative_error(got, expected) < tolerance(torch.float32,
                                                         through_tf32(device, backend))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_all_ignored_gives_zero_loss_and_zero_gradients(backend, poisoned, device,
                                                              reduction):
    hidden, weight, bias = (torch.randn(*shape).to(device).requires_grad_()
                            for shape in ((9, 16), (70, 16), (70,)))
    loss = cptfast.fused_linear_cross_entropy(hidden, weight, torch.full((9,), -100).to(device),
                                              bias=bias, reduction=reduction, z_loss=0.1)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_nan_in_an_ignored_row_leaves_the_gradients_finite(backend, poisoned, device,
                                                                 reduction):
    # The hidden state of an ignored (padding, boundary) token went NaN: its gradient row is
    # zero, and grad_weight = grad.T @ hidden must not pick up 0 * NaN.
    generator = torch.Generator().manual_seed(13)
    hidden64 = torch.randn(11, 16, generator=generator, dtype=torch.float64)
    weight64 = torch.randn(70, 16, generator=generator, dtype=torch.float64) / 4
    labels = torch.randint(0, 70, (11,), generator=generator)
    labels[[2, 7]] = -100
    hidden64[2] = float("nan")
    hidden64[7, 3] = float("inf")
    hidden, weight = (t.float().to(device).requires_grad_() for t in (hidden64, weight64))
    loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels.to(device),
                                              reduction=reduction)
    loss.sum().backward()
    counted = labels != -100
    h64, w64 = hidden64[counted].clone().requires_grad_(), weight64.clone().requires_grad_()
    want = oracle(h64 @ w64.T, labels[counted], reduction=reduction)
    want.sum().backward()
    assert relative_error(loss.cpu()[counted] if reduction == "none" else loss, want) < 1e-4
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    assert relative_error(weight.grad, w64.grad) < 1e-4
    assert torch.equal(hidden.grad.cpu()[~counted], torch.zeros(2, 16))
    assert relative_error(hidden.grad.cpu()[counted], h64.grad) < 1e-4


def test_reference_path_compiles_without_graph_breaks(monkeypatch, device):
    monkeypatch.setenv("CPTFAST_BACKEND", "torch")
    torch.manual_seed(0)
    hidden = torch.randn(12, 16).to(device).requires_grad_()
    weight = torch.randn(50, 16).to(device).requires_grad_()
    labels = torch.randint(0, 50, (12,)).to(device)

    def loss_fn(h, w):
        return cptfast.fused_linear_cross_entropy(h, w, labels, z_loss=1e-3) + \
            cptfast.cross_entropy(h @ w.T, labels, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    want = torch.autograd.grad(loss_fn(hidden, weight), (hidden, weight))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_loss_without_gradients(backend, poisoned, device, dtype, options):
    # Without gradients the Triton path runs the tile kernel: logits only in registers. 150
    # rows and 333 classes cross the 64- and 128-wide tiles (fp32 and half precision).
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(150, 40, generator=generator).to(device, dtype)
    weight = (torch.randn(333, 40, generator=generator) / 3).to(device, dtype)
    bias = torch.randn(333, generator=generator).to(device, dtype)
    labels = make_labels(150, 333, generator).to(device)
    with torch.no_grad():
        loss, lse = cptfast.fused_linear_cross_entropy(hidden, weight, labels, bias=bias,
                                                       return_lse=True, **OPTION_SETS[options])
    logits = hidden.double() @ weight.double().T + bias.double()
    want = oracle(logits, labels, **OPTION_SETS[options])
    z = 4.0 * torch.tanh(logits / 4.0) if options == "all" else logits
    allowed = tolerance(dtype, through_tf32(device, backend))
    assert relative_error(loss, want) < allowed
    assert relative_error(lse, torch.logsumexp(z, -1)) < allowed
