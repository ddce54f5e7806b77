"""The tiny offline models of every family cptfast.accelerate supports, built from configs
(no downloads), shared by the accelerate tests. ``CONFIGS[model_type]()`` makes a fresh config;
``transformers.AutoModelForCausalLM.from_config`` builds the random model from it."""

import transformers

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.2, attn_implementation="eager", pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
GEMMA = dict(head_dim=16, sliding_window=6, final_logit_softcapping=0.8,
             query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, **GEMMA, attn_logit_softcapping=0.7),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, **GEMMA),
    "phi3": lambda: transformers.Phi3Config(**COMMON),  # one fused qkv_proj
}
