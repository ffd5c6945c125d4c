"""Public ops. Each has a plain-torch ``<op>_ref`` that is its test oracle."""
from lgc_fast.ops.kernel_conv import kernel_2d, kernel_conv, kernel_conv_ref, kernel_taps
from lgc_fast.ops.lgc_loss import lgc_loss, lgc_loss_ref, loss_weights, splat_heatmaps, target_maps_ref

__all__ = [
    "kernel_2d", "kernel_conv", "kernel_conv_ref", "kernel_taps",
    "lgc_loss", "lgc_loss_ref", "loss_weights", "splat_heatmaps", "target_maps_ref",
]
