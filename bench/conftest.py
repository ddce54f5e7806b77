"""Shared benchmark fixtures and the closing table of ratios against same-run baselines.

Run: `python -m pytest bench/ --benchmark-only`. Sizes scale with CPTFAST_BENCH_SCALE
(default 1.0; the acceptance numbers in the issues are quoted at 1.0); CPU timings made in
subprocesses are the median of CPTFAST_BENCH_REPEATS runs (default 3). The GPU rows are marked
`gpu` (`-m gpu` runs them alone, as `cptfast bench --preset gpu-check` does; CPTFAST_BENCH_PRESET
= gpu-check then keeps each to the shapes that fit its ten minutes).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# The tests' synthetic documents (tests/synthetic_text.py, not shipped) feed the benchmarks too;
# appended, so bench/'s own modules (this conftest) still come first.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

SCALE = float(os.environ.get("CPTFAST_BENCH_SCALE", "1.0"))
REPEATS = int(os.environ.get("CPTFAST_BENCH_REPEATS", "3"))
GPU_CHECK = os.environ.get("CPTFAST_BENCH_PRESET") == "gpu-check"
TRAIN_VOCAB, TRAIN_SEQ_LEN = 32_000, 1024  # the training benchmarks' corpus and rows
_RATIOS: list[tuple[str, str, float, str]] = []
_METRICS: list[tuple[str, str, str]] = []
_SERIES: list[dict] = []
_ROOFLINE: list[dict] = []
_PEAKS: dict[str, dict] = {}


def median_run(run, repeats: int = REPEATS, key: str = "seconds") -> dict:
    """Call ``run()`` (one measurement in a fresh process, returning a dict) ``repeats`` times;
    the run with the median ``key``, with every value of ``key`` under ``key + "_all"``."""
    runs = sorted((run() for _ in range(repeats)), key=lambda r: r[key])
    return {**runs[len(runs) // 2], f"{key}_all": [r[key] for r in runs]}


def median_seconds(fn, repeats: int = REPEATS) -> float:
    """In-process CPU timing: one warm-up call, then the median of ``repeats`` timed calls."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def record_roofline(name: str, variant: str, device: str, flops: float, bytes_moved: float,
                    seconds: float) -> None:
    """Place one timed operation on the device's roofline (peaks measured once per device in
    this run): FLOPs and bytes are what the operation must do at the least."""
    from cptfast.benchmark import measure_peaks, roofline_point

    if device not in _PEAKS:
        _PEAKS[device] = measure_peaks(device)
    _ROOFLINE.append({"name": name, "variant": variant, "device": device,
                      **roofline_point(flops, bytes_moved, seconds, _PEAKS[device])})


def record_ratio(name: str, baseline: str, ratio: float, note: str = "") -> None:
    """Remember `ours / baseline` (higher is better) for the summary printed at the end."""
    _RATIOS.append((name, baseline, ratio, note))


def record_metric(name: str, value: str, note: str = "") -> None:
    """Remember a measured value that is not a ratio (a share, a time, a memory size)."""
    _METRICS.append((name, value, note))


def record_series(name: str, x_label: str, y_label: str, lines: dict[str, list]) -> None:
    """Remember curves {label: [(x, y), ...]} for the report's plots (one PNG per name)."""
    _SERIES.append({"name": name, "x": x_label, "y": y_label,
                    "lines": {label: [[float(x), float(y)] for x, y in points]
                              for label, points in lines.items()}})


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: a row measured on a CUDA GPU (skipped without one)")


