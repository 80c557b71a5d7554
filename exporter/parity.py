"""Does the exported graph compute what PyTorch computes, for prefixes fed as past?

Three rows with prefix lengths 0, 1 and 10, against each row alone in PyTorch without
padding (prefix as past key values, positions from P), with the largest logit difference
relative to the largest logit. Each row is also run alone through ONNX Runtime, to show that
padding and neighbours do not change a row.

Left-padded graphs (optimum) take the rows as one batch, with 1 new token per row (a decode
step), 7 per row (a prefix prefill) and 7 / 1 / 4 (rows padded to each other). Right-padded
graphs (fused GroupQueryAttention) prefill row by row, with 1 and 7 new tokens, then decode
one token for all rows in one right-padded batch from the caches the prefill returned.

How close is close enough: the one bound that the export's gate and the tests use.
Two correct fp32 computations of one network differ when they sum in another order: another
CPU (AMD or Intel, AVX2 or AVX-512 vector widths), another kernel, another blocking, a row
alone or in a batch. A dot product of `width` terms, summed in any order, rounds by about
eps · √width of its magnitude (each addition rounds by up to eps/2 of its partial sum, and
errors of random sign add as a random walk); a network of `layers` layers adds one such error
per layer. So two results a and b may differ by

    |a - b| <= rounding_rtol(layers, width) · max|b|,  rounding_rtol = 8 · eps · layers · √width

with eps = 2**-23 for fp32, `width` the longest sum in a layer (the feed-forward width, or
the hidden size where that is wider: network_depth), and a safety factor of 8 for the growth
of activations through the residual stream and the softmax. The bound is relative to the
largest value compared, never a fixed number tuned to one machine's summation order. One
matmul of depth K is layers 1, width K; values only stored in fp16 between fp32 operations
take eps = 2**-10 and width 1. Quantised weights move results by far more than rounding does;
those bounds measure the quantisation and are not this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from prefixkit.runtime.backbone import Architecture
from prefixkit.runtime.cache import right_padded_step
from prefixkit.runtime.prefix import Prefix, make_meta
from prefixkit.runtime.session import ExportedBackbone

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
EPS16 = float(np.finfo(np.float16).eps)  # 2**-10
SAFETY = 8.0


def rounding_rtol(layers: int, width: int, eps: float = EPS32) -> float:
    """How far two correct computations of a network of `layers` layers whose longest sums
    have `width` terms may differ, relative to the largest value compared (above)."""
    return SAFETY * eps * layers * math.sqrt(width)


def network_depth(config: Mapping[str, Any]) -> tuple[int, int]:
    """(layers, width) of a Hugging Face config dict (`config.to_dict()`) for rounding_rtol:
    every layer an input passes through (encoder and decoder), and the longest sum in one, the
    feed-forward width (GPT-2 without n_inner: 4 × n_embd) or the hidden size if wider."""
    a = Architecture.from_config(config)
    widths = [config.get(k) for k in ("intermediate_size", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff")]
    if a.model_type == "gpt2" and config.get("n_inner") is None:
        widths.append(4 * a.hidden_size)
    return a.n_layers + a.n_encoder_layers, max([a.hidden_size, *(int(w) for w in widths if w)])


def fp32_limit(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parity gate of an fp32 export of the backbone with this config, with what it is made
    of, as the manifest records it: {"relative", "rule", "eps", "safety", "layers", "width"}."""
    layers, width = network_depth(config)
    return {"relative": rounding_rtol(layers, width), "rule": "safety * eps * layers * sqrt(width)",
            "eps": EPS32, "safety": SAFETY, "layers": layers, "width": width}


