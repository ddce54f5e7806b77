"""cptfast.accelerate on tiny random models of every supported family, against the same model
unaccelerated (eager attention, the ground truth), offline and in fp32.

Models are built on the CPU from one seed and moved to the test device, and inputs are drawn on
the CPU and moved, so both modes compare the same numbers. On the CPU the accelerated parts run
the PyTorch reference (or the Triton kernels under the interpreter, whose fp32 dots are exact
fp32). With CPTFAST_TEST_DEVICE=cuda, cptfast.ops picks the compiled Triton kernels for the
CUDA tensors: the attention kernel (and the fused loss's loss-only tile kernel) then run their
tl.dot on fp32 inputs rounded to TF32, while the stock model's fp32 matmuls stay in full fp32
(PyTorch's default), so there, and only there, the comparisons with the stock model use the
TF32 tolerances of ``TOLERANCES``.
"""

import copy
import warnings

import pytest
import torch
import transformers

import cptfast
from cptfast import hf
from families import CONFIGS

DOCUMENTS = [5, 1, 9, 13]  # a length-1 document, and ones longer than the sliding window

# Relative errors allowed between the accelerated and the stock model, per dtype. Every model
# here is fp32 (the kernels' bf16 paths are tested in tests/kernels against float64).
# "cpu": fp32 on the CPU. "tf32": fp32 on a GPU, where the Triton attention (and the fused
# loss's loss-only tile kernel) feed their tl.dot fp32 inputs truncated to TF32 (10 mantissa
# bits) while the stock model stays in fp32. Measured on the CPU with every matmul input of
# attention and of the fused loss (forward and backward, a superset of what runs in TF32)
# truncated to TF32, these tests' largest errors were: loss 4e-4, logits 2.8e-3,
# gradients 6.3e-3 (of the largest gradient entry); the bounds are 3-6x above that. They stay
# far below what a fault does: a document seeing another moves the loss by 9e-2 (the negative
# control below), a mean of micro-batch means moves the gradients by 2.8 (relative).
TOLERANCES = {
    "cpu": {"loss": 1e-6, "logits": 1e-5, "grad": 2e-5, "accumulation": 1e-5},
    "tf32": {"loss": 2.5e-3, "logits": 1e-2, "grad": 2e-2, "accumulation": 2.5e-3},
}


def tolerance(device: torch.device, kind: str) -> float:
    """The allowed relative error of ``kind`` (loss, logits, grad, accumulation) on ``device``."""
    return TOLERANCES["tf32" if device.type == "cuda" else "cpu"][kind]


def make_pair(family: str, device: torch.device, **options):
    """(stock, accelerated) copies of one random model on ``device``, in training mode. The
    weights are drawn on the CPU, so both test modes hold the same model."""
    torch.manual_seed(0)
    stock = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).train().to(device)
    assert stock.config.model_type == family
    return stock, cptfast.accelerate(copy.deepcopy(stock), **options)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def assert_same_gradients(stock, fast, tolerance):
    for (name, a), b in zip(stock.named_parameters(), fast.parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        assert relative_error(b.grad, a.grad) < tolerance, name


def packed_batch(generator, device):
    """One row of packed documents with document-restarting position_ids and the labels
    DataCollatorWithFlattening makes (-100 on every document's first token, so no token
    learns to predict the next document), on ``device``."""
    ids = torch.randint(3, 97, (1, sum(DOCUMENTS)), generator=generator)
    bounds = torch.tensor([0, *DOCUMENTS]).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in DOCUMENTS])[None]
    labels = ids.clone()
    labels[0, bounds[:-1]] = -100
    cu_seqlens = bounds.to(device, torch.int32)
    flash_kwargs = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                        max_length_q=max(DOCUMENTS), max_length_k=max(DOCUMENTS))
    return ids.to(device), labels.to(device), positions.to(device), bounds.tolist(), flash_kwargs


@pytest.mark.parametrize("family", list(CONFIGS))
def test_unpacked_loss_gradients_and_logits(family, device):
    stock, fast = make_pair(family, device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 17), generator=generator).to(device)
    want, got = stock(input_ids=ids, labels=ids), fast(input_ids=ids, labels=ids)
    assert got.logits is None  # never built in training
    assert relative_error(got.loss, want.loss) < tolerance(device, "loss")
    want.loss.backward()
    got.loss.backward()
    assert_same_gradients(stock, fast, tolerance(device, "grad"))
    # return_logits=True builds them as usual.
    with_logits = fast(input_ids=ids, labels=ids, return_logits=True)
    assert relative_error(with_logits.logits, want.logits) < tolerance(device, "logits")
    # Eval: logits equal, padding included (right padding, compared where not padded).
    stock.eval()
    fast.eval()
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    kept = mask.bool()
    assert relative_error(got[kept], want[kept]) < tolerance(device, "logits")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_packed_batch_equals_each_document_alone(family, device):
    stock, fast = make_pair(family, device)
    ids, labels, positions, bounds, flash_kwargs = packed_batch(torch.Generator().manual_seed(2),
                                                                device)
    targets = sum(n - 1 for n in DOCUMENTS)
    want = sum(stock(input_ids=ids[:, a:b], labels=ids[:, a:b], num_items_in_batch=targets).loss
               for a, b in zip(bounds[:-1], bounds[1:]))
    got = fast(input_ids=ids, labels=labels, position_ids=positions, **flash_kwargs)
    assert relative_error(got.loss, want) < tolerance(device, "loss")
    want.backward()
    got.loss.backward()
    assert_same_gradients(stock, fast, tolerance(device, "grad"))


