"""`cptfast merge`: linear interpolation of a base and a continued-pretrained checkpoint,
theta = (1 - alpha) * base + alpha * tuned (alpha 0: the base, 1: the tuned model), a simple
and effective control of forgetting (model soups / task arithmetic: Wortsman et al. 2022,
Ilharco et al. 2023). With held-out sets it reports the loss of each for a sweep of alphas.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cptfast.errors import DataError


def interpolate(base: dict, tuned: dict, alpha: float) -> dict:
    """The interpolated state dict (computed in fp32, stored in the tuned model's dtypes)."""
    if base.keys() != tuned.keys():
        raise DataError(f"the checkpoints hold different tensors: only in base "
                         f"{sorted(base.keys() - tuned.keys())[:3]}, only in tuned "
                         f"{sorted(tuned.keys() - base.keys())[:3]}")
    merged = {}
    for name, tuned_tensor in tuned.items():
        if base[name].shape != tuned_tensor.shape:
            raise DataError(f"{name}: shape {tuple(base[name].shape)} in base but "
                             f"{tuple(tuned_tensor.shape)} in tuned (an expanded vocabulary? "
                             "merge the expanded base instead)")
        if not tuned_tensor.is_floating_point():
            merged[name] = tuned_tensor
            continue
        mixed = torch.lerp(base[name].float(), tuned_tensor.float(), alpha)
        merged[name] = mixed.to(tuned_tensor.dtype)
    return merged


def merge(base_dir: str | Path, tuned_dir: str | Path, alpha: float,
          output: str | Path | None = None, *, eval_sets: dict[str, str] | None = None,
          alphas: list[float] | None = None, seq_len: int = 512, batch_size: int = 4,
          batches: int = 8) -> list[dict]:
    """Evaluate the held-out sets for every alpha of ``alphas`` (if any sets are given) and
    write the merge at ``alpha`` to ``output`` (if given). Returns one row per alpha:
    {"alpha": a, NAME: loss, ...}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptfast.hf import accelerate
    from cptfast.training.evaluation import eval_loss, held_out_batches

    if not 0.0 <= alpha <= 1.0 or any(not 0.0 <= a <= 1.0 for a in alphas or []):
        raise DataError("alphas must lie in [0, 1] (0: the base, 1: the tuned model)")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").state_dict()
    model = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype="auto")
    tuned = {name: t.clone() for name, t in model.state_dict().items()}
    rows = []
    if eval_sets:
        rows_of_model = model.get_input_embeddings().weight.shape[0]
        sets = {name: held_out_batches(path, seq_len, batch_size, batches, torch.device("cpu"),
                                       embedding_rows=rows_of_model, name=name)
                for name, path in eval_sets.items()}
        accelerate(model, rope=False)
        for a in alphas or [alpha]:
            model.load_state_dict(interpolate(base, tuned, a))
            rows.append({"alpha": a, **{name: eval_loss(model, batches_)
                                        for name, batches_ in sets.items()}})
    if output is not None:
        from cptfast.hf import unaccelerate
        unaccelerate(model)
        model.load_state_dict(interpolate(base, tuned, alpha))
        model.save_pretrained(output)
        AutoTokenizer.from_pretrained(tuned_dir).save_pretrained(output)
    return rows
