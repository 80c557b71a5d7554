"""How far two correct fp32 computations of the same network may differ.

Two fp32 runs of one network differ when they sum in another order: another CPU (AVX2 or
AVX-512 vector widths, AMD or Intel), another kernel, another blocking. Each layer's dot
products sum `width` terms, and the rounding of such a sum, summed in an arbitrary order,
is about eps * sqrt(width) of the magnitude (errors of random sign add as a random walk);
across `layers` layers these add. So a comparison takes

    |a - b| <= safety * eps * layers * sqrt(width) * max|b|

with eps = 2**-23 (fp32) and a safety factor of 8 for the growth of activations through the
residual stream and softmax. The bound is relative to the largest value compared, never a
fixed number tuned to the machine the test was written on.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def fp32_rtol(layers: int, width: int, safety: float = 8.0) -> float:
    """The relative tolerance above, for a network of `layers` layers whose widest sums have
    `width` terms."""
    return safety * EPS32 * layers * math.sqrt(width)


def fp32_close(got, want, layers: int, width: int) -> bool:
    """Whether got equals want within fp32_rtol of want's largest magnitude (numpy or torch)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return bool(np.abs(got - want).max() <= fp32_rtol(layers, width) * np.abs(want).max())
