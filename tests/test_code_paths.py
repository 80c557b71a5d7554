"""The exactness checks on the other code paths a user's machine may take: prefixkit's kernels
off (ONNX Runtime's own GroupQueryAttention and MatMulNBits run the graphs' function bodies),
and the kernels' portable C path forced (what a CPU without AVX-512 runs). Each runs in a
fresh process, since the C library reads PREFIXKIT_KERNEL_PORTABLE once.

fp32 fused graph: greedy and beam search equal Hugging Face `generate` with the prefix as past,
and every row of a mixed batch equals the row alone. int4: every row of a mixed batch equals
the row alone (the quantised graph has no fp32 reference to equal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.reference import hf_generate, kv_of_text
from prefixkit.runtime import make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix

PATHS = {"kernels off": {"PREFIXKIT_KERNELS": "0"}, "portable C path": {"PREFIXKIT_KERNEL_PORTABLE": "1"}}
PROMPTS = ["name : Aromi | Type : coffee shop", "name : The Eagle | area : riverside", "name : Zizzi | Type : pub"]

CHILD = r"""
import json, sys
from prefixkit.runtime import load_prefix
from prefixkit.runtime.generate import Generator
from prefixkit.runtime.session import ExportedBackbone

job = json.loads(sys.argv[1])
out = {}
for name, folder in job["exports"].items():
    exported = ExportedBackbone(folder)
    generator = Generator(exported)
    rows = [(load_prefix(p) if p else None, ids) for p, ids in job["rows"]]
    result = {"own_kernels": exported.own_kernels}
    for beams in (1, 5):
        together = generator.generate(rows, max_new_tokens=12, num_beams=beams, length_penalty=0.8)
        alone = [generator.generate([row], max_new_tokens=12, num_beams=beams, length_penalty=0.8)[0] for row in rows]
        result[str(beams)] = {"together": [g.token_ids for g in together], "alone": [g.token_ids for g in alone]}
    out[name] = result
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("paths")
    exports = {}
    for name, quantize in (("fp32", None), ("int4", "int4")):
        exports[name] = str(root / name)
        export_backbone(str(tiny_llama_dir), root / name, graph="fused", quantize=quantize)
    backbone = load_backbone(tiny_llama_dir)
    tok = backbone.tokenizer
    text_ids = tok("table-to-text: restaurant descriptions from tables").input_ids
    rows, prefixes = [], [None]
    for p in (3, 10):
        key, value = kv_of_text(backbone.model, torch.tensor([text_ids[:p]]))
        prefixes.append(Prefix(key, value, {}))
    for i, (prefix, prompt) in enumerate(zip(prefixes, PROMPTS)):
        path = None
        if prefix is not None:
            path = root / f"p{i}.npz"
            save_prefix(path, Prefix(prefix.key, prefix.value, make_meta(backbone.fingerprint, prefix.prefix_len)))
        rows.append((str(path) if path else None, tok(prompt).input_ids, prefix))
    return backbone, exports, rows


@pytest.mark.parametrize("path", list(PATHS))
def test_exactness_holds_with_the_kernels_off_and_on_their_portable_path(job, path):
    backbone, exports, rows = job
    request = {"exports": exports, "rows": [(p, ids) for p, ids, _ in rows]}
    env = dict(os.environ, **PATHS[path])
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(request)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["fp32"]["own_kernels"] is (path != "kernels off")
    for beams in ("1", "5"):
        for name in ("fp32", "int4"):
            assert got[name][beams]["together"] == got[name][beams]["alone"], (name, beams)
        for (_, ids, prefix), tokens in zip(rows, got["fp32"][beams]["together"]):
            want = hf_generate(backbone.model, prefix, ids, 12, num_beams=int(beams), length_penalty=0.8)
            assert tokens == want, beams
