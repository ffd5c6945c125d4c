"""The Local-Global Context Network (paper section 3.2, Figure 1; the authors' release, see the release notes).

    x (N, 1, H, W) in [0, 255]
      -> (x / 128 - 1) * 0.1
      -> local subnet: conv + BN + ReLU (x 0.1) + dropout layers, then a linear 1x1 conv -> O_l (N, C, H, W)
      -> [release] a second branch from the last local features: 1x1 conv + BN + ReLU -> B (N, C, H, W)
      -> kernel convolution with the 45x45 kernel K of eq. 1, scaled by 0.01: local = 0.01 K * O_l (and 0.01 K * B)
      -> global subnet on [local, 0.01 K * B] (release, 2C channels) or on local alone (paper, C channels):
         seven 3x3 convs with dilation 4 + BN + ReLU (x 0.1) + dropout, then a linear 1x1 conv -> O_g
      -> omega = local + O_g  (eq. 2)

The 0.1 and 0.01 factors are the release's fixed scalings (they keep activations and the kernel-convolved maps, whose
kernel sums to about 207, in a range where the heatmap targets of peak ~1 are reachable with ordinary weights).
Every layer has stride 1 and zero padding, so the network is fully convolutional and its receptive field is a
square of radius ``receptive_radius`` pixels.
"""
from __future__ import annotations

import torch
from torch import nn

from lgc_fast.data.geometry import MIRROR_68
from lgc_fast.ops.bn_relu_dropout import SEEDED_LIMIT as DROPOUT_SEED_LIMIT
from lgc_fast.ops.bn_relu_dropout import bn_relu_dropout, bn_relu_dropout_drawn, fused_backend
from lgc_fast.ops.dilated_block import dilated_conv, fold_batchnorm
from lgc_fast.ops.kernel_conv import RADIUS as KERNEL_RADIUS
from lgc_fast.ops.kernel_conv import kernel_conv
from lgc_fast.ops.layout import (channels_last_cat, channels_last_strided, is_channels_last, layout_backend,
                                 pointwise_conv_planar)
from lgc_fast.ops.same_conv2d import VIAS as CONV_VIAS
from lgc_fast.ops.same_conv2d import same_conv2d

VARIANTS = ("release", "paper")
GLOBAL_LAYERS = 7
GLOBAL_DILATION = 4
INPUT_SCALE = 0.1
ACTIVATION_SCALE = 0.1
KERNEL_OUTPUT_SCALE = 0.01


def default_local_layers(variant: str) -> tuple[int, ...]:
    """Kernel sizes of the local subnet's conv layers: release 5 x 5x5 then 10 x 3x3; paper 15 x 3x3."""
    if variant == "release":
        return (5,) * 5 + (3,) * 10
    if variant == "paper":
        return (3,) * 15
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")


