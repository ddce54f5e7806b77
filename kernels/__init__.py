"""Triton kernels of cptfast, one file per operation; installed as ``cptfast.kernels``.

Nothing here imports from ``cptfast``: the dependency points the other way (``cptfast.ops``
chooses between these kernels and ``cptfast.reference``).
"""

if __name__ != "cptfast.kernels":
    raise ImportError(
        f"the Triton kernels must be imported as `cptfast.kernels`, not `{__name__}`; "
        "install cptfast (`pip install --no-build-isolation -e .`) and import cptfast.kernels"
    )
