"""How far two correct floating-point computations may differ: the bound that the export's own
parity gate uses (prefixkit/exporter/parity.py, whose module docstring derives it), here for
the tests with a helper that asserts it:

    |got - want| <= rounding_rtol(layers, width) · max|want|,  rounding_rtol = 8 · eps · layers · √width

For a model, layers and width come from its config (model_rtol); one matmul of depth K is
rounding_rtol(1, K). A bound in the tests that is not this one measures something other than
rounding (quantisation moving logits, integer activations) and says so where it stands.
"""

from __future__ import annotations

import numpy as np

from prefixkit.exporter.parity import EPS16, EPS32, SAFETY, network_depth, rounding_rtol

__all__ = ["EPS16", "EPS32", "SAFETY", "assert_within", "model_rtol", "network_depth", "rounding_rtol"]


def model_rtol(config) -> float:
    """rounding_rtol for the network of a Hugging Face config (a PretrainedConfig or its dict)."""
    return rounding_rtol(*network_depth(config if isinstance(config, dict) else config.to_dict()))


def assert_within(got, want, rtol: float, err_msg: str = "") -> None:
    """|got - want| <= rtol · max|want| everywhere (numpy arrays or torch tensors)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max(), err_msg=err_msg)
