"""Vocabulary expansion for continued pretraining on a new language or domain
(`cptfast expand-vocab`): grow a model's embeddings and output head to a larger tokenizer.

The new tokenizer must extend the old one (every old token keeps its id). New rows start as:
- ``decompose`` (default): the mean of the old embeddings of the pieces the *old* tokenizer cuts
  the new token's text into, for the input embedding and the output head alike; a new token
  then starts where the model already "thinks" its text is (as in Gee et al. 2022 and the
  "mean of subword embeddings" family of methods);
- ``mean``: the mean of all old rows plus Gaussian noise of ``noise_std`` x their standard
  deviation (Hewitt 2021).
The model's config records ``cptfast_vocab_expanded_from`` (the old vocabulary size), which the
trainer's ``model.new_rows_warmup_steps`` uses to train only the new rows at first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cptfast.errors import DataError

INITS = ("decompose", "mean")


def expand_vocabulary(model_dir: str | Path, output: str | Path, *,
                      tokenizer_dir: str | Path | None = None,
                      new_tokens: list[str] | None = None, init: str = "decompose",
                      noise_std: float = 0.01, seed: int = 0) -> dict:
    """Write ``output``: the model of ``model_dir`` with rows for the tokens of
    ``tokenizer_dir`` (or of its own tokenizer plus ``new_tokens``) that it lacks, and that
    tokenizer. Returns a summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if init not in INITS:
        raise DataError(f"init must be one of {INITS}, got {init!r}")
    if (tokenizer_dir is None) == (not new_tokens):
        raise DataError("give either a new tokenizer directory or a list of new tokens")
    old = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer_dir is not None:
        new = AutoTokenizer.from_pretrained(tokenizer_dir)
        new_vocab = new.get_vocab()
        moved = [t for t, i in old.get_vocab().items() if new_vocab.get(t) != i]
        if moved:
            raise DataError(f"{tokenizer_dir} does not extend the model's tokenizer: "
                             f"{len(moved)} old tokens (e.g. {moved[:3]}) have other ids or are "
                             "gone; train the new tokenizer by adding tokens to the old one")
    else:
        new = AutoTokenizer.from_pretrained(model_dir)
        new.add_tokens(list(new_tokens))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    old_size = len(old)
    added = list(range(old_size, len(new)))
    if not added:
        raise DataError("the new tokenizer adds no tokens")
    rows_before = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(new), rows_before), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings().weight
    if head is not tables[0]:
        tables.append(head)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in tables:
            old_rows = table[:old_size].float()
            for token_id in added:
                table[token_id] = _initial_row(token_id, old_rows, old, new, init, noise_std,
                                               generator).to(table.dtype)
    model.config.cptfast_vocab_expanded_from = old_size
    output = Path(output)
    model.save_pretrained(output)
    new.save_pretrained(output)
    return {"old_vocab": old_size, "new_vocab": len(new), "added": len(added),
            "init": init, "output": str(output)}


def _initial_row(token_id: int, old_rows: torch.Tensor, old, new, init: str,
                 noise_std: float, generator: torch.Generator) -> torch.Tensor:
    if init == "decompose":
        text = _token_text(new, token_id)
        pieces = old(text, add_special_tokens=False).input_ids
        if pieces:
            return old_rows[pieces].mean(0)
    noise = torch.randn(old_rows.shape[1], generator=generator) * old_rows.std() * noise_std
    return old_rows.mean(0) + noise


def _token_text(tokenizer, token_id: int) -> str:
    """The text a token stands for: an added token's own content, else its symbols decoded
    (byte-level symbols back to UTF-8)."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is not None:
        return added.content
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