def gpu_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events), after one warm-up call; for
    steps too slow for triton.testing.do_bench's fixed time budget."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def short(error: BaseException) -> str:
    """An error in one line (a report's table cell)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def pytest_sessionfinish(session, exitstatus):
    """For `cptfast bench`: the recorded ratios and values as JSON."""
    target = os.environ.get("CPTFAST_BENCH_REPORT")
    if target:
        with open(target, "w") as f:
            json.dump({"ratios": [{"name": n, "baseline": b, "ratio": r, "note": note}
                                  for n, b, r, note in _RATIOS],
                       "metrics": [{"name": n, "value": v, "note": note}
                                   for n, v, note in _METRICS],
                       "series": _SERIES, "roofline": _ROOFLINE,
                       "peaks": list(_PEAKS.values())}, f, indent=1)


def pytest_terminal_summary(terminalreporter):
    if _RATIOS:
        terminalreporter.section("cptfast: ratios against same-run baselines (higher is better)")
        for name, baseline, ratio, note in _RATIOS:
            terminalreporter.write_line(f"{name:<44} vs {baseline:<34} {ratio:8.2f}x  {note}")
    if _METRICS:
        terminalreporter.section("cptfast: measured values")
        for name, value, note in _METRICS:
            terminalreporter.write_line(f"{name:<44} {value:>14}  {note}")
    if _ROOFLINE:
        terminalreporter.section("cptfast: roofline (fraction of the measured peak FLOP/s)")
        for r in _ROOFLINE:
            terminalreporter.write_line(
                f"{r['name'] + ': ' + r['variant']:<60} {r['device']:<6} "
                f"{r['flops_per_s'] / 1e9:12,.1f} GFLOP/s {r['of_peak']:7.1%} of peak "
                f"{r['of_bound']:7.1%} of bound ({r['bound']})")


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """After each row, the GPU memory its tensors held goes back to the device, so that the
    next row (or the training run it starts in another process) finds all of it."""
    yield
    import gc

    import torch

    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def bench_tokenizer(tmp_path_factory):
    import random

    from synthetic_text import domain_document, general_document

    from cptfast.training.demo import build_tokenizer

    rng = random.Random(0)
    texts = [domain_document(rng) for _ in range(300)] + [general_document(rng) for _ in range(300)]
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), texts, vocab_size=2048)


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory):
    """For the training benchmarks: a corpus of lognormal-length documents over a 32,000-word
    vocabulary (a word-level tokenizer), as token ids (JSON lines) and as a shard directory,
    and a Llama-shaped initial model (hidden 256, 4 layers, 8 / 4 heads). Words are drawn
    with Zipf-Mandelbrot frequencies (rank r with weight 1 / (r + 2.7)), as in natural text,
    so the loss curves fall the way they do on real data (towards the unigram entropy, 7.8
    nats, from ln 32,000 = 10.4) rather than stay flat on uniform noise."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cptfast.data import prepare

    root = tmp_path_factory.mktemp("train_bench")
    vocab = {f"w{i}": i for i in range(TRAIN_VOCAB - 2)}
    vocab |= {"<unk>": TRAIN_VOCAB - 2, "<eos>": TRAIN_VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.3, 0.8, int(3000 * max(SCALE, 0.2))), 8,
                      TRAIN_SEQ_LEN - 1)
    words = TRAIN_VOCAB - 2
    frequency = 1.0 / (np.arange(words) + 2.7)
    frequency = frequency[rng.permutation(words)] / frequency.sum()  # ranks scattered over ids
    texts = [" ".join(f"w{t}" for t in rng.choice(words, int(n), p=frequency))
             for n in lengths]
    (root / "corpus.txt").write_text("\n".join(texts))
    prepare([root / "corpus.txt"], root / "shards", root / "model", split_lines=True,
            progress=False)
    with open(root / "corpus.jsonl", "w") as f:  # what prepare made of it, EOS appended
        for text in texts:
            f.write(json.dumps({"ids": tokenizer(text).input_ids + [TRAIN_VOCAB - 1]}) + "\n")
    config = transformers.LlamaConfig(
        vocab_size=TRAIN_VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4 * TRAIN_SEQ_LEN,
        eos_token_id=TRAIN_VOCAB - 1, pad_token_id=TRAIN_VOCAB - 1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    return root
