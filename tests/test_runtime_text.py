"""The text level of the runtime and pt-generate: prompt templates and stop strings from a
prefix's meta, clear errors, JSONL out, and all of it without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from prefixkit.exporter import load_backbone
from prefixkit.exporter.reference import kv_of_text
from prefixkit.runtime import Generator, PrefixFileError, make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix
from prefixkit.runtime.session import ExportedBackbone

TABLE = "name : Aromi | Type : coffee shop | food : English"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, tiny_export):
    """The tiny Llama's fused export and a prefix file made from its own key/values, with a
    prompt template in its meta."""
    root = tmp_path_factory.mktemp("text")
    backbone = load_backbone(tiny_llama_dir)
    key, value = kv_of_text(backbone.model, backbone.tokenizer("table-to-text:", return_tensors="pt").input_ids)
    meta = make_meta(backbone.fingerprint, key.shape[2], template="Table: {input}\nText:", stop=[])
    path = save_prefix(root / "user42.npz", Prefix(key, value, meta))
    return backbone, tiny_export[0], path


def test_prompt_template_of_the_prefix_is_applied(setup):
    backbone, export, path = setup
    generator = Generator(ExportedBackbone(export))
    prefix = generator.add_prefix("user42", path)
    [done] = generator.complete([("user42", TABLE)], max_new_tokens=8)
    ids = backbone.tokenizer(f"Table: {TABLE}\nText:").input_ids
    assert done.prompt_tokens == len(ids)
    assert done.token_ids == generator.generate([(prefix, ids)], max_new_tokens=8)[0].token_ids
    assert done.text == backbone.tokenizer.decode(done.token_ids, skip_special_tokens=True)
    assert done.finish_reason == "length" and done.prefix == "user42"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "3 beams"])
def test_stop_string_ends_the_row_and_is_cut_off(setup, num_beams):
    _, export, path = setup
    generator = Generator(ExportedBackbone(export))
    generator.add_prefix("user42", path)
    [free] = generator.complete([("user42", TABLE)], max_new_tokens=16, num_beams=num_beams)
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    assert stop.strip()
    [stopped, other] = generator.complete([("user42", TABLE), (None, TABLE)], max_new_tokens=16, num_beams=num_beams,
                                          stop=(stop,))
    assert stop not in stopped.text and stop not in other.text
    if num_beams == 1:  # the row stops where the stop string begins
        assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
        assert free.text.startswith(stopped.text)
    else:  # hypotheses with the stop string finish; the best may be one that avoided it
        assert stopped.finish_reason in ("stop", "eos", "length")


def test_unknown_prefix_too_long_input_and_foreign_prefix_are_refused(setup, tiny_gpt2_dir, tmp_path):
    backbone, export, path = setup
    generator = Generator(ExportedBackbone(export))
    with pytest.raises(ValueError, match="unknown prefix 'nobody'; loaded: none"):
        generator.complete([("nobody", TABLE)])
    with pytest.raises(ValueError, match=r"the input is \d+ tokens; .* the backbone takes 128"):
        generator.complete([(None, TABLE * 10)], max_new_tokens=8)
    other = load_backbone(tiny_gpt2_dir)
    shape = other.architecture.kv_shape(2)
    foreign = save_prefix(tmp_path / "foreign.npz", Prefix(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                                                            make_meta(other.fingerprint, 2)))
    with pytest.raises(PrefixFileError, match="made for another backbone"):
        generator.add_prefix("foreign", foreign)


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "optimum"):
                raise ImportError(f"{name} is not allowed in the runtime")
    sys.meta_path.insert(0, NoTorch())
    from prefixkit.runtime.cli import main
    main(sys.argv[1:])
""")


def pt_generate(*args, stdin=None):
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_pt_generate_runs_with_torch_unimportable_and_writes_jsonl(setup, tmp_path):
    _, export, path = setup
    proc = pt_generate(export, TABLE, "name : Zizzi", "--prefix", path, "--max-new-tokens", 6, "--num-beams", 2)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["input"], r["prefix"]) for r in records] == [(TABLE, "user42"), ("name : Zizzi", "user42")]
    assert all(len(r["token_ids"]) <= 6 and r["finish_reason"] in ("eos", "length", "stop") for r in records)
    # The same through standard input and as JSON lines naming their own prefix.
    lines = f'{TABLE}\n{{"input": "name : Zizzi", "prefix": null}}\n'
    piped = pt_generate(export, "--prefix", path, "--max-new-tokens", 6, "--num-beams", 2, stdin=lines)
    assert piped.returncode == 0, piped.stderr
    again = [json.loads(line) for line in piped.stdout.splitlines()]
    assert again[0]["token_ids"] == records[0]["token_ids"]
    assert again[1]["prefix"] is None


def test_pt_generate_reports_a_foreign_prefix_in_one_line(setup, tmp_path):
    _, export, _ = setup
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a prefix")
    proc = pt_generate(export, TABLE, "--prefix", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "truncated or not an .npz file" in proc.stderr
