"""Shared fixtures, and the test device.

Two modes, chosen by CPTFAST_TEST_DEVICE before anything is imported:

- ``cpu`` (the default): the Triton kernels run on the CPU under the interpreter
  (TRITON_INTERPRET=1, which also takes their fp32-dot path for bf16 inputs).
- ``cuda``: the kernel, loss, attention, RoPE, loader-expansion and accelerate tests put their
  tensors on the GPU, with the interpreter off: compiled kernels, bf16 ``tl.dot`` on tensor
  cores, against the same float64 oracles. Tolerances are per dtype: bf16 as on the CPU; fp32
  inputs to ``tl.dot`` are rounded to TF32 on the GPU (10 mantissa bits against bf16's 7, so
  4x finer than bf16), and only there, where a Triton ``tl.dot`` is on the path, the fp32
  tolerance is loosened to a quarter of the bf16 one. Each test file says which of its
  comparisons that is. Tests that only make sense on the CPU are marked ``cpu_only``.
  Without a usable GPU this mode stops before collecting anything.
"""

import os
import tempfile

TEST_DEVICE = os.environ.get("CPTFAST_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE == "cpu":
    # Triton kernels run on the CPU through the interpreter; this must be set before any launch.
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif TEST_DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Loader index caches go to a throw-away directory, never the user's ~/.cache.
os.environ["CPTFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="cptfast-test-index-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): skipped in the CUDA test mode (CPTFAST_TEST_DEVICE=cuda)")
    if TEST_DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"CPTFAST_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "CPTFAST_TEST_DEVICE=cuda needs a CUDA GPU and a CUDA build of torch, and this "
            f"machine has none (torch {torch.__version__}, torch.cuda.is_available() is "
            "False); unset CPTFAST_TEST_DEVICE to run the tests on the CPU")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cuda":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else "meaningful on the CPU only"
            item.add_marker(pytest.mark.skip(reason=f"CUDA test mode: {reason}"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the device tests put their tensors: cpu, or cuda with CPTFAST_TEST_DEVICE=cuda.
    Tests draw their values on the CPU (same generators) and move them, so both modes compare
    the same numbers against the same oracles."""
    return torch.device(TEST_DEVICE)


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zoë's café serves crème brûlée — naïve déjà vu.",
    "東京タワーは高いです。北京欢迎你。",
    "Emoji: 🚀🔥👍🏽 and math: ∑ᵢ xᵢ² ≤ ∞",
    "Ελληνικά, русский, العربية, עברית, हिन्दी.",
    "def f(x):\n    return x ** 2  # code\n\ttabs",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer that prepends BOS (the Llama convention); vocab 300."""
    from cptfast.training.demo import build_tokenizer
    return build_tokenizer(tmp_path_factory.mktemp("tok_bos"), SAMPLE_TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer_no_bos_dir(tmp_path_factory) -> Path:
    """The same kind of tokenizer without BOS (the GPT-2 convention)."""
    from cptfast.training.demo import build_tokenizer
    return build_tokenizer(tmp_path_factory.mktemp("tok_nobos"), SAMPLE_TEXTS * 4,
                           vocab_size=300, add_bos=False)


@pytest.fixture(scope="session")
def big_vocab_tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with 70,002 entries: more than uint16 holds, so shards use int32."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<unk>"] = 70_000
    vocab["<eos>"] = 70_001
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("tok_big")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(str(directory))
    return directory

