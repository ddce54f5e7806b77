"""Held-out evaluation shared by the trainer (the forgetting monitor) and `cptfast merge`:
fixed batches of a shard directory and their mean next-token loss, without logits."""

from __future__ import annotations

import torch

from cptfast.data.loader import PackedLoader


def held_out_batches(source, seq_len: int, batch_size: int, batches: int,
                     device: torch.device, *, embedding_rows: int | None = None,
                     name: str = "eval") -> list:
    """The same ``batches`` micro-batches of a held-out source (anything
    `cptfast.data.open_source` takes) every time; token ids checked against
    ``embedding_rows``."""
    loader = PackedLoader({name: source}, seq_len, batch_size, packing="concat", seed=1234,
                          num_threads=0, device=device, vocab_size=embedding_rows)
    return [next(loader) for _ in range(batches)]


@torch.no_grad()
def eval_loss(model, batches, precision: str = "fp32") -> float:
    """Mean next-token loss over the batches, through the model's forward (so DDP and FSDP2
    wrappers work) with the fused loss: no logits are built."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast(precision, batch.input_ids.device):
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                        labels=batch.labels, shift_labels=batch.labels, num_items_in_batch=1,
                        return_logits=False, cu_seq_lens_q=batch.cu_seqlens,
                        cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen,
                        max_length_k=batch.max_seqlen)
        total += float(out.loss)  # a sum: num_items_in_batch = 1
        count += int((batch.labels != -100).sum())
    model.train()
    return total / max(count, 1)


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16-mixed" and device.type == "cuda")
