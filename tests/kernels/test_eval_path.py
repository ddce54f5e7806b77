"""Under torch.no_grad() the fused loss builds no gradient, even though the weights require
one (an evaluation pass: parameters keep requires_grad=True). Building it there costs two more
matmuls and an fp32 [V, H] buffer (2 GiB at the Llama-3-8B head)."""

import pytest
import torch

import cptfast.reference as reference
from cptfast.kernels import fused_linear_cross_entropy as triton_flce


def inputs(device):
    torch.manual_seed(0)
    hidden = torch.randn(37, 24).to(device).requires_grad_()
    weight = torch.randn(67, 24).to(device).requires_grad_()
    labels = torch.randint(0, 67, (37,))
    labels[::5] = -100
    return hidden, weight, labels.to(device)


def refuse_gradients(monkeypatch, implementation):
    if implementation == "reference":
        build = reference._fused_chunks

        def loss_only(*args, want_grads, **kwargs):
            assert not want_grads, "a gradient was built under torch.no_grad()"
            return build(*args, want_grads=want_grads, **kwargs)
        monkeypatch.setattr(reference, "_fused_chunks", loss_only)
        return reference.fused_linear_cross_entropy

    def no_gradients(*args, **kwargs):
        raise AssertionError("a gradient was built under torch.no_grad()")
    monkeypatch.setattr(triton_flce, "_chunk_gradients", no_gradients)
    return triton_flce.fused_linear_cross_entropy


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_fused_loss_under_no_grad_builds_no_gradient(implementation, monkeypatch, device):
    hidden, weight, labels = inputs(device)
    loss_fn = refuse_gradients(monkeypatch, implementation)
    with torch.no_grad():
        loss = loss_fn(hidden, weight, labels)
    assert loss.grad_fn is None
    expected = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().T, labels)
    # fp32 inputs to the tile kernel's tl.dot are rounded to TF32 on a GPU (10 mantissa bits).
    tolerance = 1e-5 if device.type == "cpu" or implementation == "reference" else 2.5e-3
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_fused_loss_with_grad_enabled_still_builds_the_gradient(implementation, monkeypatch,
                                                                device):
    hidden, weight, labels = inputs(device)
    loss_fn = refuse_gradients(monkeypatch, implementation)
    with pytest.raises(AssertionError, match="a gradient was built"):
        loss_fn(hidden, weight, labels)  # the guard above is what would have caught it
