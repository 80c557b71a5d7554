"""Does the exported graph compute what PyTorch computes, for prefixes fed as past?

A batch of 3 rows with prefix lengths 0, 1 and 10 mixed, left-padded, run through ONNX
Runtime, against each row alone in PyTorch without padding (prefix as past key values,
positions from P). Three token layouts: 1 new token per row (a decode step), 7 per row (a
prefix prefill), and 7 / 1 / 4 (rows padded to each other). Each row is also run alone
through ONNX Runtime, to show that padding and neighbours do not change a row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prefixkit.runtime.prefix import Prefix, make_meta
from prefixkit.runtime.session import ExportedBackbone

from .reference import kv_of_text, logits_after_prefix

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
    """Max |logit difference| between ONNX Runtime (batched) and PyTorch (row alone),
    relative to the largest |logit|, per layout; with argmax agreement and the largest
    difference between a row in the batch and the same row alone in ONNX Runtime."""
    prefixes: list[Prefix | None] = []
    prefix_ids = _tokens(tokenizer, PREFIX_TEXT, max(PREFIX_LENS))
    for p in PREFIX_LENS:
        if p == 0:
            prefixes.append(None)
            continue
        key, value = kv_of_text(model, torch.tensor([prefix_ids[:p]]))
        prefixes.append(Prefix(key, value, make_meta(exported.manifest.fingerprint, p)))
    input_ids = _tokens(tokenizer, INPUT_TEXT, max(max(t) for t in TOKEN_LAYOUTS.values()))

    cases = {}
    for name, token_lens in TOKEN_LAYOUTS.items():
        rows = [(prefix, input_ids[:t]) for prefix, t in zip(prefixes, token_lens)]
        batch = exported.batch(rows)
        logits = exported.forward(batch)[0].astype(np.float32)
        max_abs = max_logit = batch_vs_solo = 0.0
        argmax_equal = True
        for b, (prefix, ids) in enumerate(rows):
            got = batch.row_logits(logits, b)
            key = None if prefix is None else prefix.key
            value = None if prefix is None else prefix.value
            want = logits_after_prefix(model, key, value, torch.tensor([ids])).numpy()
            max_abs = max(max_abs, float(np.abs(got - want).max()))
            max_logit = max(max_logit, float(np.abs(want).max()))
            argmax_equal &= bool((got.argmax(-1) == want.argmax(-1)).all())
            solo_batch = exported.batch([(prefix, ids)])
            solo = solo_batch.row_logits(exported.forward(solo_batch)[0].astype(np.float32), 0)
            batch_vs_solo = max(batch_vs_solo, float(np.abs(got - solo).max()))
        cases[name] = {
            "max_abs": max_abs,
            "max_logit": max_logit,
            "relative": max_abs / max_logit,
            "argmax_equal": argmax_equal,
            "batch_vs_solo_max_abs": batch_vs_solo,
        }
    return {
        "reference": "PyTorch fp32, each row alone, prefix as past key values",
        "prefix_lens": list(PREFIX_LENS),
        "cases": cases,
        "relative": max(c["relative"] for c in cases.values()),
        "argmax_equal": all(c["argmax_equal"] for c in cases.values()),
    }


def describe(report: dict[str, Any]) -> list[str]:
    """One line per layout, for people."""
    return [
        f"{name}: max |Δlogit| {c['max_abs']:.2e} of max |logit| {c['max_logit']:.1f} "
        f"(relative {c['relative']:.1e}), argmax {'equal' if c['argmax_equal'] else 'DIFFERS'}, "
        f"batched vs alone {c['batch_vs_solo_max_abs']:.1e}"
        for name, c in report["cases"].items()
    ]
