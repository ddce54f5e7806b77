"""Under torch.no_grad() the fused loss builds no gradient, even though the weights require
one (an evaluation pass: parameters keep requires_grad=True). Building it there costs two more
matmuls and an fp32 [V, H] buffer (2 GiB at the Llama-3-8B head). And what runs there, the
loss-only tile kernel over (row blocks) x (vocabulary splits), against float64 across split
boundaries."""

import pytest
import torch

import cptfast.reference as reference
from cptfast.kernels import fused_linear_cross_entropy as triton_flce
from cptfast.kernels._autograd import LossOptions


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


# The loss-only tile kernel on its 2-D grid: (row blocks) x (vocabulary splits), each split's
# partials merged by log-sum-exp afterwards. Under the interpreter the tiles are 64 wide (fp32)
# or 128 (bf16); V = 333 ends in a partial tile (13 or 77 columns), V = 129 in a one-column one,
# and ``split_tiles`` 1 or 2 puts split boundaries inside the vocabulary.

ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)


def row_oracle(hidden64, weight64, bias64, labels, *, ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None):
    """float64 per-row (loss, lse) of the fused loss; ignored rows have loss 0."""
    z = hidden64 @ weight64.T
    if bias64 is not None:
        z = z + bias64
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    counted = labels != ignore_index
    z_label = z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    loss = (1 - label_smoothing) * (lse - z_label) + label_smoothing * (lse - z.mean(-1)) \
        + z_loss * lse ** 2
    return torch.where(counted, loss, 0.0), lse


def eval_inputs(n, vocab, dtype, device, with_bias, seed=0):
    generator = torch.Generator().manual_seed(seed + n + vocab)
    hidden = torch.randn(n, 40, generator=generator)  # H = 40: a partial BLOCK_H step too
    weight = torch.randn(vocab, 40, generator=generator) / 2
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[2::3] = -100
    labels[::4] = vocab - 1  # in the last (partial) tile, of the last split
    hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
    return hidden, weight, bias, labels


def eval_tolerance(dtype, device):
    """bf16 1e-2; fp32 1e-5 (the inputs are exact in float64 either way; what differs is fp32
    accumulation), 2.5e-3 where fp32 goes through a GPU tl.dot in TF32."""
    if dtype == torch.bfloat16:
        return 1e-2
    return 1e-5 if device.type == "cpu" else 2.5e-3


def max_relative_error(got, want):
    got, want = got.double().cpu(), want.double()
    assert not torch.isnan(got).any(), "NaN in the result"
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-3))


