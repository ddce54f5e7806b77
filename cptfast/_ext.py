"""Access to the compiled extension ``cptfast._C`` with an actionable error when it is missing.

Everything pure-Python in cptfast imports without the extension; code that needs it calls
:func:`extension` at the point of use.
"""

from types import ModuleType

from cptfast.errors import ExtensionNotBuiltError

_BUILD_HINT = (
    "cptfast's C++ extension (cptfast._C) is not built. Build it against your installed torch "
    "from the source checkout: `pip install --no-build-isolation -e .` (torch must already be "
    "installed; CPU: `pip install torch==2.13.0+cpu`). If you built it already, make sure you "
    "are not importing cptfast from a different copy of the source tree."
)


def extension() -> ModuleType:
    """Return the ``cptfast._C`` module, or raise :class:`ExtensionNotBuiltError`."""
    try:
        import torch  # noqa: F401  (loads libtorch, which the extension links against)

        from cptfast import _C
    except ImportError as error:
        raise ExtensionNotBuiltError(f"{_BUILD_HINT} (import failed: {error})") from error
    return _C
