"""End-to-end training throughput and memory: `cptfast train` against the HF `Trainer` a user
would otherwise run, same tiny model, same corpus, same batch size in tokens, same run.

Corpus: 32,000-word vocabulary (a word-level tokenizer, so the model has a realistic output
head), documents of lognormal length (median ~200 tokens). Model: Llama-shaped, hidden 256, 4
layers, 8 / 4 heads, fp32, on the CPU. Each variant runs in its own process (peak RSS is its
own) for a warm-up and then a fixed number of optimizer steps of ~4,096 useful tokens:

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

import numpy as np
import pytest
from conftest import SCALE, record_ratio

VOCAB, SEQ_LEN, ROWS = 32_000, 1024, 4
STEPS, WARMUP = max(4, int(16 * SCALE)), 2

_RUN_ONE = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
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
    started = time.perf_counter()
    result = train(load(None, common + [f"--train.steps={steps}",
                                        f'--train.output="{work}/run"']))
    # concat packing: every token is labelled except each document's last (its next token
    # starts another document), the same count the collators give
    labelled = 1 - len(documents) / sum(map(len, documents))
    useful = result.tokens * labelled
    seconds = result.tokens / result.tokens_per_s
else:
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening,
                              LlamaForCausalLM, Trainer, TrainingArguments)
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
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
    def run(n):
        args = TrainingArguments(output_dir=f"{work}/{variant}", per_device_train_batch_size=per_step,
                                 max_steps=n, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 logging_steps=10_000, use_cpu=True, disable_tqdm=True,
                                 remove_unused_columns=False, dataloader_drop_last=True)
        trainer = Counting(model=model, args=args, train_dataset=examples, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started
    run(warmup)
    useful_counts.clear()
    seconds = run(steps)
    useful = sum(useful_counts)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "useful_tokens": useful, "peak_bytes": peak}))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The corpus as token ids (JSON lines), the same corpus as a shard directory, and the
    initial model, shared by every variant."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cptfast.data import prepare

    root = tmp_path_factory.mktemp("train_bench")
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.3, 0.8, int(3000 * max(SCALE, 0.2))), 8, SEQ_LEN - 1)
    texts = [" ".join(f"w{t}" for t in rng.integers(0, VOCAB - 2, int(n))) for n in lengths]
    (root / "corpus.txt").write_text("\n".join(texts))
    prepare([root / "corpus.txt"], root / "shards", root / "model", split_lines=True,
            progress=False)
    with open(root / "corpus.jsonl", "w") as f:  # what prepare made of it, EOS appended
        for text in texts:
            f.write(json.dumps({"ids": tokenizer(text).input_ids + [VOCAB - 1]}) + "\n")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * SEQ_LEN,
        eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    return root


def run_variant(variant: str, root) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RUN_ONE, variant, str(root / "corpus.jsonl"),
         str(root / "shards"), str(root / "model"), str(root / "work"), str(STEPS), str(WARMUP),
         str(SEQ_LEN), str(ROWS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_end_to_end_training_cpu(benchmark, inputs):
    flattening = run_variant("flattening", inputs)
    padding = run_variant("padding", inputs)
    ours = benchmark.pedantic(lambda: run_variant("cptfast", inputs), rounds=1, iterations=1)
    rate = {name: r["useful_tokens"] / r["seconds"]
            for name, r in (("ours", ours), ("flattening", flattening), ("padding", padding))}
    benchmark.extra_info.update(ours=ours, flattening=flattening, padding=padding)
    for name, goal in (("flattening", 1.0), ("padding", 1.5)):
        record_ratio("train: useful tokens/s (CPU)", f"HF Trainer + {name}",
                     rate["ours"] / rate[name],
                     f"{rate['ours']:,.0f} vs {rate[name]:,.0f} tokens/s (goal >= {goal}x)")
    memory = ours["peak_bytes"] / flattening["peak_bytes"]
    record_ratio("train: peak memory (CPU, RSS)", "HF Trainer + flattening", 1 / memory,
                 f"{ours['peak_bytes'] / 2**20:,.0f} MiB vs "
                 f"{flattening['peak_bytes'] / 2**20:,.0f} MiB = {memory:.2f}x (goal <= 0.6x); "
                 f"padding {padding['peak_bytes'] / 2**20:,.0f} MiB")
