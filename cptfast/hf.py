"""The `transformers` backend: `cptfast.accelerate(model)` makes a Hugging Face causal LM use
cptfast's kernels, in place, with nothing else changing (same checkpoint, generation, eval).

- Attention: cptfast's varlen attention is registered with transformers' attention interface
  under the name "cptfast" and the model is switched to it. Packed batches pass their document
  boundaries as the keyword arguments transformers defines for flash attention
  (``cu_seq_lens_q``/``max_length_q``); they are never guessed from ``position_ids``. Padded
  batches (a 2-D ``attention_mask``) are unpadded into documents; decoding with a KV cache
  (queries fewer than keys) goes through PyTorch's SDPA with an explicit mask. q, k, v come
  in one dtype, as the stock attention computes: the autocast dtype under autocast, else v's.
- Loss: in training with labels, the last hidden state goes straight into
  `fused_linear_cross_entropy` with ``lm_head.weight`` (labels shifted as transformers shifts
  them, ``num_items_in_batch`` honoured); no logits are built and ``logits`` is ``None`` unless
  ``return_logits=True``. In eval and generation the model's own forward runs.
- RoPE: inside the model's attention modules, the family's ``apply_rotary_pos_emb`` becomes
  the fused in-place kernel on CUDA (other models of the family are untouched).

Everything family-specific is one row of FAMILIES.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import warnings
from dataclasses import dataclass

import torch

from cptfast import ops

ATTENTION_NAME = "cptfast"  # transformers' attn_implementation names, per implementation
# (no "flash" in a name: transformers would look for a hub kernel)
ATTENTION_NAMES = {"cptfast": ATTENTION_NAME, "flash_attn": "cptfast_fa"}


@dataclass(frozen=True)
class Family:
    module: str                        # transformers.models.<module>.modeling_<module>
    logit_softcap: str | None = None   # config attribute of the final-logit softcap


FAMILIES = {  # config.model_type -> facts
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma2": Family("gemma2", logit_softcap="final_logit_softcapping"),
    "gemma3_text": Family("gemma3", logit_softcap="final_logit_softcapping"),
    "phi3": Family("phi3"),
}


@dataclass
class _State:
    attention: str | None  # the implementation (ops.ATTENTION_IMPLEMENTATIONS), None: off
    loss: bool
    rope: bool
    original_attention: str | None
    rotary_hooks: list


def accelerate(model, *, attention: bool | str = True, loss: bool = True, rope: bool = True):
    """Patch a `transformers` (>= 5) causal LM instance in place to use cptfast's kernels and
    return it. ``attention``, ``loss``, ``rope`` pick the parts; ``attention`` may name the
    packed-attention implementation ("cptfast", the default for True, or "flash_attn").
    Accelerating an accelerated model with the same options does nothing; `unaccelerate`
    undoes it."""
    attention = "cptfast" if attention is True else (attention or None)
    if attention is not None and attention not in ATTENTION_NAMES:
        raise ValueError(f"attention must be True, False or one of "
                         f"{', '.join(ATTENTION_NAMES)}; got {attention!r}")
    state = getattr(model, "_cptfast", None)
    if state is not None:
        if (state.attention, state.loss, state.rope) == (attention, loss, rope):
            return model
        unaccelerate(model)
    family = family_of(model, attention=attention, loss=loss, rope=rope)
    original_attention = None
    if attention:
        _register_attention()
        original_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAMES[attention])
    if loss:
        model.forward = _accelerated_forward.__get__(model)
    hooks = []
    if rope:
        _install_rotary(family)
        hooks = _rotary_hooks(model, family)
    model._cptfast = _State(attention, loss, rope, original_attention, hooks)
    return model


def unaccelerate(model):
    """Undo `accelerate` on this model (a no-op on a model that is not accelerated)."""
    state = getattr(model, "_cptfast", None)
    if state is None:
        return model
    if state.attention:
        model.set_attn_implementation(state.original_attention)
    if state.loss:
        del model.forward  # the class's forward shows through again
    for hook in state.rotary_hooks:
        hook.remove()
    del model._cptfast
    return model


def family_of(model, **parts: bool) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    wanted = ", ".join(name for name, on in parts.items() if on)
    raise NotImplementedError(
        f"cptfast.accelerate supports the families {', '.join(sorted(FAMILIES))}, not "
        f"{model_type!r} ({type(model).__name__}). Every part asked for ({wanted}) needs a "
        "supported family; on other models use the kernels directly "
        "(cptfast.varlen_attention, cptfast.fused_linear_cross_entropy).")


# ---------------------------------------------------------------------------------------------
# Loss: the last hidden state into the fused linear cross-entropy, no logits.

def _accelerated_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                         inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                         return_logits: bool | None = None, **kwargs):
    """The model's forward; with labels in training, the loss comes from the fused linear
    cross-entropy and no logits are built. ``return_logits=True`` builds them as usual;
    ``return_logits=False`` skips them in eval too (a held-out loss without logits).
    ``token_loss_weights`` (like the labels) weights each token's loss. A KV cache passes
    through in ``kwargs`` under the name the caller used (``cache``; ``past_key_values`` before
    transformers 5.24), so no deprecated argument is sent."""
    shift_labels = kwargs.get("shift_labels")
    token_loss_weights = kwargs.pop("token_loss_weights", None)
    fused = ((labels is not None or shift_labels is not None)
             and isinstance(logits_to_keep, int) and logits_to_keep == 0
             and (return_logits is False or (return_logits is None and self.training)))
    if token_loss_weights is not None and not fused:
        raise ValueError("token_loss_weights needs the fused loss: labels, no logits_to_keep, "
                         "and training mode or return_logits=False")
    if not fused:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    if shift_labels is None:  # position i predicts token i + 1, as transformers shifts
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    num_items = kwargs.get("num_items_in_batch")
    if token_loss_weights is None:
        loss = lm_loss(self, outputs.last_hidden_state, shift_labels,
                       reduction="mean" if num_items is None else "sum")
    else:  # per-token weights (e.g. per source): sum of weight x loss over the label count
        losses = lm_loss(self, outputs.last_hidden_state, shift_labels, reduction="none")
        loss = (losses * token_loss_weights.reshape(-1).to(losses)).sum()
        if num_items is None:
            num_items = (shift_labels != -100).sum().clamp_min(1)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None,
                                  past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def lm_loss(model, hidden: torch.Tensor, shift_labels: torch.Tensor, *,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of a supported causal LM from its last hidden state [..., H] and labels
    already aligned with it (-100: ignored), through the fused linear cross-entropy with the
    model's output head and final-logit softcap: no logits."""
    family = family_of(model, loss=True)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, family.logit_softcap) if family.logit_softcap else None
    return ops.fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight,
        shift_labels.reshape(-1).to(hidden.device), bias=head.bias, softcap=softcap,
        reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Attention, through transformers' attention interface.

