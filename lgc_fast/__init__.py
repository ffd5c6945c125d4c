"""lgc_fast: a fast Local-Global Context Network for facial landmarks (Merget, Rock, Rigoll, CVPR 2018).

Importing this package never builds anything; without the compiled extension the ops fall back to Triton or plain
torch and say so once. ``lgc_fast.backends()`` reports what is available and why.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["Detector", "backends", "ops", "__version__"]


def __getattr__(name):
    # Imported when first asked for: the package itself stays free of torch, so the `lgc-fast` command answers Ctrl-C
    # during torch's import with its own one-line message; the detector also pulls in OpenCV and the model.
    if name == "backends":
        return importlib.import_module("lgc_fast._backend").backends
    if name == "ops":
        return importlib.import_module("lgc_fast.ops")
    if name == "Detector":
        return importlib.import_module("lgc_fast.detect").Detector
    raise AttributeError(f"module 'lgc_fast' has no attribute {name!r}")
