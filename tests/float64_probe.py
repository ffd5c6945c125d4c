"""A Triton kernel that tells whether the interpreter computes in float64 (tests/conftest.py asks it)."""
import triton
import triton.language as tl


@triton.jit
def dot_and_gain(a_ptr, dot_ptr, scaled_ptr, gain: tl.float64, BLOCK: tl.constexpr):
    """dot = a @ a and scaled = a * gain for one (BLOCK, BLOCK) float64 matrix a."""
    offs = tl.arange(0, BLOCK)
    offs_2d = offs[:, None] * BLOCK + offs[None, :]
    a = tl.load(a_ptr + offs_2d)
    tl.store(dot_ptr + offs_2d, tl.dot(a, a))
    tl.store(scaled_ptr + offs_2d, a * gain)
