"""Refuses a bare `import kernels.<name>`: the Triton kernels install as `cptfast.kernels`.

The check cannot live in kernels/__init__.py: from the source root, `transformers` imports a
bare `kernels` while probing for the Hugging Face package of that name, and an error there
would break `import transformers.models...` for anyone working in the checkout. Each kernel
module imports this guard first instead.
"""

if __name__ != "cptfast.kernels._guard":
    raise ImportError(
        f"the Triton kernels must be imported as `cptfast.kernels`, not "
        f"`{__name__.split('.')[0]}`; "
        "install cptfast (`pip install --no-build-isolation -e .`) and import cptfast.kernels"
    )
