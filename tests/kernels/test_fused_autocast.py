"""The fused linear cross-entropy under autocast behaves as lm_head (nn.Linear) would: every GEMM
in the autocast dtype, the inputs cast once per call (not per chunk), the loss math in fp32,
grad_weight accumulated in fp32 in place and delivered to an fp32 weight in fp32.

A TorchDispatchMode records every aten op of a forward + backward, on both backends, with
chunks of 5 rows so that every call crosses several chunks. The CPU build of torch has no
fp32-output half-precision GEMM (aten::addmm.dtype_out); CUDA builds do. The "cuda-like" runs
register a CPU kernel for it (and for aten::mm.dtype) for the duration of the test, so the code
path that the GPU takes is exercised here too.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cptfast
from cptfast.kernels import _autocast, _autograd

MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "matmul", "_scaled_mm",
           "linear", "mv", "addmv", "addmv_", "dot", "addbmm", "addbmm_", "_addmm_activation"}
N, V, H, ROWS = 23, 40, 16, 5  # 5 chunks of at most 5 rows


class Recorder(TorchDispatchMode):
    """Every aten op with its tensor arguments and the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        outputs = [r for r in (result if isinstance(result, (tuple, list)) else [result])
                   if isinstance(r, torch.Tensor)]
        name = func.overloadpacket.__name__
        operands = exact = None
        if name in MATMULS:  # the two matrix operands, and whether they hold bf16 values
            first = 1 if name.startswith(("addmm", "baddbmm", "addbmm", "addmv",
                                          "_addmm")) else 0
            operands = [a for a in args if isinstance(a, torch.Tensor)][first:first + 2]
            exact = [t.dtype == torch.bfloat16 or torch.equal(t, t.bfloat16().to(t.dtype))
                     for t in operands]
        self.calls.append(dict(
            name=name, op=str(func), args=args, kwargs=kwargs, inputs=inputs, outputs=outputs,
            operands=operands, bf16_exact=exact,
            # (shape, dtype) when made, of outputs that alias no input (new memory)
            fresh=[(tuple(o.shape), o.dtype) for o in outputs
                   if all(o.data_ptr() != i.data_ptr() for i in inputs)]))
        return result

    def matmuls(self):
        return [c for c in self.calls if c["name"] in MATMULS]


def mats(call):
    """The two matrix operands of a matmul-like op, and whether each holds bf16 values."""
    return call["operands"], call["bf16_exact"]


@pytest.fixture
def chunked(monkeypatch):
    # One budget for both paths, in the logits' dtype: ROWS rows of bf16 logits.
    monkeypatch.setattr(_autograd, "DEFAULT_CHUNK_BYTES", dict.fromkeys(("cpu", "cuda"),
                                                                        ROWS * V * 2))


@pytest.fixture
def cuda_like():
    """CPU kernels for aten::addmm.dtype_out and aten::mm.dtype (what CUDA builds of torch
    have), computed exactly in fp32; the lookups of them are cleared before and after."""
    def addmm_dtype_out(self, mat1, mat2, out_dtype, *, beta=1, alpha=1, out):
        out.copy_(torch.addmm(self.to(out_dtype), mat1.to(out_dtype), mat2.to(out_dtype),
                              beta=beta, alpha=alpha))
        return out

    def mm_dtype(self, mat2, out_dtype):
        return torch.mm(self.to(out_dtype), mat2.to(out_dtype))

    def clear_lookups():
        _autocast.fp32_out_gemm.cache_clear()  # one lookup serves both paths

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("addmm.dtype_out", addmm_dtype_out, "CPU")
    lib.impl("mm.dtype", mm_dtype, "CPU")
    clear_lookups()
    yield
    lib._destroy()
    clear_lookups()


def inputs(seed=0, with_bias=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) * 3 / H ** 0.5).requires_grad_()
    bias = torch.randn(V, generator=generator).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (N,), generator=generator)
    labels[::4] = -100
    return hidden, weight, bias, labels