@pytest.mark.cpu_only("on CUDA every accelerate test already runs the Triton kernels (cptfast.ops "
                      "picks them for CUDA tensors), so this would repeat the llama cases")
def test_llama_with_the_triton_kernels(monkeypatch, device):
    # The same checks with attention, loss and RoPE on the Triton kernels (interpreter).
    monkeypatch.setenv("CPTFAST_BACKEND", "triton")
    test_packed_batch_equals_each_document_alone("llama", device)
    test_unpacked_loss_gradients_and_logits("llama", device)


def test_without_boundaries_documents_leak_and_a_warning_says_so(monkeypatch, device):
    # The negative control for the packed test: the same row without cu_seq_lens is one long
    # sequence, so the loss differs from the documents taken alone, by far more than the
    # tolerance of the packed test on any device.
    stock, fast = make_pair("llama", device)
    ids, labels, positions, bounds, _ = packed_batch(torch.Generator().manual_seed(2), device)
    targets = sum(n - 1 for n in DOCUMENTS)
    want = sum(stock(input_ids=ids[:, a:b], labels=ids[:, a:b], num_items_in_batch=targets).loss
               for a, b in zip(bounds[:-1], bounds[1:]))
    monkeypatch.setattr(hf, "_warned_about_position_ids", False)
    with pytest.warns(UserWarning, match="no cu_seq_lens_q was passed"):
        leaked = fast(input_ids=ids, labels=labels, position_ids=positions)
    assert relative_error(leaked.loss, want) > 10 * TOLERANCES["tf32"]["loss"]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_generate_gives_the_same_tokens(family, device):
    stock, fast = make_pair(family, device)
    stock.eval()
    fast.eval()
    prompts = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0  # left padding
    prompts[0, :3] = 0
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                   output_logits=True, return_dict_in_generate=True)
    want = stock.generate(prompts, **options)
    got = fast.generate(prompts, **options)
    if device.type == "cpu":
        assert torch.equal(got.sequences, want.sequences)
        return
    # TF32 (see TOLERANCES): the stock model's two best tokens can be closer than the allowed
    # logit error (gemma's softcap of 0.8 makes near-ties: 2.5e-5 apart here), where either
    # greedy choice is right. So, per row: every step's logits agree within the tolerance, and
    # the tokens agree up to a step where the stock model had such a near-tie.
    allowed = tolerance(device, "logits")
    new_want, new_got = want.sequences[:, prompts.shape[1]:], got.sequences[:, prompts.shape[1]:]
    steps = min(len(want.logits), len(got.logits))  # one may stop early after a near-tie
    for row in range(prompts.shape[0]):
        for step in range(steps):
            expected = want.logits[step][row]
            assert relative_error(got.logits[step][row], expected) < allowed, (row, step)
            if new_got[row, step] != new_want[row, step]:
                best, second = expected.topk(2).values.tolist()
                largest_error = allowed * float(expected.abs().max())
                assert best - second <= 2 * largest_error, (row, step, best - second)
                break


def test_gradient_accumulation_with_num_items_matches_one_batch(device):
    _, fast = make_pair("llama", device)
    twin = copy.deepcopy(fast)
    ids = torch.randint(3, 97, (4, 15), generator=torch.Generator().manual_seed(4)).to(device)
    labels = ids.clone()
    labels[0, 5:] = -100  # unequal counts per micro-batch: a plain mean of means would differ
    fast(input_ids=ids, labels=labels).loss.backward()
    total = int((labels[:, 1:] != -100).sum())
    for part in (slice(0, 1), slice(1, 4)):
        twin(input_ids=ids[part], labels=labels[part],
             num_items_in_batch=torch.tensor(total, device=device)).loss.backward()
    assert_same_gradients(fast, twin, tolerance(device, "accumulation"))


def test_unaccelerate_restores_and_accelerating_twice_is_a_no_op(device):
    stock, fast = make_pair("gemma2", device)
    assert fast.config._attn_implementation == "cptfast"
    hooks = len(fast._cptfast.rotary_hooks)
    assert hooks == 2 * 2  # on and off around each layer's attention
    assert cptfast.accelerate(fast) is fast and len(fast._cptfast.rotary_hooks) == hooks
    cptfast.unaccelerate(fast)
    assert fast.config._attn_implementation == "eager"
    assert "forward" not in vars(fast) and not hasattr(fast, "_cptfast")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in fast.modules())
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(5)).to(device)
    assert torch.equal(fast(input_ids=ids, labels=ids).logits,
                       stock(input_ids=ids, labels=ids).logits)


