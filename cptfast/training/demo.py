"""The built-in demo (`cptfast train` with no arguments): continued pretraining, end to end,
offline, on a laptop-class CPU.

Real text already on the machine stands in for a base model's data and a new domain: the Python
standard library's docstrings are the "general" corpus (English prose) and its source code is
the "domain" corpus. The demo trains a byte-level BPE tokenizer on both, prepares shards (with
held-out sets), makes a small Llama-shaped "base" model by a short pretraining on the general
corpus (cached: later runs reuse it), then continues pretraining on the domain corpus twice,
alone and with 20 % general replay, re-warming the learning rate and decaying it
warmup-stable-decay style. It ends with the forgetting monitor's table (domain and general
held-out loss, before and after each run: the forgetting that replay prevents),
tokens/s, a loss-curve PNG when matplotlib is installed, and a generation from the final
checkpoint loaded back with `AutoModelForCausalLM`.

`cptfast data-demo` runs the data half alone (`run_data_demo`: corpora, tokenizer, shards, then
each shard directory verified and a document read back). The two builders the demo needs live
here too: `stdlib_corpora` and `build_tokenizer` (a byte-level BPE tokenizer any text can train).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cptfast.training.config import load

HELD_OUT = 0.05  # share of each corpus kept out of training, for evaluation


@dataclass(frozen=True)
class DemoSize:
    corpus_chars: int
    vocab_size: int
    hidden: int
    layers: int
    seq_len: int
    batch_size: int
    pretrain_steps: int
    cpt_steps: int


FULL = DemoSize(corpus_chars=1_500_000, vocab_size=4096, hidden=192, layers=4, seq_len=256,
                batch_size=8, pretrain_steps=300, cpt_steps=150)
QUICK = DemoSize(corpus_chars=60_000, vocab_size=512, hidden=64, layers=2, seq_len=64,
                 batch_size=4, pretrain_steps=12, cpt_steps=10)


def run_demo(output: str | Path = "cptfast-demo", *, quick: bool = False,
             workers: int | None = None, progress: bool = True) -> dict:
    """Run the demo under ``output`` (inputs cached there); returns the numbers it prints."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    size = QUICK if quick else FULL
    root = Path(output) / ("quick" if quick else "full")
    root.mkdir(parents=True, exist_ok=True)
    print(f"cptfast demo: continued pretraining, offline, everything under {root.absolute()}")

    shards = _prepare_inputs(root, size, workers)
    base = _base_model(root, size, shards, progress)

    from cptfast.training.loop import train

    eval_sets = {"domain": shards["domain_eval"], "general": shards["general_eval"]}
    runs = {}
    for label, sources in (("domain only", {"domain": (shards["domain"], 1.0)}),
                           ("with replay", {"domain": (shards["domain"], 0.8),
                                            "general": (shards["general"], 0.2)})):
        print(f"4. continued pretraining, {label}: {size.cpt_steps} steps"
              + (" on domain (80 %) + general replay (20 %)" if len(sources) > 1
                 else " on the domain alone")
              + ", lr re-warmed to 2e-3, warmup-stable-decay")
        run_dir = root / ("cpt" if len(sources) > 1 else "cpt-no-replay")
        shutil.rmtree(run_dir, ignore_errors=True)
        runs[label] = train(_config(base, run_dir, size.cpt_steps, size, progress, lr=2e-3,
                                    sources=sources, eval_sets=eval_sets))
    result = runs["with replay"]
    before, after = result.evals[0], result.evals[-1]
    forgetful = runs["domain only"].evals[-1]
    print()
    print("   held-out loss     before   after: domain only   after: with 20 % replay")
    for name in ("domain", "general"):
        print(f"   {name:<14} {before[name]:8.3f} {forgetful[name]:11.3f} "
              f"({forgetful[name] - before[name]:+.3f}) {after[name]:13.3f} "
              f"({after[name] - before[name]:+.3f})")
    print("   (the general set is what replay protects: the forgetting monitor)")
    print(f"   training throughput: {result.tokens_per_s:,.0f} tokens/s on "
          f"{os.cpu_count()} CPU core(s)")
    curve = _plot(root / "cpt", root / "loss_curve.png")
    if curve:
        print(f"   loss curve: {curve}")
    sample = _generate(result.final_checkpoint)
    print(f"5. {result.final_checkpoint} loads with AutoModelForCausalLM.from_pretrained; "
          f"greedy continuation (no repeated 4-grams) of 'def ':\n{sample}")
    return {"before": before, "after": after, "after_without_replay": forgetful,
            "tokens_per_s": result.tokens_per_s,
            "final_checkpoint": str(result.final_checkpoint), "sample": sample}