def run_recorded(reduction, with_bias=False):
    hidden, weight, bias, labels = inputs(with_bias=with_bias)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)) \
        if reduction == "none" else None
    params = [t for t in (hidden, weight, bias) if t is not None]
    with Recorder() as recorder:
        with torch.autocast("cpu", torch.bfloat16):
            loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels, bias=bias,
                                                      reduction=reduction)
        grads = torch.autograd.grad(loss, params, upstream)
    return recorder, (hidden, weight, bias, labels, upstream), loss, grads


def describe(calls):
    return [(c["op"], [tuple(t.shape) for t in c["inputs"]], [t.dtype for t in c["inputs"]])
            for c in calls]


def check_casts_once(recorder):
    """Exactly one cast to bf16 of hidden and one of weight in the whole call; nothing else is
    cast down to bf16 (no per-chunk casts)."""
    down = [c for c in recorder.calls if c["name"] == "_to_copy"
            and c["outputs"][0].dtype == torch.bfloat16]
    shapes = sorted(tuple(c["inputs"][0].shape) for c in down)
    assert shapes == sorted([(N, H), (V, H)]), describe(down)


def check_no_weight_sized_temporaries(recorder, allowed_casts=1):
    """Tensors of weight's shape freshly made: the fp32 accumulator and the bf16 cast of the
    weight, once each; none per chunk (an out-of-place matmul, an fp32 copy of the weight)."""
    fresh = [(c["op"], dtype) for c in recorder.calls for shape, dtype in c["fresh"]
             if shape == (V, H)]
    casts = [f for f in fresh if "_to_copy" in f[0]]
    others = [f for f in fresh if "_to_copy" not in f[0]]
    assert len(casts) == allowed_casts, fresh
    assert len(others) == 1 and others[0][1] == torch.float32, fresh  # the accumulator


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_gemm_in_bf16_on_the_cpu(monkeypatch, chunked, backend, reduction):
    """The CPU as it is: every GEMM has bf16 operands, except that grad_weight's accumulation,
    which has no fp32-output bf16 kernel on the CPU, runs in place into the fp32 accumulator
    on fp32 copies of bf16 values (exactly the bf16 operands)."""
    monkeypatch.setenv("CPTFAST_BACKEND", backend)
    assert not _autocast.fp32_out_gemm("cpu")
    recorder, *_ = run_recorded(reduction)
    matmuls = recorder.matmuls()
    chunks = -(-N // ROWS)
    assert len(matmuls) >= 3 * chunks, describe(matmuls)
    accumulations = 0
    for call in matmuls:
        (a, b), exact = mats(call)
        if a.dtype == b.dtype == torch.bfloat16:
            continue
        # The only exception: out += a @ b in place into the [V, H] fp32 accumulator.
        assert call["op"] == "aten.addmm_.default", describe([call])
        assert tuple(call["args"][0].shape) == (V, H) and call["args"][0].dtype == torch.float32
        assert all(exact), f"{call['op']}: fp32 operands that are not bf16 values"
        accumulations += 1
    assert accumulations == chunks
    check_casts_once(recorder)
    check_no_weight_sized_temporaries(recorder)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_gemm_in_bf16_where_fp32_output_gemms_exist(monkeypatch, chunked, cuda_like,
                                                          backend, reduction):
    """With aten::addmm.dtype_out (CUDA): every GEMM, the accumulation included, has bf16
    operands, and the accumulation writes in place into the fp32 accumulator."""
    monkeypatch.setenv("CPTFAST_BACKEND", backend)
    recorder, *_ = run_recorded(reduction)
    matmuls = recorder.matmuls()
    chunks = -(-N // ROWS)
    for call in matmuls:
        (a, b), _ = mats(call)
        assert a.dtype == b.dtype == torch.bfloat16, describe([call])
    accumulations = [c for c in matmuls if c["op"] == "aten.addmm.dtype_out"]
    assert len(accumulations) == chunks, describe(matmuls)
    for call in accumulations:
        accumulator = call["args"][0]
        assert accumulator.dtype == torch.float32 and tuple(accumulator.shape) == (V, H)
        assert call["kwargs"]["out"] is accumulator
    check_casts_once(recorder)
    check_no_weight_sized_temporaries(recorder)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_weight_accumulates_in_place(monkeypatch, chunked, cuda_like, backend):
    """bf16 parameters (no autocast), where fp32-output bf16 GEMMs exist: each chunk's
    grad_weight GEMM writes straight into the fp32 accumulator, with no weight-sized temporary
    per chunk (an out-of-place fp32 GEMM result added afterwards would be one)."""
    monkeypatch.setenv("CPTFAST_BACKEND", backend)
    hidden, weight, _, labels = inputs()
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()
    with Recorder() as recorder:
        loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels)
        grads = torch.autograd.grad(loss, [hidden, weight])
    assert grads[1].dtype == torch.bfloat16
    matmuls = recorder.matmuls()
    for call in matmuls:
        (a, b), _ = mats(call)
        assert a.dtype == b.dtype == torch.bfloat16, describe([call])
    accumulations = [c for c in matmuls if c["op"] == "aten.addmm.dtype_out"]
    assert len(accumulations) == -(-N // ROWS), describe(matmuls)
    check_no_weight_sized_temporaries(recorder)  # the one cast: the fp32 sum to bf16 at the end


def test_no_casts_without_autocast(monkeypatch, chunked):
    """Outside autocast fp32 stays fp32: nothing is cast, every GEMM is fp32."""
    for backend in ("triton", "torch"):
        monkeypatch.setenv("CPTFAST_BACKEND", backend)
        hidden, weight, _, labels = inputs()
        with Recorder() as recorder:
            loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels)
            torch.autograd.grad(loss, [hidden, weight])
        casts = [c for c in recorder.calls if c["name"] == "_to_copy"
                 and c["inputs"][0].is_floating_point() and c["inputs"][0].dim() == 2]
        assert not casts, (backend, describe(casts))
        for call in recorder.matmuls():
            (a, b), _ = mats(call)
            assert a.dtype == b.dtype == torch.float32, describe([call])


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert not torch.isnan(got).any()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-3))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_against_a_float64_oracle_of_the_bf16_operands(monkeypatch, chunked, backend,
                                                               reduction, with_bias):
    """The loss under autocast is the cross-entropy of bf16(hidden) @ bf16(weight).T (+
    bf16(bias)), and the gradients its gradients with respect to those bf16 values (the cast's
    backward is the identity), delivered in fp32 to the fp32 parameters; grad_weight is the fp32
    accumulation itself, not rounded to bf16 on the way."""
    monkeypatch.setenv("CPTFAST_BACKEND", backend)
    hidden, weight, bias, labels = inputs(seed=3, with_bias=with_bias)
    params = [t for t in (hidden, weight, bias) if t is not None]
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2)) \
        if reduction == "none" else None
    with torch.autocast("cpu", torch.bfloat16):
        loss = cptfast.fused_linear_cross_entropy(hidden, weight, labels, bias=bias,
                                                  reduction=reduction)
    grads = torch.autograd.grad(loss, params, upstream)

    rounded = [t.detach().bfloat16().double().requires_grad_() for t in params]
    logits = rounded[0] @ rounded[1].T
    if with_bias:
        logits = logits + rounded[2]
    want = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
    want_grads = torch.autograd.grad(want, rounded,
                                     None if upstream is None else upstream.double())
    assert loss.dtype == torch.float32
    assert relative_error(loss, want) < 1e-2
    for got, param, expected, name in zip(grads, params, want_grads, ("hidden", "weight", "bias")):
        assert got.dtype == torch.float32 == param.dtype, name
        assert relative_error(got, expected) < 1e-2, name
    grad_weight = grads[1]
    assert not torch.equal(grad_weight, grad_weight.bfloat16().float()), \
        "grad_weight was rounded to bf16 on its way to the fp32 weight"