def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    for implementation, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, functools.partial(attention_forward,
                                                            implementation=implementation))
        # Like flash attention, we want either no mask or the 2-D padding mask, never 4-D.
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


_warned_about_position_ids = False


def attention_forward(module, query, key, value, attention_mask, *, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                      max_length_q=None, max_length_k=None, position_ids=None,
                      implementation: str = "cptfast", **kwargs):
    """transformers attention-interface function (``implementation``: see
    `ops.varlen_attention`). query [B, Hq, S, D], key/value
    [B, Hkv, K, D], attention_mask None or a 2-D [B, K] padding mask; returns
    ([B, S, Hq, D], None). transformers' ``sliding_window`` w lets a query see itself and the
    w - 1 keys before it, i.e. cptfast's window w - 1."""
    if dropout:
        raise NotImplementedError("cptfast attention has no attention dropout; set the "
                                  "config's attention_dropout to 0")
    query, key, value = _one_dtype(query, key, value)
    window = sliding_window - 1 if sliding_window is not None else None
    causal = getattr(module, "is_causal", True)
    options = dict(causal=causal, softmax_scale=scaling, window=window, softcap=softcap,
                   implementation=implementation)
    batch, _, q_len, head_dim = query.shape
    k_len = key.shape[2]
    q = query.transpose(1, 2)  # [B, S, H, D]
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    if cu_seq_lens_q is not None:  # packed documents, boundaries given
        if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
            raise ValueError("cptfast attention needs cu_seq_lens_k equal to cu_seq_lens_q "
                             "(queries and keys packed the same way)")
        if attention_mask is not None or q_len != k_len:
            raise ValueError("cu_seq_lens_q describes packed documents: pass no attention_mask "
                             "and no KV cache with it")
        cu_seqlens = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        max_seqlen = int(max_length_q) if max_length_q is not None else int(
            (cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = ops.varlen_attention(_tokens(q), _tokens(k), _tokens(v), cu_seqlens, max_seqlen,
                                   **options)
        return out.view(batch, q_len, *out.shape[1:]), None
    if q_len != k_len:  # decoding with a KV cache
        return _attention_with_cache(query, key, value, attention_mask, scaling, window,
                                     softcap), None
    if attention_mask is None:  # every row one sequence
        if position_ids is not None and getattr(module, "layer_idx", 0) == 0:
            _warn_if_packed(position_ids)
        lengths = torch.full((batch,), q_len, dtype=torch.int32, device=query.device)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        out = ops.varlen_attention(_tokens(q), _tokens(k), _tokens(v), cu_seqlens, q_len,
                                   **options)
        return out.view(batch, q_len, *out.shape[1:]), None
    # Padded rows: the kept tokens of each row form one document.
    keep = attention_mask.reshape(-1).bool()
    kept = keep.nonzero().squeeze(1)
    lengths = attention_mask.bool().sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    out = ops.varlen_attention(_tokens(q)[kept], _tokens(k)[kept], _tokens(v)[kept],
                               cu_seqlens, max(int(lengths.max()), 1), **options)
    full = out.new_zeros(batch * q_len, *out.shape[1:])
    full[kept] = out
    return full.view(batch, q_len, *out.shape[1:]), None


def _one_dtype(query, key, value):
    """q, k, v in the one dtype the stock attention would compute in. Under autocast on their
    device, the autocast dtype (SDPA is on autocast's lower-precision list). Otherwise v's
    dtype: the model's own, since only q and k can have been promoted on the way (by fp32
    cos/sin, which an fp32 model's rotary gives under autocast, or by an fp32 q/k norm).
    Only attention's inputs are cast; cptfast.ops still refuses mixed dtypes."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = value.dtype
    return tuple(x if x.dtype == dtype else x.to(dtype) for x in (query, key, value))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> [B*S, H, D] (a view whenever the layout allows)."""
    return x.reshape(-1, *x.shape[2:])


def _warn_if_packed(position_ids: torch.Tensor) -> None:
    global _warned_about_position_ids
    if _warned_about_position_ids:
        return
    if (position_ids[..., 1:] != position_ids[..., :-1] + 1).any():
        _warned_about_position_ids = True
        warnings.warn(
            "position_ids restart inside a row but no cu_seq_lens_q was passed: cptfast "
            "attention treats each row as one sequence, so documents see each other. Pass "
            "cu_seq_lens_q/cu_seq_lens_k/max_length_q/max_length_k (e.g. "
            "DataCollatorWithFlattening(return_flash_attn_kwargs=True)) to keep them apart.",
            stacklevel=3)


def _attention_with_cache(query, key, value, attention_mask, scaling, window, softcap):
    """Queries are the last q_len positions of the k_len keys (a KV cache): explicit mask,
    causal aligned bottom-right, plus padding and window. Returns [B, S, Hq, D]."""
    q_len, k_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    k_pos = torch.arange(k_len, device=query.device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= q_pos - k_pos <= window
    visible = visible[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask[:, -k_len:].bool()[:, None, None, :]
    # A query on a padding position sees nothing; let it see everything instead of making NaN.
    visible = visible | ~visible.any(-1, keepdim=True)
    group = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                               attn_mask=visible, scale=scale)
    else:
        scores = (query @ key.transpose(-1, -2)).float() * scale
        scores = softcap * torch.tanh(scores / softcap)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = (weights.to(value.dtype) @ value)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# RoPE: the family's apply_rotary_pos_emb, swapped for the fused in-place kernel on CUDA.
# transformers calls a module-level function, so the swap is made once per family and passes
# through to the original unless called from inside an accelerated model's attention module
# (forward hooks, which also fire when activation checkpointing recomputes a layer).

_fused_rotary_on = contextvars.ContextVar("cptfast_fused_rotary", default=False)


def _modeling(family: Family):
    return importlib.import_module(
        f"transformers.models.{family.module}.modeling_{family.module}")


def _install_rotary(family: Family) -> None:
    modeling = _modeling(family)
    original = modeling.apply_rotary_pos_emb
    if hasattr(original, "cptfast_original"):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _fused_rotary_on.get():
            return _fused_rotary(q, k, cos, sin, unsqueeze_dim, original)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.cptfast_original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _rotary_hooks(model, family: Family) -> list:
    """Hooks that switch the fused rotary on around each attention module of this model."""
    modeling_name = _modeling(family).__name__
    handles = []
    for module in model.modules():
        kind = type(module)
        if kind.__module__ == modeling_name and kind.__name__.endswith("Attention"):
            handles.append(module.register_forward_pre_hook(_rotary_on))
            handles.append(module.register_forward_hook(_rotary_off, always_call=True))
    return handles


def _rotary_on(module, args):
    module._cptfast_rotary_token = _fused_rotary_on.set(True)


def _rotary_off(module, args, output):
    _fused_rotary_on.reset(module.__dict__.pop("_cptfast_rotary_token"))


def _fused_rotary(q, k, cos, sin, unsqueeze_dim, original):
    """q [B, Hq, S, D], k [B, Hkv, S, D] (transposed views of the projections), cos/sin
    [B or 1, S, D]. Rotated in place by the kernel when it applies (CUDA or a forced Triton
    backend, full-width rotary, the projections' [B, S, H, D] layout); otherwise the original."""
    q_rows, k_rows = q.transpose(1, 2), k.transpose(1, 2)
    if (unsqueeze_dim != 1 or ops.backend_for(q) != "triton" or cos.shape[-1] != q.shape[-1]
            or not q_rows.is_contiguous() or not k_rows.is_contiguous()):
        return original(q, k, cos, sin, unsqueeze_dim)
    batch, seq = q.shape[0], q.shape[2]
    cos, sin = (t.expand(batch, seq, -1).reshape(batch * seq, -1) for t in (cos, sin))
    ops.apply_rotary_(q_rows.view(batch * seq, *q_rows.shape[2:]),
                      k_rows.view(batch * seq, *k_rows.shape[2:]), cos, sin)
    return q, k