def run_data_demo(output: str | Path = "cptfast-data-demo", *,
                  workers: int | None = None) -> dict[str, Path]:
    """The data half of the demo alone, at its quick size: corpora, tokenizer and shards under
    ``output`` (cached there, as in `run_demo`), then every shard directory verified and
    document 0 of the domain shards read back; returns the shard directories by name."""
    from cptfast.data import verify

    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    print(f"cptfast data-demo: corpora, tokenizer and shards, offline, under {root.absolute()}")
    shards = _prepare_inputs(root, QUICK, workers)
    opened = {name: verify(path) for name, path in shards.items()}
    print(f"3. verified {len(opened)} shard directories: structure, token ids, counts and "
          "sha256 of every file")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shards["domain"] / "tokenizer"))
    first = opened["domain"].document(0)
    print(f"4. domain document 0 read back zero-copy ({len(first)} {first.dtype} tokens): "
          f"{tokenizer.decode(first.tolist())!r}")
    return shards


def _prepare_inputs(root: Path, size: DemoSize, workers: int | None) -> dict[str, Path]:
    """Corpora, tokenizer and shard directories, built once and then reused."""
    from cptfast.data import prepare

    names = ("general", "domain", "general_eval", "domain_eval")
    shards = {name: root / "shards" / name for name in names}
    if all((path / "manifest.json").is_file() for path in shards.values()):
        print("1-2. corpora, tokenizer and shards: cached")
        return shards
    general, domain = stdlib_corpora(size.corpus_chars)
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    splits = {}
    for name, documents in (("general", general), ("domain", domain)):
        cut = len(documents) - max(1, int(len(documents) * HELD_OUT))
        splits[name], splits[f"{name}_eval"] = documents[:cut], documents[cut:]
    for name, documents in splits.items():
        with open(corpus / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for text in documents:
                f.write(json.dumps({"text": text}) + "\n")
    tokenizer = build_tokenizer(root / "tokenizer", splits["general"] + splits["domain"],
                                vocab_size=size.vocab_size)
    print(f"1. corpora from the Python standard library: {len(general):,} docstrings "
          f"(general), {len(domain):,} functions and classes (domain); byte-level BPE "
          f"tokenizer, vocabulary {size.vocab_size:,}, trained on them")
    for name in names:
        summary = prepare([corpus / f"{name}.jsonl"], shards[name], tokenizer, overwrite=True,
                          workers=workers, progress=False)
        print(f"2. shards {name}: {summary.documents:,} documents, {summary.tokens:,} tokens")
    return shards


def _base_model(root: Path, size: DemoSize, shards: dict[str, Path], progress: bool) -> Path:
    """The "base" model: a short pretraining on the general corpus, cached."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = root / "base"
    if (base / "config.json").is_file():
        print(f"3. base model: cached ({base})")
        return base
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden,
                         intermediate_size=size.hidden * 8 // 3 // 32 * 32 or 64,
                         num_hidden_layers=size.layers, num_attention_heads=size.hidden // 32,
                         num_key_value_heads=max(1, size.hidden // 96),
                         max_position_embeddings=size.seq_len * 4, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    initial = root / "initial"
    LlamaForCausalLM(config).save_pretrained(initial)
    tokenizer.save_pretrained(initial)
    run_dir = root / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)
    parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    print(f"3. base model: Llama-shaped, {parameters / 1e6:.1f} M parameters, pretrained for "
          f"{size.pretrain_steps} steps on the general corpus (once; cached afterwards)")
    from cptfast.training.loop import train
    result = train(_config(initial, run_dir, size.pretrain_steps, size, progress, lr=3e-3,
                           sources={"general": (shards["general"], 1.0)}, eval_sets={},
                           schedule="cosine"))
    staging = root / "base.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(result.final_checkpoint, staging,
                    ignore=shutil.ignore_patterns("trainer_state.pt", "cptfast_checkpoint.json"))
    os.rename(staging, base)
    shutil.rmtree(initial)
    return base


def _config(model: Path, run_dir: Path, steps: int, size: DemoSize, progress: bool, *,
            lr: float, sources: dict, eval_sets: dict, schedule: str = "wsd"):
    overrides = [f'--model.path="{model}"', f'--train.output="{run_dir}"',
                 f"--train.steps={steps}", '--train.precision="fp32"',
                 f"--data.seq_len={size.seq_len}", f"--data.batch_size={size.batch_size}",
                 f"--optim.lr={lr}", "--optim.weight_decay=0.01",
                 f'--schedule.kind="{schedule}"', f"--schedule.warmup_steps={max(1, steps // 10)}",
                 "--schedule.decay_fraction=0.3", f"--checkpoint.every={steps}",
                 "--checkpoint.keep=1", f"--eval.every={max(1, steps // 4)}", "--eval.batches=4",
                 f"--logging.progress={'true' if progress else 'false'}",
                 "--logging.tensorboard=false"]
    for name, (path, weight) in sources.items():
        overrides += [f'--data.sources.{name}.path="{path}"',
                      f"--data.sources.{name}.weight={weight}"]
    for name, path in eval_sets.items():
        overrides.append(f'--data.eval.{name}="{path}"')
    return load(None, overrides)


def _plot(run_dir: Path, target: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses, evals = [], [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "eval" in entry:
            for name, values in entry["eval"].items():
                evals.setdefault(name, []).append((entry["step"], values["loss"]))
        else:
            steps.append(entry["step"])
            losses.append(entry["loss"])
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, losses, label="training loss (domain + replay)", alpha=0.6)
    for name, points in evals.items():
        axes.plot(*zip(*points), marker="o", label=f"held-out {name}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title("cptfast demo: continued pretraining")
    axes.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def _generate(checkpoint: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompt = tokenizer("def ", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False,
                             no_repeat_ngram_size=4, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def build_tokenizer(directory: str | Path, texts: list[str], *, vocab_size: int = 512,
                    add_bos: bool = True) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it for ``AutoTokenizer``.

    Special tokens: ``<|bos|>`` (prepended when ``add_bos``, the Llama convention),
    ``<|eos|>`` and ``<|pad|>``. Byte-level, so every Unicode string round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = core.token_to_id("<|bos|>")
        core.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>",
                                      eos_token="<|eos|>", pad_token="<|pad|>")
    directory = Path(directory)
    wrapped.save_pretrained(str(directory))
    return directory


_SKIPPED_STDLIB_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                         "turtledemo", "ensurepip", "__pycache__", "venv"}


def stdlib_corpora(max_chars: int = 1_500_000) -> tuple[list[str], list[str]]:
    """Real text already on every machine with Python: (general, domain) documents from the
    standard library's source. General: the docstrings of modules, classes and functions
    (English prose). Domain: the source code of top-level functions and classes. Files are
    read in sorted order, so the corpora are the same on every run of one Python version;
    each corpus stops after ``max_chars`` characters."""
    import ast
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    general: list[str] = []
    domain: list[str] = []
    sizes = [0, 0]
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIPPED_STDLIB_PARTS & set(path.relative_to(stdlib).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 200 and sizes[0] < max_chars:
                    general.append(text[:4000])
                    sizes[0] += len(general[-1])
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                code = ast.get_source_segment(source, node)
                if code and len(code) >= 200 and sizes[1] < max_chars:
                    domain.append(code[:4000])
                    sizes[1] += len(domain[-1])
        if min(sizes) >= max_chars:
            break
    return general, domain
