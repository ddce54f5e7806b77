"""Triton kernels of cptfast, one file per operation; installed as ``cptfast.kernels``.

Nothing here imports from ``cptfast``: the dependency points the other way (``cptfast.ops``
chooses between these kernels and ``cptfast.reference``). Each kernel module refuses to load
under a bare ``kernels.`` name (see _guard.py). This file itself must import quietly and define
no ``__version__``: from the source root, ``transformers`` finds this folder while probing for
the Hugging Face ``kernels`` package, and only a version-less package reads as "not installed".
"""
