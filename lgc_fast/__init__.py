"""lgc_fast: a fast Local-Global Context Network for facial landmarks (Merget, Rock, Rigoll, CVPR 2018).

Importing this package never builds anything; without the compiled extension the ops fall back to Triton or plain
torch and say so once. ``lgc_fast.backends()`` reports what is available and why.
"""
from lgc_fast._backend import backends
from lgc_fast import ops

__version__ = "0.1.0"
__all__ = ["Detector", "backends", "ops", "__version__"]


def __getattr__(name):
    # The detector pulls in OpenCV and the model: import it only when asked for.
    if name == "Detector":
        from lgc_fast.detect import Detector

        return Detector
    raise AttributeError(f"module 'lgc_fast' has no attribute {name!r}")
