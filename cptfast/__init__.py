"""cptfast: kernel-accelerated continued pretraining of Hugging Face causal language models.

Submodules load on first use, so `import cptfast` is cheap (the `cptfast` command and the
tokenizer worker processes of `cptfast prepare` start fast).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("data", "errors", "hf", "ops", "reference", "training")
_FROM_OPS = ("apply_rotary_", "cross_entropy", "fused_linear_cross_entropy",
             "varlen_attention")
_FROM_HF = ("accelerate", "unaccelerate")
_FROM_TRAINING = ("train", "Callback")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"cptfast.{name}")
    if name in _FROM_OPS:
        return getattr(importlib.import_module("cptfast.ops"), name)
    if name in _FROM_HF:
        return getattr(importlib.import_module("cptfast.hf"), name)
    if name in _FROM_TRAINING:
        return getattr(importlib.import_module("cptfast.training"), name)
    raise AttributeError(f"module 'cptfast' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES, *_FROM_OPS, *_FROM_HF, *_FROM_TRAINING])