def test_fused_rotary_runs_only_inside_accelerated_models(monkeypatch, device):
    monkeypatch.setenv("CPTFAST_BACKEND", "triton")  # on the CPU; CUDA tensors pick it anyway
    calls = []
    real = hf.ops.apply_rotary_
    monkeypatch.setattr(hf.ops, "apply_rotary_", lambda *a: calls.append(1) or real(*a))
    stock, fast = make_pair("llama", device)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(7)).to(device)
    fast(input_ids=ids, labels=ids)
    assert len(calls) == 2  # one per layer
    stock(input_ids=ids, labels=ids)  # same family, not accelerated: transformers' own
    cptfast.unaccelerate(fast)
    fast(input_ids=ids, labels=ids)
    assert len(calls) == 2


def test_save_pretrained_is_identical(tmp_path):
    # Serialization only: CPU models in both modes.
    stock, fast = make_pair("qwen2", torch.device("cpu"))
    stock.save_pretrained(tmp_path / "stock")
    fast.save_pretrained(tmp_path / "fast")
    names = sorted(p.name for p in (tmp_path / "stock").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fast").iterdir())
    for name in names:
        assert (tmp_path / "stock" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes()


def test_unsupported_family_names_the_supported_ones():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(NotImplementedError, match="llama, mistral.*not 'gpt2'"):
        cptfast.accelerate(model)
    assert "forward" not in vars(model)


def test_hf_trainer_on_packed_batches_lowers_the_loss(tmp_path, device):
    # A real client: transformers' Trainer with its flattening collator (which passes the
    # document boundaries as flash-attention kwargs) trains an accelerated model, on the test
    # device (the Trainer moves every batch there).
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    _, model = make_pair("llama", device)
    generator = torch.Generator().manual_seed(6)
    pattern = torch.randint(3, 97, (8,), generator=generator)
    examples = [{"input_ids": pattern.repeat(1 + i % 3)[: 5 + 3 * (i % 5)].tolist()}
                for i in range(64)]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=24,
        learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=device.type == "cpu", disable_tqdm=True, remove_unused_columns=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=arguments, train_dataset=examples,
                          data_collator=collator)
        trainer.train()
    assert next(model.parameters()).device.type == device.type
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_parts_can_be_left_out(device):
    stock, fast = make_pair("mistral", device, attention=False, rope=False)
    assert fast.config._attn_implementation == "eager" and fast._cptfast.rotary_hooks == []
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(8)).to(device)
    assert fast(input_ids=ids, labels=ids).logits is None  # the loss part is on
    cptfast.accelerate(fast, loss=False)  # other options: re-applied, not a no-op
    assert "forward" not in vars(fast) and fast.config._attn_implementation == "cptfast"
    assert relative_error(fast(input_ids=ids, labels=ids).loss,
                          stock(input_ids=ids, labels=ids).loss) < tolerance(device, "loss")


def test_eval_loss_without_logits_when_asked(device):
    stock, fast = make_pair("gemma3_text", device)
    stock.eval()
    fast.eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        want = stock(input_ids=ids, labels=ids)
        got = fast(input_ids=ids, labels=ids, return_logits=False)
    assert got.logits is None and relative_error(got.loss, want.loss) < tolerance(device, "loss")


def test_token_loss_weights_weight_each_tokens_loss(device):
    stock, fast = make_pair("qwen3", device)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(10)).to(device)
    weights = torch.rand(2, 10, generator=torch.Generator().manual_seed(11)).to(device)
    got = fast(input_ids=ids, labels=ids, token_loss_weights=weights)
    logits = stock(input_ids=ids).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1),
                                                  reduction="none")
    want = (per_token * weights[:, :-1].reshape(-1)).sum() / per_token.numel()
    assert relative_error(got.loss, want) < tolerance(device, "loss")
    want.backward()
    got.loss.backward()
    assert_same_gradients(stock, fast, tolerance(device, "grad"))
    fast.eval()
    with pytest.raises(ValueError, match="token_loss_weights needs the fused loss"):
        fast(input_ids=ids, labels=ids, token_loss_weights=weights)


def test_the_attention_implementation_is_chosen_by_one_argument(device):
    _, fast = make_pair("llama", device, attention="flash_attn")
    assert fast.config._attn_implementation == "cptfast_fa"
    cptfast.accelerate(fast, attention=True)  # another choice replaces it
    assert fast.config._attn_implementation == "cptfast"
    with pytest.raises(ValueError, match="attention must be True, False or one of"):
        cptfast.accelerate(fast, attention="flash")