@pytest.mark.parametrize("split_tiles", [1, 2])
@pytest.mark.parametrize("options,with_bias", [("plain", False), ("all", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,vocab", [(1, 333), (5, 333), (130, 333), (5, 129)])
def test_loss_only_tiles_across_splits(poisoned, device, n, vocab, dtype, options, with_bias,
                                       split_tiles):
    hidden, weight, bias, labels = eval_inputs(n, vocab, dtype, device, with_bias)
    kwargs = ALL_OPTIONS if options == "all" else {}
    losses, lse = triton_flce._tile_losses(
        *(None if t is None else t.to(device) for t in (hidden, weight, bias)),
        labels.to(device), LossOptions(**kwargs), split_tiles=split_tiles)
    want_losses, want_lse = row_oracle(hidden.double(), weight.double(),
                                       None if bias is None else bias.double(), labels,
                                       **kwargs)
    assert losses.dtype == lse.dtype == torch.float32
    assert torch.equal(losses.cpu()[labels == -100], torch.zeros(int((labels == -100).sum())))
    allowed = eval_tolerance(dtype, device)
    assert max_relative_error(losses, want_losses) < allowed
    assert max_relative_error(lse, want_lse) < allowed


@pytest.fixture
def short_splits(monkeypatch):
    """Splits of one tile through the public path (the default keeps 8 tiles at least)."""
    monkeypatch.setattr(triton_flce, "tiles_per_split", lambda *args, **kwargs: 1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_only_reductions_across_splits(short_splits, poisoned, device, dtype, reduction):
    hidden, weight, bias, labels = eval_inputs(37, 333, dtype, device, with_bias=True, seed=1)
    with torch.no_grad():
        loss, lse = triton_flce.fused_linear_cross_entropy(
            hidden.to(device), weight.to(device), labels.to(device), bias=bias.to(device),
            reduction=reduction, return_lse=True, **ALL_OPTIONS)
    per_row, want_lse = row_oracle(hidden.double(), weight.double(), bias.double(), labels,
                                   **ALL_OPTIONS)
    want = {"none": per_row, "sum": per_row.sum(),
            "mean": per_row.sum() / (labels != -100).sum()}[reduction]
    allowed = eval_tolerance(dtype, device)
    assert loss.shape == want.shape
    assert max_relative_error(loss, want) < allowed
    assert max_relative_error(lse, want_lse) < allowed


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_only_all_ignored_is_zero(short_splits, poisoned, device, reduction):
    hidden, weight, _, _ = eval_inputs(9, 333, torch.float32, device, with_bias=False)
    with torch.no_grad():
        loss = triton_flce.fused_linear_cross_entropy(
            hidden.to(device), weight.to(device), torch.full((9,), -100).to(device),
            reduction=reduction, z_loss=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_only_nan_rows_stay_in_their_row(short_splits, poisoned, device, dtype):
    # Row 2 (counted) and row 7 (ignored) of the hidden states are NaN in one element: their
    # lse is NaN, in every split; only row 2's loss is, and no other row's.
    hidden, weight, bias, labels = eval_inputs(11, 333, dtype, device, with_bias=True, seed=2)
    labels[2], labels[7] = 5, -100
    hidden[2, 3] = float("nan")
    hidden[7, 0] = float("nan")
    with torch.no_grad():
        losses, lse = triton_flce.fused_linear_cross_entropy(
            hidden.to(device), weight.to(device), labels.to(device), bias=bias.to(device),
            reduction="none", return_lse=True, label_smoothing=0.1)
        total = triton_flce.fused_linear_cross_entropy(
            hidden[3:].to(device), weight.to(device), labels[3:].to(device),
            bias=bias.to(device), reduction="mean", label_smoothing=0.1)
    losses, lse = losses.cpu(), lse.cpu()
    assert torch.isnan(lse[[2, 7]]).all() and torch.isnan(losses[2]) and losses[7] == 0
    clean = torch.ones(11, dtype=torch.bool)
    clean[[2, 7]] = False
    want_losses, want_lse = row_oracle(hidden.double()[clean], weight.double(), bias.double(),
                                       labels[clean], label_smoothing=0.1)
    allowed = eval_tolerance(dtype, device)
    assert max_relative_error(losses[clean], want_losses) < allowed
    assert max_relative_error(lse[clean], want_lse) < allowed
    # Without the counted NaN row, the ignored one (now row 4) leaves the mean finite.
    counted = labels[3:] != -100
    want_total = row_oracle(hidden.double()[3:][counted], weight.double(), bias.double(),
                            labels[3:][counted], label_smoothing=0.1)[0].mean()
    assert max_relative_error(total, want_total) < allowed


def test_split_choice_fills_the_gpu():
    # Llama 3's head (V = 128256: 1002 tiles of 128) at 4096 and 8192 tokens on 132 SMs: one
    # program per block of 128 rows would be 32 or 64 programs.
    for row_blocks in (32, 64):
        length = triton_flce.tiles_per_split(row_blocks, 1002, 132)
        splits = -(-1002 // length)
        assert length >= triton_flce.MIN_SPLIT_TILES
        assert row_blocks * splits >= 4 * 132
        assert splits * length >= 1002 > (splits - 1) * length  # every split has a tile
    assert triton_flce.tiles_per_split(1, 1, 132) == 1
    assert triton_flce.tiles_per_split(64, 6, 132) == 6  # too short to split
    assert triton_flce.tiles_per_split(4096, 1002, 132) >= triton_flce.MIN_SPLIT_TILES
