"""`cptfast.accelerate` on a transformers model: one training step (forward + backward),
accelerated vs stock (SDPA attention, logits + cross-entropy), same model, same batch, same run.

On the CPU: a small Llama-shaped model (hidden 256, 4 layers, 8 query / 4 key-value heads,
vocabulary 32,000), 2 rows of 2,048 tokens (x CPTFAST_BENCH_SCALE), fp32, each variant in its
own process so that peak RSS is its own; "extra" memory is the peak beyond the state before the
step. On a GPU (when present): Llama-3-8B attention and head shapes (hidden 4096, 32/8 heads,
head_dim 128, vocabulary 128,256) with 2 layers, bf16, 8,192 tokens, step time and peak memory
(CUDA events, mean of 5 steps after a warm-up step).
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import SCALE, median_run, record_ratio, record_roofline

SEQ = max(256, int(2048 * SCALE))

_RUN_ONE = r"""
import json, sys, time, torch, transformers
import cptfast
from cptfast.benchmark import peak_resident_bytes, reset_peak_resident, resident_bytes
from cptfast.training.metrics import model_flops_per_token
variant, seq = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seq,
    attn_implementation="sdpa")
model = transformers.LlamaForCausalLM(config).train()
if variant == "accelerated":
    cptfast.accelerate(model)
ids = torch.randint(0, 32000, (2, seq))
def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=False)
    return float(loss)
step()  # warm-up: gradients allocated, first-call costs paid
before = resident_bytes()
reset_peak_resident()
started = time.perf_counter()
loss = step()
seconds = time.perf_counter() - started
peak = peak_resident_bytes()
print(json.dumps({"seconds": seconds, "extra_bytes": peak - before, "loss": loss,
                  "flops": model_flops_per_token(model, seq) * ids.numel(),
                  "bytes": 3 * sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def run_variant(variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN_ONE, variant, str(SEQ)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_step_cpu(benchmark):
    stock = median_run(lambda: run_variant("stock"))
    ours = benchmark.pedantic(lambda: median_run(lambda: run_variant("accelerated")),
                              rounds=1, iterations=1)
    # Least work of a step: the model FLOPs (6 x parameters + attention per token) and the
    # weights read in the forward and the backward and their gradients written once.
    for variant, result in (("accelerated", ours), ("stock (sdpa)", stock)):
        record_roofline("transformers training step (Llama-shaped, fp32)", variant, "cpu",
                        result["flops"], result["bytes"], result["seconds"])
    assert abs(ours["loss"] - stock["loss"]) < 1e-4 * abs(stock["loss"])
    benchmark.extra_info.update(stock=stock, ours=ours, seq=SEQ)
    memory = ours["extra_bytes"] / stock["extra_bytes"]
    time_ratio = ours["seconds"] / stock["seconds"]
    record_ratio("accelerate: step peak extra memory (CPU)", "stock transformers (sdpa)",
                 1 / memory, f"{ours['extra_bytes'] / 2**20:,.0f} MiB vs "
                             f"{stock['extra_bytes'] / 2**20:,.0f} MiB; 2 x {SEQ} tokens, V=32000")
    record_ratio("accelerate: step time (CPU)", "stock transformers (sdpa)", 1 / time_ratio,
                 f"{ours['seconds']:.2f} s vs {stock['seconds']:.2f} s")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_training_step_gpu(benchmark):
    import copy

    import transformers

    import cptfast

    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds, not a minute on the CPU
        stock = transformers.LlamaForCausalLM(config)
    stock = stock.to(torch.bfloat16).train()
    fast = cptfast.accelerate(copy.deepcopy(stock))
    ids = torch.randint(0, config.vocab_size, (1, 8192), device="cuda")

    def measure(model):
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=False)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5, torch.cuda.max_memory_allocated() - base

    stock_ms, stock_bytes = measure(stock)
    ours_ms, ours_bytes = benchmark.pedantic(lambda: measure(fast), rounds=1, iterations=1)
    from cptfast.training.metrics import model_flops_per_token

    flops = model_flops_per_token(stock, ids.shape[1]) * ids.numel()
    weights = 3 * sum(p.numel() * p.element_size() for p in stock.parameters())
    for variant, ms in (("accelerated", ours_ms), ("stock (sdpa)", stock_ms)):
        record_roofline("transformers training step (8B shapes, 2 layers, bf16)", variant,
                        "cuda", flops, weights, ms / 1e3)
    record_ratio("accelerate: step time (GPU, 8B shapes)", "stock transformers (sdpa)",
                 stock_ms / ours_ms, f"{ours_ms:.1f} ms vs {stock_ms:.1f} ms; 2 layers of "
                                     "Llama-3-8B (hidden 4096, 32/8 heads, V=128,256), 1 x "
                                     "8,192 tokens, bf16, forward + backward")
    record_ratio("accelerate: step peak memory (GPU)", "stock transformers (sdpa)",
                 stock_bytes / ours_bytes, f"{ours_bytes / 2**30:.2f} GiB vs "
                                           f"{stock_bytes / 2**30:.2f} GiB")
