"""Public ops. Each has a plain-torch ``<op>_ref`` that is its test oracle."""
from lgc_fast.ops.bn_finalize import bn_finalize, bn_finalize_ref
from lgc_fast.ops.bn_relu_dropout import (
    bn_relu_dropout,
    bn_relu_dropout_drawn,
    bn_relu_dropout_ref,
    dropout_keep_mask,
    pack_keep_mask,
    random_keep_bits,
    unpack_keep_bits,
)
from lgc_fast.ops.conv_stack import conv_stack, conv_stack_ref, stack_graphs
from lgc_fast.ops.conv_stack_graphs import stack_keep_mask
from lgc_fast.ops.dilated_block import (
    dilated_block,
    dilated_block_ref,
    dilated_block_train,
    dilated_conv,
    dilated_conv_ref,
    draw_dropout_mask,
    fold_batchnorm,
)
from lgc_fast.ops.fused_conv import fused_conv, fused_conv_ref
from lgc_fast.ops.fit_shape import ShapeFit, fit_shape, fit_shape_ref, fit_shape_stats, fit_shape_stats_ref
from lgc_fast.ops.kernel_conv import kernel_2d, kernel_conv, kernel_conv_ref, kernel_taps
from lgc_fast.ops.layout import (
    channels_last_cat,
    channels_last_cat_ref,
    channels_last_strided,
    planar_split,
    planar_split_ref,
    pointwise_conv_planar,
    pointwise_conv_planar_ref,
)
from lgc_fast.ops.lgc_loss import lgc_loss, lgc_loss_ref, loss_weights, splat_heatmaps, target_maps_ref
from lgc_fast.ops.same_conv2d import (
    clear_same_conv2d_choices,
    same_conv2d,
    same_conv2d_choices,
    same_conv2d_ref,
    transposed_filter,
    tune_same_conv2d,
)

__all__ = [
    "bn_finalize", "bn_finalize_ref",
    "bn_relu_dropout", "bn_relu_dropout_drawn", "bn_relu_dropout_ref", "dropout_keep_mask", "pack_keep_mask", "random_keep_bits",
    "unpack_keep_bits",
    "conv_stack", "conv_stack_ref", "stack_graphs", "stack_keep_mask",
    "dilated_block", "dilated_block_ref", "dilated_block_train", "dilated_conv", "dilated_conv_ref",
    "draw_dropout_mask", "fold_batchnorm",
    "fused_conv", "fused_conv_ref",
    "ShapeFit", "fit_shape", "fit_shape_ref", "fit_shape_stats", "fit_shape_stats_ref",
    "kernel_2d", "kernel_conv", "kernel_conv_ref", "kernel_taps",
    "channels_last_cat", "channels_last_cat_ref", "channels_last_strided", "planar_split", "planar_split_ref", "pointwise_conv_planar",
    "pointwise_conv_planar_ref",
    "lgc_loss", "lgc_loss_ref", "loss_weights", "splat_heatmaps", "target_maps_ref",
    "clear_same_conv2d_choices", "same_conv2d", "same_conv2d_choices", "same_conv2d_ref", "transposed_filter",
    "tune_same_conv2d",
]