def fp16_limit(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parity gate of an fp16 export: its operators compute in fp32 (ONNX Runtime's CPU
    casts around fp16 nodes; CUDA's fp16 matmuls and attention accumulate in fp32) and store
    each layer's values in fp16, so the error is fp16's rounding once per stored value (width
    1), per layer, against PyTorch fp32."""
    layers, _ = network_depth(config)
    return {"relative": rounding_rtol(layers, 1, EPS16), "rule": "safety * eps * layers * sqrt(1)",
            "eps": EPS16, "safety": SAFETY, "layers": layers, "width": 1}


PREFIX_LENS = (0, 1, 10)
TOKEN_LAYOUTS = {"1 new token": (1, 1, 1), "7 new tokens": (7, 7, 7), "7/1/4 new tokens": (7, 1, 4)}
PREFIX_TEXT = "table-to-text: name : The Eagle | Type : coffee shop | food : French | area : riverside"
INPUT_TEXT = " name : Aromi | Type : coffee shop | food : English | customer rating : 3 out of 5"


def _tokens(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text).input_ids
    if not ids:
        raise ValueError(f"the backbone's tokenizer makes no tokens of {text!r}; it cannot be checked.")
    while len(ids) < n:  # tiny tokenizers may make few tokens of a short text
        ids = ids + ids
    return ids[:n]


def check_parity(model, tokenizer, exported: ExportedBackbone) -> dict[str, Any]:
    """Max |logit difference| between ONNX Runtime and PyTorch (row alone), relative to the
    largest |logit|, per case; with argmax agreement and the largest difference between a
    row in a batch and the same row alone in ONNX Runtime."""
    import torch  # here, so that the bound above imports without torch (the kernel tests use it)

    from .reference import kv_of_text, logits_after_prefix

    prefixes: list[Prefix | None] = []
    prefix_ids = _tokens(tokenizer, PREFIX_TEXT, max(PREFIX_LENS))
    for p in PREFIX_LENS:
        if p == 0:
            prefixes.append(None)
            continue
        key, value = kv_of_text(model, torch.tensor([prefix_ids[:p]]))
        prefixes.append(Prefix(key, value, make_meta(exported.manifest.fingerprint, p)))
    input_ids = _tokens(tokenizer, INPUT_TEXT, max(max(t) for t in TOKEN_LAYOUTS.values()) + 1)

    def reference(prefix: Prefix | None, ids: list[int]) -> np.ndarray:
        key = None if prefix is None else prefix.key
        value = None if prefix is None else prefix.value
        return logits_after_prefix(model, key, value, torch.tensor([ids])).numpy()

    if exported.manifest.graph.padding == "right":
        cases = _right_padded_cases(exported, prefixes, input_ids, reference)
    else:
        cases = _left_padded_cases(exported, prefixes, input_ids, reference)
    return {
        "reference": "PyTorch fp32, each row alone, prefix as past key values",
        "layout": exported.manifest.graph.padding,
        "prefix_lens": list(PREFIX_LENS),
        "cases": cases,
        "relative": max(c["relative"] for c in cases.values()),
        "argmax_equal": all(c["argmax_equal"] for c in cases.values()),
    }


class _Case:
    """Accumulates one case's comparison over its rows."""

    def __init__(self) -> None:
        self.max_abs = self.max_logit = self.batch_vs_solo = 0.0
        self.argmax_equal = True

    def compare(self, got: np.ndarray, want: np.ndarray, solo: np.ndarray | None = None) -> None:
        """got [T', V] against want [T, V]: the last T' positions (a graph that projects only
        the last position gives T' = 1)."""
        got = got.astype(np.float32)
        want = want[len(want) - len(got):]
        solo = None if solo is None else solo[len(solo) - len(got):]
        self.max_abs = max(self.max_abs, float(np.abs(got - want).max()))
        self.max_logit = max(self.max_logit, float(np.abs(want).max()))
        self.argmax_equal &= bool((got.argmax(-1) == want.argmax(-1)).all())
        if solo is not None:
            self.batch_vs_solo = max(self.batch_vs_solo, float(np.abs(got - solo.astype(np.float32)).max()))

    def report(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "max_logit": self.max_logit,
            "relative": self.max_abs / self.max_logit,
            "argmax_equal": self.argmax_equal,
            "batch_vs_solo_max_abs": self.batch_vs_solo,
        }


def _left_padded_cases(exported, prefixes, input_ids, reference) -> dict[str, Any]:
    cases = {}
    for name, token_lens in TOKEN_LAYOUTS.items():
        rows = [(prefix, input_ids[:t]) for prefix, t in zip(prefixes, token_lens)]
        batch = exported.batch(rows)
        logits = exported.forward(batch)[0]
        case = _Case()
        for b, (prefix, ids) in enumerate(rows):
            case.compare(batch.row_logits(logits, b), reference(prefix, ids), exported.run_alone(prefix, ids)[0])
        cases[name] = case.report()
    return cases


def _right_padded_cases(exported, prefixes, input_ids, reference) -> dict[str, Any]:
    cases, caches = {}, []
    for t in (1, 7):
        case = _Case()
        for prefix in prefixes:
            logits, cache = exported.run_alone(prefix, input_ids[:t])
            case.compare(logits, reference(prefix, input_ids[:t]))
            if t == 7:
                caches.append(cache)
        cases[f"prefill {t} new token{'s' if t > 1 else ''}, row by row"] = case.report()
    # Decode the 8th token of every row in one right-padded batch (cache lengths 7, 8, 17).
    step = right_padded_step(caches, [input_ids[7]] * len(caches))
    logits = exported.forward(step)[0][:, -1]
    case = _Case()
    for b, prefix in enumerate(prefixes):
        solo = exported.forward(right_padded_step([caches[b]], [input_ids[7]]))[0][0, -1]
        case.compare(logits[b][None], reference(prefix, input_ids[:8])[-1:], solo[None])
    cases["decode 1 token, 3 rows right-padded"] = case.report()
    return cases


def describe(report: dict[str, Any]) -> list[str]:
    """One line per layout, for people."""
    return [
        f"{name}: max |Δlogit| {c['max_abs']:.2e} of max |logit| {c['max_logit']:.1f} "
        f"(relative {c['relative']:.1e}), argmax {'equal' if c['argmax_equal'] else 'DIFFERS'}, "
        f"batched vs alone {c['batch_vs_solo_max_abs']:.1e}"
        for name, c in report["cases"].items()
    ]
