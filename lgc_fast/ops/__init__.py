"""Public ops. Each has a plain-torch ``<op>_ref`` that is its test oracle."""
from lgc_fast.ops.kernel_conv import kernel_2d, kernel_conv, kernel_conv_ref, kernel_taps

__all__ = ["kernel_2d", "kernel_conv", "kernel_conv_ref", "kernel_taps"]
