"""End-to-end training throughput and memory: `cptfast train` against the HF `Trainer` a user
would otherwise run, same tiny model, same corpus, same batch size in tokens, same run.

Corpus: 32,000-word vocabulary (a word-level tokenizer, so the model has a realistic output
head), documents of lognormal length (median ~200 tokens). Model: Llama-shaped, hidden 256, 4
layers, 8 / 4 heads, fp32, on the CPU. Each variant runs in its own process for a warm-up and
then a fixed number of optimizer steps of ~4,096 useful tokens (the peak RSS is that of the
measured run; the time the median of CPTFAST_BENCH_REPEATS runs):

- cptfast: `cptfast.train`, rows of 1,024 tokens, concat packing, document-masked attention,
  fused linear cross-entropy;
- HF Trainer + DataCollatorWithFlattening: the same documents flattened into one row per step
  (document boundaries from position_ids), stock SDPA attention and logits + cross-entropy;
- HF Trainer + padding: the same documents padded to the longest in the batch.

"Useful" tokens are the tokens that carry a label (no padding). Goals on the CPU: useful
tokens/s >= 1.0x the flattening collator and >= 1.5x padding; peak memory <= 0.6x flattening.

On a GPU (when present): the MFU of `cptfast train` itself on a Llama-3.2-1B-shaped model
(hidden 2048, 16 layers, 32 / 8 heads, head_dim 64, vocabulary 128,256, tied embeddings;
random weights), bf16-mixed, rows of 2,048 tokens, 4 rows per step, on the same corpus: the
mean over the steps after the first two (which compile the kernels) of the MFU the trainer
logs (model FLOPs per token x tokens/s / the device's published bf16 peak), and the same
throughput against the matmul peak measured in this run (the roofline).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import (SCALE, TRAIN_SEQ_LEN as SEQ_LEN, TRAIN_VOCAB, median_run, record_metric,
                      record_ratio, record_roofline, record_series)

ROWS = 4
STEPS, WARMUP = max(4, int(16 * SCALE)), 2

_RUN_ONE = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
from cptfast.benchmark import peak_resident_bytes, reset_peak_resident
variant, corpus, shards, model_dir, work, steps, warmup, seq_len, rows = sys.argv[1:10]
steps, warmup, seq_len, rows = int(steps), int(warmup), int(seq_len), int(rows)
transformers.utils.logging.disable_progress_bar()
documents = [json.loads(line)["ids"] for line in open(corpus)]
if variant == "cptfast":
    from cptfast.training import load, train
    common = [f'--model.path="{model_dir}"', f'--data.sources.corpus.path="{shards}"',
              f"--data.seq_len={seq_len}", f"--data.batch_size={rows}",
              '--train.precision="fp32"', "--checkpoint.every=0", "--logging.progress=false",
              "--logging.tensorboard=false", "--schedule.warmup_steps=1", "--optim.lr=1e-3"]
    train(load(None, common + [f"--train.steps={warmup}", f'--train.output="{work}/warm"']))
    reset_peak_resident()  # the peak of the measured run, not the warm-up's
    started = time.perf_counter()
    result = train(load(None, common + [f"--train.steps={steps}",
                                        f'--train.output="{work}/run"']))
    losses = [json.loads(line)["loss"] for line in open(f"{work}/run/metrics.jsonl")
              if '"eval"' not in line]
    # concat packing: every token is labelled except each document's last (its next token
    # starts another document), the same count the collators give
    labelled = 1 - len(documents) / sum(map(len, documents))
    useful = result.tokens * labelled
    seconds = result.tokens / result.tokens_per_s
else:
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening,
                              LlamaForCausalLM, Trainer, TrainingArguments)
    per_step = max(1, round(seq_len * rows / (sum(map(len, documents)) / len(documents))))
    examples = [{"input_ids": d} for d in documents]
    if variant == "flattening":
        collator = DataCollatorWithFlattening(return_tensors="pt")
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="pt")
    useful_counts = []
    class Counting(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            useful_counts.append(int((inputs["labels"][..., 1:] != -100).sum()))
            return super().training_step(model, inputs, *args, **kwargs)
    def run(n):  # from the initial weights each time, as the cptfast runs start
        model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        args = TrainingArguments(output_dir=f"{work}/{variant}",
                                 per_device_train_batch_size=per_step,
                                 max_steps=n, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 logging_steps=1, use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_drop_last=True)
        trainer = Counting(model=model, args=args, train_dataset=examples, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started, [e["loss"] for e in trainer.state.log_history
                                               if "loss" in e]
    run(warmup)
    useful_counts.clear()
    reset_peak_resident()
    seconds, losses = run(steps)
    useful = sum(useful_counts)
peak = peak_resident_bytes()
print(json.dumps({"seconds": seconds, "useful_tokens": useful, "peak_bytes": peak,
                  "losses": losses}))
"""


