"""Shared by the trainer tests: shard directories and a tiny base model, built offline."""

import random

import pytest
import torch


@pytest.fixture(scope="session")
def setup(tmp_path_factory, tokenizer_dir):
    """Two shard directories and a tiny Llama-shaped base model, built offline."""
    import transformers

    from cptfast.data import prepare
    from synthetic_text import domain_document, general_document

    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    for name, make in (("domain", domain_document), ("general", general_document)):
        (root / f"{name}.txt").write_text("\n".join(make(rng) for _ in range(200)))
        prepare([root / f"{name}.txt"], root / name, tokenizer_dir, split_lines=True,
                workers=1, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root