def bf16_dilated_weight_grad_hazard(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether torch's CPU convolution (oneDNN) may get this 3x3 dilated convolution's weight gradient wrong: in
    bfloat16 (autocast or bfloat16 tensors), with more than 16 input channels that are not a multiple of 16 (the
    release's first global layer has 136, the paper's 68), and x or the weight channels_last, as torch.compile's
    layout optimisation makes them even for planar ones. On torch 2.13 that gradient comes out 25 % off, NaN, or the
    process crashes (AVX512-BF16 CPU); the forward pass, x's gradient, float32 and float16 are right. ``ConvBlock``
    then runs the convolution as ``lgc_fast.ops.dilated_conv``: in float32 on the CPU, and opaque to torch.compile."""
    c_in = conv.in_channels
    if x.device.type != "cpu" or conv.kernel_size != (3, 3) or conv.dilation[0] == 1 or c_in <= 16 or c_in % 16 == 0:
        return False
    if conv.padding != conv.dilation or conv.dilation[0] != conv.dilation[1] or conv.stride != (1, 1) or \
            conv.groups != 1 or conv.bias is not None:
        return False  # not dilated_conv's form
    if not (torch.is_grad_enabled() and conv.weight.requires_grad):
        return False
    bf16 = x.dtype == torch.bfloat16 or conv.weight.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and (is_channels_last(x) or is_channels_last(conv.weight) or torch.compiler.is_compiling())


def same_size_conv(conv: nn.Conv2d) -> bool:
    """Whether conv is the convolution that same_conv2d and conv_stack compute: stride 1, one group, an odd square
    filter, one dilation both ways and zero padding dilation * (k // 2), so the map keeps its size."""
    k, dilation = conv.kernel_size[0], conv.dilation[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.dilation == (dilation, dilation)
            and conv.padding == (dilation * (k // 2),) * 2)


def run_conv(conv: nn.Conv2d, x: torch.Tensor, via: str) -> torch.Tensor:
    """conv(x); a same-size convolution (``same_size_conv``) with a spatial filter runs as
    ``lgc_fast.ops.same_conv2d`` with `via` ("auto": on a GPU the faster of cuDNN's forward and data-gradient kernels
    for its shape, measured at its first call). 1x1 convolutions stay modules (``PointwiseConv`` writes planar
    maps)."""
    if conv.kernel_size[0] < 3 or not same_size_conv(conv):
        return conv(x)
    return same_conv2d(x, conv.weight, conv.bias, conv.dilation[0], via)


def count_training_batch(bn: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's bookkeeping of one training batch, for the ops that update its running statistics: counts the
    batch where it tracks them, and returns the momentum of this update (1 / count, the cumulative average, where its
    momentum is None; 0 where nothing is tracked)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


class ConvBlock(nn.Module):
    """conv (no bias: BN follows) + BN + ReLU, scaled by `act_scale`, + dropout. Same-size output.

    With `fused_epilogue` set (``LGCN.fuse_epilogues``) and a kernel backend of the op usable for the activations
    (CUDA C++ or Triton on CUDA, the compiled C++ kernels on the CPU), the BN + ReLU + scale + dropout part runs as one
    ``lgc_fast.ops.bn_relu_dropout``; the parameters, buffers and their updates are the modules' own, only the dropout
    mask comes from a different draw: keep bits, one bit a value, drawn in the forward pass (``bn_relu_dropout_drawn``:
    the bits of ``random_keep_bits``), or with `seeded_dropout` a seed from which the kernels draw it (no mask kept for
    the backward, Philox work instead).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, dilation: int = 1, dropout: float = 0.1,
                 act_scale: float = ACTIVATION_SCALE):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act_scale = act_scale
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused_epilogue = False
        self.seeded_dropout = False
        self.conv_via = "auto"  # LGCN.use_conv_via

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if bf16_dilated_weight_grad_hazard(conv, x):
            z = dilated_conv(x, conv.weight.to(x.dtype), conv.dilation[0])
        else:
            z = run_conv(conv, x, self.conv_via)
        backend = fused_backend(z.device) if self.fused_epilogue else None
        if backend is not None:
            return self._fused_epilogue(z, backend)
        y = torch.relu(self.bn(z))
        if self.act_scale != 1.0:
            y = y * self.act_scale
        return self.drop(y)

    def _fused_epilogue(self, z: torch.Tensor, backend: str) -> torch.Tensor:
        bn = self.bn
        p = self.drop.p if isinstance(self.drop, nn.Dropout) else 0.0
        # nn.BatchNorm2d's rules: batch statistics in training or without running statistics; the running ones are
        # updated in training (with the cumulative average when momentum is None).
        batch_stats = self.training or bn.running_mean is None
        momentum = count_training_batch(bn) if self.training else 0.0 if bn.momentum is None else bn.momentum
        update = not self.training or bn.track_running_stats
        running_mean, running_var = (bn.running_mean, bn.running_var) if update else (None, None)
        seed = None
        if self.training and p > 0:
            if not self.seeded_dropout or z.numel() >= DROPOUT_SEED_LIMIT:
                # keep bits (1 bit a value, z's layout) drawn from torch's generator in the forward pass itself
                return bn_relu_dropout_drawn(z, running_mean, running_var, bn.weight, bn.bias, momentum=momentum,
                                             eps=bn.eps, dropout_p=p, activation_scale=self.act_scale,
                                             backend=backend)[0]
            seed = torch.randint(2**62, (1,), device=z.device)  # from torch's generator: reproducible, resumable
        return bn_relu_dropout(z, running_mean, running_var, bn.weight, bn.bias, training=batch_stats,
                               momentum=momentum, eps=bn.eps, dropout_p=p, activation_scale=self.act_scale,
                               dropout_seed=seed, backend=backend)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, conv_stacks: bool = False,
               cudnn_plans: int = 1, graphs: str = "cudnn") -> torch.Tensor:
    """blocks(x). With `conv_stacks` in training, each run of like ConvBlocks (one kernel size and dilation, the same
    dropout, scale and BatchNorm settings) is one ``lgc_fast.ops.conv_stack`` on the pieces `graphs` names where
    those run here: "cudnn", cuDNN's fused graphs (a CUDA map in bfloat16 / float16, or under such an autocast, and
    lgc_fast._C built with the graphs), or "triton", lgc_fast's Triton kernels (``triton_unusable``); other runs, and
    blocks that are no ConvBlock, run as modules. Parameters, buffers and their updates stay the blocks'.
    cudnn_plans: conv_stack's (plans each graph builds and times once, the fastest running)."""
    if not conv_stacks or not blocks.training:
        return blocks(x)
    run: list = []
    for block in blocks:
        if run and not (isinstance(block, ConvBlock) and _stack_key(block) == _stack_key(run[0])):
            x = _stack_or_modules(run, x, cudnn_plans, graphs)
            run = []
        if isinstance(block, ConvBlock) and _stack_key(block) is not None:
            run.append(block)
        else:
            x = block(x)
    return _stack_or_modules(run, x, cudnn_plans, graphs) if run else x


def _stack_key(block: "ConvBlock"):
    conv, bn = block.conv, block.bn
    if not same_size_conv(conv) or conv.bias is not None or not bn.affine:
        return None
    r, dil = conv.kernel_size[0], conv.dilation[0]
    p = block.drop.p if isinstance(block.drop, nn.Dropout) else 0.0
    return r, dil, p, block.act_scale, bn.eps, bn.momentum, bn.track_running_stats


def _stack_or_modules(run: list, x: torch.Tensor, cudnn_plans: int, graphs: str) -> torch.Tensor:
    """The ConvBlocks of `run` on x as one conv_stack where its `graphs` pieces run, else as modules (a run whose
    first block's pieces do not, as for a 1-channel input, tries again without it)."""
    from lgc_fast.ops.conv_stack import conv_stack, cudnn_unusable, triton_unusable

    xin = x.to(torch.get_autocast_dtype("cuda")) if x.is_cuda and torch.is_autocast_enabled("cuda") else x
    r, dil, p, act_scale, eps, _, track = _stack_key(run[0])
    weights = [b.conv.weight for b in run]
    if graphs == "triton":
        unusable = triton_unusable(xin, weights)
    else:
        unusable = cudnn_unusable(xin, weights, dil, p, True, torch.is_grad_enabled(), cudnn_plans)
    if unusable:
        if len(run) > 1:
            return _stack_or_modules(run[1:], run[0](x), cudnn_plans, graphs)
        return run[0](x)
    bns = [b.bn for b in run]
    momentum = [count_training_batch(bn) for bn in bns][0]  # the blocks of a run share settings and counts
    return conv_stack(xin, weights, [bn.weight for bn in bns], [bn.bias for bn in bns],
                      [bn.running_mean for bn in bns] if track else None,
                      [bn.running_var for bn in bns] if track else None, training=True,
                      momentum=momentum, eps=eps, dropout_p=p,
                      activation_scale=act_scale, dilation=dil, graphs=graphs, cudnn_plans=cudnn_plans)


class FoldedConvBlock(nn.Module):
    """A ConvBlock for inference: its BatchNorm (running statistics) and activation scale folded into the convolution's
    weights and bias, so it runs as relu(conv(x)) with the ReLU in place; dropout is gone (eval mode). Made by
    ``fold_conv_block``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.conv_via = "auto"  # LGCN.use_conv_via

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = run_conv(self.conv, x, self.conv_via)
        # in place where nothing records (inference); a planar head's output is a view made inside its autograd
        # function (pointwise_conv_planar), which autograd forbids modifying in place
        return torch.relu(z) if torch.is_grad_enabled() else torch.relu_(z)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (stride 1, no padding) x: (N, C_in, H, W) -> (N, C_out, H, W) whose output is planar
    (NCHW-contiguous) also for a channels_last x, while `planar_output` is set (``lgc_fast.ops.pointwise_conv_planar``:
    one batched GEMM; x's gradient stays channels_last). The network's output convolutions feed kernel_conv and the
    loss, whose kernels read planar maps, so the training step changes no layout there. Same parameters and
    state_dict keys as ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
        self.planar_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.planar_output:
            return pointwise_conv_planar(x, self.weight, self.bias)
        return super().forward(x)


def fold_conv_block(conv: nn.Conv2d, bn: nn.BatchNorm2d, act_scale: float = 1.0) -> FoldedConvBlock:
    """act_scale * relu(bn(conv(x))) in eval mode, as one convolution with a bias and a ReLU: with bn(z) = z * scale +
    shift (``fold_batchnorm``), w' = act_scale * scale * w and b' = act_scale * (scale * b + shift). Exact because
    act_scale >= 0 commutes with the ReLU. Computed in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics normalises with batch statistics: it cannot be "
                         "folded into the convolution")
    if act_scale < 0:
        raise ValueError(f"act_scale must be >= 0 to commute with the ReLU, got {act_scale}")
    ones = torch.ones(bn.num_features, dtype=torch.float64, device=conv.weight.device)
    zeros = torch.zeros_like(ones)
    gamma = ones if bn.weight is None else bn.weight.detach().double()
    beta = zeros if bn.bias is None else bn.bias.detach().double()
    scale, shift = fold_batchnorm(gamma, beta, bn.running_mean.double(), bn.running_var.double(), bn.eps)
    bias = zeros if conv.bias is None else conv.bias.detach().double()
    if isinstance(conv, PointwiseConv):
        folded = PointwiseConv(conv.in_channels, conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
        folded.planar_output = conv.planar_output
    else:
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                           padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * (act_scale * scale)[:, None, None, None])
        folded.bias.copy_(act_scale * (scale * bias + shift))
    return FoldedConvBlock(folded)


class KernelConv(nn.Module):
    """The kernel convolution of eq. 1 (``lgc_fast.ops.kernel_conv``) times the constant `scale`, as a submodule:
    x (N, C, H, W) -> scale * (K * x): (N, C, H, W). The op applies the scale inside its kernels (no pass of its own).

    Holds no parameters or buffers, so it adds no state_dict keys; ``lgc_fast.export`` swaps it for a module of
    standard convolutions.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_conv(x, scale=self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class LGCN(nn.Module):
    """Local-Global Context Network.

    variant: "release" (the authors' released network: five 5x5 + ten 3x3 local layers and a second 1x1 branch into
    the global subnet) or "paper" (fifteen 3x3 local layers; the global subnet sees the C kernel-convolved maps only).
    width: filters per conv layer (128 in both); n_landmarks: C; dropout: after every non-output layer;
    local_layers: kernel sizes (odd) of the local conv layers, default per variant (narrow test/CPU models).
    """

    is_folded = False  # True on the inference copies of ``folded``
    conv_stacks = False  # ``use_conv_stacks``
    cudnn_plans = 1
    stack_graphs = "cudnn"
    conv_via = "auto"  # ``use_conv_via``

    def __init__(self, variant: str = "release", width: int = 128, n_landmarks: int = 68, dropout: float = 0.1,
                 local_layers=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        layers = default_local_layers(variant) if local_layers is None else tuple(int(k) for k in local_layers)
        if not layers or any(k < 1 or k % 2 == 0 for k in layers):
            raise ValueError(f"local_layers must be a non-empty sequence of odd kernel sizes, got {local_layers!r}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if n_landmarks < 1:
            raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.variant = variant
        self.width = int(width)
        self.n_landmarks = int(n_landmarks)
        self.dropout = float(dropout)
        self.local_layers = layers

        blocks, cin = [], 1
        for k in layers:
            blocks.append(ConvBlock(cin, width, k, dropout=dropout))
            cin = width
        self.local_features = nn.Sequential(*blocks)
        self.local_out = PointwiseConv(width, n_landmarks)
        self.kernel = KernelConv(KERNEL_OUTPUT_SCALE)
        if variant == "release":
            self.branch = nn.Sequential(PointwiseConv(width, n_landmarks, bias=False), nn.BatchNorm2d(n_landmarks),
                                        nn.ReLU())
            global_in = 2 * n_landmarks
        else:
            self.branch = None
            global_in = n_landmarks
        blocks, cin = [], global_in
        for _ in range(GLOBAL_LAYERS):
            blocks.append(ConvBlock(cin, width, 3, dilation=GLOBAL_DILATION, dropout=dropout))
            cin = width
        self.global_features = nn.Sequential(*blocks)
        self.global_out = PointwiseConv(width, n_landmarks)
        # CNTK's defaults, which the release trained with: Glorot-uniform weights, zero biases (so the outputs start
        # near zero instead of at a random offset that the 45x45 kernel multiplies by its sum of about 207).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict:
        """Plain-JSON arguments that rebuild this network: ``LGCN(**model.config)``."""
        return {"variant": self.variant, "width": self.width, "n_landmarks": self.n_landmarks,
                "dropout": self.dropout, "local_layers": list(self.local_layers)}

    def fuse_epilogues(self, enabled: bool = True, seeded_dropout: bool = False) -> "LGCN":
        """Run every conv block's BN + ReLU + scale + dropout as one ``bn_relu_dropout`` where its kernels run (CUDA
        C++ or Triton on CUDA, C++ on the CPU; without them torch's modules run as before), with a byte keep mask or,
        with `seeded_dropout`, masks the kernels draw from a seed. The weights, buffers and state_dict keys do not
        change. Returns self."""
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.fused_epilogue = bool(enabled)
                module.seeded_dropout = bool(seeded_dropout)
        return self

    def use_conv_stacks(self, enabled: bool = True, cudnn_plans: int = 1, graphs: str = "cudnn") -> "LGCN":
        """In training, run each subnet's conv blocks as ``lgc_fast.ops.conv_stack`` on cuDNN's fused graphs
        (graphs="cudnn") or lgc_fast's Triton kernels ("triton") where those run (``run_blocks``; BatchNorm, ReLU and
        dropout inside the convolutions), else as before. The weights, buffers and state_dict keys do not change;
        dropout draws other masks. cudnn_plans: how many of cuDNN's plans each graph builds and times once (the
        fastest then runs; 1: the first that builds). Returns self."""
        from lgc_fast.ops.conv_stack import check_cudnn_plans

        check_cudnn_plans(cudnn_plans)
        if graphs not in ("cudnn", "triton"):
            raise ValueError(f"graphs must be 'cudnn' or 'triton', not {graphs!r}")
        self.conv_stacks, self.cudnn_plans, self.stack_graphs = bool(enabled), cudnn_plans, graphs
        return self

    def use_conv_via(self, via: str = "auto") -> "LGCN":
        """Which of cuDNN's kernel families runs the conv blocks' convolutions (``lgc_fast.ops.same_conv2d``): "auto"
        (the default: per layer shape and direction the faster, measured on the GPU at its first call; the forward
        kernels on the CPU), "fprop" (the forward kernels, as nn.Conv2d) or "dgrad" (the transposed convolution's).
        The outputs are equal up to rounding order; the weights and state_dict do not change. Returns self."""
        if via not in ("auto",) + CONV_VIAS:
            raise ValueError(f"via must be one of auto, {', '.join(CONV_VIAS)}, not {via!r}")
        self.conv_via = via
        for module in self.modules():
            if isinstance(module, (ConvBlock, FoldedConvBlock)):
                module.conv_via = via
        return self

    def use_planar_heads(self, enabled: bool = True) -> "LGCN":
        """With channels_last activations: whether the 1x1 output convolutions write planar maps (``PointwiseConv``)
        that kernel_conv and the loss read as they are, the global subnet's input then joined channels_last by
        ``channels_last_cat`` (on by default), or whether the maps stay channels_last and those ops change layout
        on every call (as before; kept for the benchmark's comparison). Outputs are equal either way. Returns self."""
        for module in self.modules():
            if isinstance(module, PointwiseConv):
                module.planar_output = bool(enabled)
        return self

    def folded(self) -> "LGCN":
        """An inference copy of the network: every conv block's BatchNorm (running statistics) and 0.1 activation
        scale folded into its convolution (``fold_conv_block``), and the release branch's BatchNorm likewise; dropout
        is gone. It gives this network's eval-mode outputs (to rounding) with two to three fewer passes over each
        block's activations, and is in eval mode, in this network's layout. Its state_dict differs (convolution
        biases, no BatchNorm): save the original, not the copy. This network is left untouched; a folded network
        returns itself."""
        if self.is_folded:
            return self
        copy = LGCN(**self.config).to(device=self.global_out.weight.device, dtype=self.global_out.weight.dtype)
        copy.load_state_dict(self.state_dict())
        copy.use_planar_heads(self.global_out.planar_output)
        for features in (copy.local_features, copy.global_features):
            for i, block in enumerate(features):
                features[i] = fold_conv_block(block.conv, block.bn, block.act_scale)
        if copy.branch is not None:
            conv, bn, _ = copy.branch
            copy.branch = fold_conv_block(conv, bn)
        copy.is_folded = True
        if self._channels_last():
            copy = copy.to(memory_format=torch.channels_last)
        return copy.use_conv_via(self.conv_via).eval()

    def _channels_last(self) -> bool:
        """Whether the network was made channels_last (.to(memory_format=...)), by a filter whose layout tells."""
        return is_channels_last(self.global_features[-1].conv.weight)

    @property
    def receptive_radius(self) -> int:
        """Pixels: an output pixel depends on input pixels at most this far away (Chebyshev distance)."""
        local = sum(k // 2 for k in self.local_layers)
        return local + KERNEL_RADIUS + GLOBAL_LAYERS * GLOBAL_DILATION

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, H, W) grey values in [0, 255] -> (local, omega), both (N, C, H, W).

        local = 0.01 K * O_l (the kernel-convolved local output), omega = local + O_g (the network's output, eq. 2).
        """
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
        h = (x / 128.0 - 1.0) * INPUT_SCALE
        if self._channels_last():
            # A 1-channel image keeps planar strides through .contiguous(memory_format=channels_last) (and the first
            # filter through .to(memory_format=...)); the first convolution then writes a planar map, which the
            # channels_last second layer converts back, and oneDNN's planar kernel was 2x slower here
            # (bench/bench_same_conv2d.py). With channels_last strides its output is channels_last.
            h = channels_last_strided(h)
        feats = run_blocks(self.local_features, h, self.conv_stacks, self.cudnn_plans, self.stack_graphs)
        o_local = self.local_out(feats)
        local = self.kernel(o_local)
        # [K * O_l, K * B], concatenated after the kernel convolutions rather than before: local is then a map of
        # its own, not a channel slice, whose gradient autograd would assemble in a zero map with a strided copy
        # (slice_backward). Planar maps of channels_last features go back to channels_last for the global subnet
        # in one batched transpose each (and their gradients come back planar the same way).
        maps = [local] if self.branch is None else [local, self.kernel(self.branch(feats))]
        if is_channels_last(feats) and o_local.is_contiguous():
            global_in = channels_last_cat(maps, backend=layout_backend(local.device))
        else:
            global_in = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        omega = local + self.global_out(run_blocks(self.global_features, global_in, self.conv_stacks,
                                                   self.cudnn_plans, self.stack_graphs))
        return local, omega


def mirror_averaged_omega(model, images: torch.Tensor) -> torch.Tensor:
    """Test-time mirroring: images (N, 1, H, W) -> omega (N, 68, H, W), the mean of the network's omega for the
    images and for their mirror images, the latter mirrored back and its channels relabelled left <-> right
    (MIRROR_68), so each channel still maps the same landmark. Costs two forward passes; the model needs 68 landmarks.
    """
    n_landmarks = getattr(model, "n_landmarks", len(MIRROR_68))
    if n_landmarks != len(MIRROR_68):
        raise ValueError(f"mirroring needs the {len(MIRROR_68)} iBUG landmarks, the network has {n_landmarks}")
    _, omega = model(images)
    _, mirrored = model(images.flip(-1))
    return (omega + mirrored.flip(-1)[:, torch.tensor(MIRROR_68, device=omega.device)]) / 2