def run_variant(variant: str, root) -> dict:
    with tempfile.TemporaryDirectory(dir=root) as work:  # a fresh run, never a resumed one
        out = subprocess.run(
            [sys.executable, "-c", _RUN_ONE, variant, str(root / "corpus.jsonl"),
             str(root / "shards"), str(root / "model"), work, str(STEPS), str(WARMUP),
             str(SEQ_LEN), str(ROWS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def least_work(root, useful_tokens: float) -> tuple[float, float]:
    """FLOPs and bytes a run must do at the least: the model FLOPs of its useful tokens (6 x
    parameters + attention over full rows, an upper bound for packed documents) and, per
    optimizer step, the weights read in the forward and the backward, the gradients written,
    and AdamW reading weights, gradients and both moments and writing three of them back."""
    import transformers

    from cptfast.training.metrics import model_flops_per_token

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model_flops_per_token(model, SEQ_LEN) * useful_tokens, STEPS * 10 * weight_bytes


def test_end_to_end_training_cpu(benchmark, train_inputs):
    flattening = median_run(lambda: run_variant("flattening", train_inputs))
    padding = median_run(lambda: run_variant("padding", train_inputs))
    ours = benchmark.pedantic(lambda: median_run(lambda: run_variant("cptfast", train_inputs)),
                              rounds=1, iterations=1)
    rate = {name: r["useful_tokens"] / r["seconds"]
            for name, r in (("ours", ours), ("flattening", flattening), ("padding", padding))}
    benchmark.extra_info.update(ours=ours, flattening=flattening, padding=padding)
    for variant, result in (("cptfast train", ours), ("HF Trainer + flattening", flattening),
                            ("HF Trainer + padding", padding)):
        record_roofline("end-to-end training (Llama-shaped, fp32)", variant, "cpu",
                        *least_work(train_inputs, result["useful_tokens"]), result["seconds"])
    for name, goal in (("flattening", 1.0), ("padding", 1.5)):
        record_ratio("train: useful tokens/s (CPU)", f"HF Trainer + {name}",
                     rate["ours"] / rate[name],
                     f"{rate['ours']:,.0f} vs {rate[name]:,.0f} tokens/s (goal >= {goal}x)")
    record_series("end-to-end training loss", "optimizer step (~4,096 useful tokens each)",
                  "training loss", {"cptfast train": list(enumerate(ours["losses"], 1)),
                                    "HF Trainer + flattening":
                                        list(enumerate(flattening["losses"], 1)),
                                    "HF Trainer + padding": list(enumerate(padding["losses"], 1))})
    memory = ours["peak_bytes"] / flattening["peak_bytes"]
    record_ratio("train: peak memory (CPU, RSS)", "HF Trainer + flattening", 1 / memory,
                 f"{ours['peak_bytes'] / 2**20:,.0f} MiB vs "
                 f"{flattening['peak_bytes'] / 2**20:,.0f} MiB = {memory:.2f}x (goal <= 0.6x); "
                 f"padding {padding['peak_bytes'] / 2**20:,.0f} MiB")


GPU_SEQ_LEN, GPU_ROWS, GPU_STEPS, GPU_WARMUP = 2048, 4, 12, 2


def one_b_model(directory, tokenizer_from) -> tuple[float, int]:
    """A Llama-3.2-1B-shaped model with random weights saved (bf16) in ``directory``, with the
    corpus's tokenizer; returns its training FLOPs per token at GPU_SEQ_LEN and its number of
    parameters."""
    import transformers

    from cptfast.training.metrics import model_flops_per_token

    config = transformers.LlamaConfig(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=TRAIN_VOCAB - 1,
        pad_token_id=TRAIN_VOCAB - 1)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds, not minutes on the CPU
        model = transformers.LlamaForCausalLM(config)
    flops_per_token = model_flops_per_token(model, GPU_SEQ_LEN)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    for path in tokenizer_from.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, directory / path.name)
    return flops_per_token, parameters


def train_on_gpu(root, model_dir, run_dir, timeout: float = 300, device: str = "cuda",
                 precision: str = "bf16-mixed", seq_len: int = GPU_SEQ_LEN) -> list[dict]:
    """`cptfast train` on the GPU for GPU_STEPS steps; its per-step metrics. The measurement
    ends with the last step's line: the final checkpoint (about 15 GB for a 1B model with its
    AdamW states) is not part of it, so the run is stopped there rather than waited for."""
    overrides = [f'--model.path="{model_dir}"', f'--data.sources.corpus.path="{root / "shards"}"',
                 f"--data.seq_len={seq_len}", f"--data.batch_size={GPU_ROWS}",
                 f"--train.steps={GPU_STEPS}", f'--train.output="{run_dir}"',
                 f'--train.device="{device}"', f'--train.precision="{precision}"',
                 "--checkpoint.every=0", '--checkpoint.resume="none"',
                 "--schedule.warmup_steps=2", "--optim.lr=1e-4", "--logging.progress=false",
                 "--logging.tensorboard=false"]
    metrics = run_dir / "metrics.jsonl"

    def steps() -> list[dict]:
        if not metrics.is_file():
            return []
        entries = []
        for line in metrics.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:  # the line being written
                pass
        return [entry for entry in entries if "tokens_per_s" in entry]

    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "cptfast", "train", *overrides],
                                   stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        started = time.time()
        while process.poll() is None and len(steps()) < GPU_STEPS:
            if time.time() - started > timeout:
                break
            time.sleep(0.5)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        log.seek(0)
        output = log.read()
    found = steps()
    assert len(found) >= GPU_WARMUP + 1, (f"cptfast train logged {len(found)} steps "
                                          f"(exit {process.returncode}):\n{output[-3000:]}")
    return found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_training_mfu_gpu(benchmark, train_inputs, tmp_path):
    model_dir = tmp_path / "model-1b"
    flops_per_token, parameters = one_b_model(model_dir, train_inputs / "model")
    steps = benchmark.pedantic(lambda: train_on_gpu(train_inputs, model_dir, tmp_path / "run"),
                               rounds=1, iterations=1)
    measured = steps[GPU_WARMUP:]
    tokens_per_s = sum(e["tokens_per_s"] for e in measured) / len(measured)
    mfus = [e["mfu"] for e in measured if e.get("mfu") is not None]
    memory = max(e.get("memory_bytes") or 0 for e in measured)
    device = torch.cuda.get_device_name(0)
    shape = (f"Llama-3.2-1B shapes, bf16-mixed, {GPU_ROWS} x {GPU_SEQ_LEN} tokens per step, "
             f"mean of steps {GPU_WARMUP + 1}-{len(steps)}")
    record_metric("train: MFU (GPU, 1B shapes)",
                  f"{sum(mfus) / len(mfus):.1%}" if mfus else "not measured",
                  f"{tokens_per_s:,.0f} tokens/s on {device}; {shape}; peak memory "
                  f"{memory / 2**30:.1f} GiB" + ("" if mfus else "; the trainer knows no "
                                                 "published peak for this GPU"))
    seconds = len(measured) * GPU_ROWS * GPU_SEQ_LEN / tokens_per_s
    # Bytes at the least per step, as the CPU rows count them: the fp32 weights read in the
    # forward and the backward, the gradients written, AdamW's reads and writes.
    record_roofline("end-to-end training (1B shapes, bf16-mixed)", "cptfast train", "cuda",
                    flops_per_token * len(measured) * GPU_ROWS * GPU_SEQ_LEN,
                    len(measured) * 10 * 4 * parameters, seconds)
