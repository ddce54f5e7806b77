import os
import tempfile

# Triton kernels run on the CPU through the interpreter; this must be set before any launch.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Loader index caches go to a throw-away directory, never the user's ~/.cache.
os.environ["CPTFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="cptfast-test-index-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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
    from cptfast.demo import build_tokenizer
    return build_tokenizer(tmp_path_factory.mktemp("tok_bos"), SAMPLE_TEXTS * 4, vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer_no_bos_dir(tmp_path_factory) -> Path:
    """The same kind of tokenizer without BOS (the GPT-2 convention)."""
    from cptfast.demo import build_tokenizer
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

