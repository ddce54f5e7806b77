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
"""

import json
import subprocess
import sys
import tempfile

from conftest import (SCALE, TRAIN_SEQ_LEN as SEQ_LEN, median_run, record_ratio,
                      record_roofline, record_series)

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
