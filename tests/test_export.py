"""pt-export on the tiny backbones: the graph takes prefixes as past on the first call, in
mixed, left-padded batches, and matches PyTorch within fp32 rounding (tests/tolerance.py);
quantised graphs stay within the tolerance measured for them; the folder is written once,
completely, or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.exporter import onnx_export
from prefixkit.exporter.onnx_export import ExportError, export_backbone
from prefixkit.exporter.parity import check_parity
from prefixkit.runtime import load_prefix, make_meta, save_prefix
from prefixkit.runtime.manifest import ManifestError, load_manifest
from prefixkit.runtime.prefix import Prefix
from prefixkit.runtime.cache import left_padded_batch, right_padded_step
from prefixkit.runtime.session import ExportedBackbone
from tolerance import EPS16, assert_within, model_rtol, network_depth, rounding_rtol

# Max |Δlogit| / max |logit| of a quantised export against PyTorch fp32: quantisation error, not
# rounding, as measured on these tiny random models (both graphs): int8 5e-3 to 9e-3; int4 0.04 to
# 0.12 (random weights sit on no grid, so quantising moves them, and their logits are small). The
# limits leave room for kernel differences. fp32 exports are held to fp32 rounding instead.
QUANTISED = {"int8": 3e-2, "int4": 0.25}


def tolerance(backbone, quantize: str | None) -> float:
    """Max |Δlogit| / max |logit| against PyTorch for an export of `backbone`."""
    return QUANTISED[quantize] if quantize else model_rtol(backbone.model.config)


def batch_vs_solo(case: dict) -> float:
    """A row's logits in a padded batch against the same row alone, both in ONNX Runtime with the
    same weights, relative to the largest logit: rounding only, quantised or not."""
    return case["batch_vs_solo_max_abs"] / case["max_logit"]


GRAPHS = [("gpt2", "optimum"), ("llama", "optimum"), ("llama", "fused")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir):
    """Every tiny backbone exported through each graph that takes it, at every precision,
    once for the module. Keys: (backbone, quantize, graph)."""
    root = tmp_path_factory.mktemp("exports")
    paths = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}
    made = {}
    for name, graph in GRAPHS:
        for quantize in (None, "int8", "int4"):
            out = root / f"{name}-{graph}-{quantize or 'fp32'}"
            export_backbone(str(paths[name]), out, quantize=quantize, graph=graph)
            made[name, quantize, graph] = out
    return made


def test_batch_layout_puts_each_row_after_its_own_prefix():
    # Hand-worked: rows with prefix lengths 0, 1, 2 and 3, 1, 2 tokens; P = 2, T = 3.
    def prefix(p):
        return Prefix(np.full((1, 1, p, 1), p, np.float32), np.full((1, 1, p, 1), -p, np.float32), {})

    batch = left_padded_batch([(None, [7, 8, 9]), (prefix(1), [5]), (prefix(2), [3, 4])], 1, 1, 1, pad_token_id=0)
    np.testing.assert_array_equal(batch.input_ids, [[7, 8, 9], [0, 0, 5], [0, 3, 4]])
    np.testing.assert_array_equal(batch.attention_mask, [[0, 0, 1, 1, 1], [0, 1, 0, 0, 1], [1, 1, 0, 1, 1]])
    # Real tokens count from the row's own prefix length; padded slots get a harmless 1.
    np.testing.assert_array_equal(batch.position_ids, [[0, 1, 2], [1, 1, 1], [1, 2, 3]])
    np.testing.assert_array_equal(batch.past_key[0, :, 0, :, 0], [[0, 0], [0, 1], [2, 2]])
    np.testing.assert_array_equal(batch.past_value[0, :, 0, :, 0], [[0, 0], [0, -1], [-2, -2]])


@pytest.mark.parametrize("quantize", [None, "int8", "int4"], ids=["fp32", "int8", "int4"])
@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_mixed_prefixes_match_pytorch_in_the_layout_each_graph_needs(exports, request, name, graph, quantize):
    backbone = load_backbone(request.getfixturevalue(f"tiny_{name}_dir"))
    exported = ExportedBackbone(exports[name, quantize, graph])
    report = check_parity(backbone.model, backbone.tokenizer, exported)
    assert report["prefix_lens"] == [0, 1, 10]
    if graph == "optimum":  # one left-padded batch of all three rows
        assert report["layout"] == "left"
        assert set(report["cases"]) == {"1 new token", "7 new tokens", "7/1/4 new tokens"}
    else:  # prefill row by row, then one right-padded decode step for all rows
        assert report["layout"] == "right"
        assert set(report["cases"]) == {
            "prefill 1 new token, row by row", "prefill 7 new tokens, row by row", "decode 1 token, 3 rows right-padded",
        }
    for case in report["cases"].values():
        assert case["relative"] < tolerance(backbone, quantize), case
        assert batch_vs_solo(case) < model_rtol(backbone.model.config), case
    if quantize is None:
        assert report["argmax_equal"]


@pytest.mark.parametrize("quantize", [None, "int4"], ids=["fp32", "int4"])
@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_logits_come_from_the_last_position_only(exports, request, name, graph, quantize):
    """Generation reads a forward pass's logits at its last position, so the export projects
    only that position onto the vocabulary: [B, 1, V], PyTorch's last-position logits."""
    from prefixkit.exporter.reference import logits_after_prefix

    backbone = load_backbone(request.getfixturevalue(f"tiny_{name}_dir"))
    exported = ExportedBackbone(exports[name, quantize, graph])
    assert exported.manifest.graph.logits == "last"
    ids = backbone.tokenizer("name : The Eagle | area : riverside").input_ids[:7]
    logits, (key, _) = exported.run_alone(None, ids)
    assert logits.shape == (1, backbone.model.config.vocab_size) and key.shape[2] == len(ids)
    want = logits_after_prefix(backbone.model, None, None, torch.tensor([ids])).numpy()[-1]
    assert np.abs(logits[0] - want).max() / np.abs(want).max() < tolerance(backbone, quantize)
    batch = exported.batch([(None, ids), (None, ids[:3])])
    assert exported.forward(batch)[0].shape[:2] == (2, 1)


def test_auto_picks_the_fused_graph_for_llama_and_optimum_for_gpt2(exports, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    fused = export_backbone(str(tiny_llama_dir), tmp_path / "llama")
    assert (fused.graph.kind, fused.graph.padding) == ("genai-gqa", "right")
    assert "position_ids" not in fused.graph.inputs  # positions come from the mask's count
    model = onnx.load(str(tmp_path / "llama" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    # GroupQueryAttention as prefixkit.Attention, whose function body it is
    assert {"Attention", "SkipSimplifiedLayerNormalization"} <= ops and "GroupQueryAttention" not in ops
    assert [n.op_type for f in model.functions if f.name == "Attention" for n in f.node] == ["GroupQueryAttention"]
    assert fused.graph.attention == "prefixkit.Attention" and fused.optimization["own_kernels"] is True
    plain = export_backbone(str(tiny_gpt2_dir), tmp_path / "gpt2")
    assert (plain.graph.kind, plain.graph.padding) == ("optimum-decoder-with-past", "left")
    with pytest.raises(ExportError, match="the fused graph is built for llama, mistral, qwen2, qwen3 backbones .* use --graph optimum"):
        export_backbone(str(tiny_gpt2_dir), tmp_path / "gpt2-fused", graph="fused")


def test_exported_graph_continues_decoding_from_its_own_cache(exports, tiny_llama_dir):
    """Prefill with a prefix, then feed the returned cache back for one more token: the
    logits equal PyTorch's on prefix + all tokens."""
    from prefixkit.exporter.reference import kv_of_text, logits_after_prefix

    backbone = load_backbone(tiny_llama_dir)
    exported = ExportedBackbone(exports["llama", None, "optimum"])
    key, value = kv_of_text(backbone.model, torch.tensor([[11, 12, 13, 14]]))
    prefix = Prefix(key, value, {})
    first = exported.batch([(None, [20, 21]), (prefix, [30, 31, 32])])
    _, keys, values = exported.forward(first)
    mask = np.concatenate([first.attention_mask, np.ones((2, 1), np.int64)], axis=1)
    from prefixkit.runtime.cache import BatchInputs, positions_from_mask

    step = BatchInputs(
        input_ids=np.array([[22], [33]]), attention_mask=mask, position_ids=positions_from_mask(mask, 1),
        past_key=keys, past_value=values, prefix_lens=first.prefix_lens, token_lens=np.array([1, 1]),
    )
    logits = exported.forward(step)[0][:, -1]
    want0 = logits_after_prefix(backbone.model, None, None, torch.tensor([[20, 21, 22]]))[-1]
    want1 = logits_after_prefix(backbone.model, key, value, torch.tensor([[30, 31, 32, 33]]))[-1]
    assert_within(logits[0], want0, model_rtol(backbone.model.config))
    assert_within(logits[1], want1, model_rtol(backbone.model.config))


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_manifest_records_backbone_graph_and_what_was_done(exports, request, name, graph):
    backbone = load_backbone(request.getfixturevalue(f"tiny_{name}_dir"))
    folder = exports[name, "int4", graph]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    manifest = load_manifest(folder)
    assert manifest.graph.weights_beside  # the weights beside the graph, which ONNX Runtime maps in place
    assert manifest.source["model_bytes"] == sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert manifest.fingerprint == backbone.fingerprint
    assert manifest.architecture == backbone.architecture
    assert manifest.source["settings"]["graph"] == graph
    needed = {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"}
    if graph == "optimum":
        needed.add("position_ids")
    assert needed <= set(manifest.graph.inputs)
    assert manifest.eos_token_ids == [2] and manifest.dtype == "float32"
    q = manifest.quantization
    assert q["method"] == "int4" and q["bits"] == 4 and q["block_size"] == 32 and q["lm_head_bits"] == 8
    assert q["lm_head_quantized"] and q["float_matmuls_left"] == 0
    assert q["lm_head_untied"] == (name == "gpt2")  # GPT-2 ties its output projection
    assert manifest.optimization["offline"] is True
    assert manifest.parity["relative"] < QUANTISED["int4"] and manifest.parity["limit"] is None  # not enforced
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    # prefixkit's kernel for the 4-bit layers, kept through the offline optimisation; the random
    # output projection is off every symmetric grid, so it stays 8-bit MatMulNBits with offsets
    assert {"MatMulQ4", "MatMulNBits"} <= ops and "Gemm" not in ops
    # prefixkit's attention in the fused graph's place of GroupQueryAttention, one per layer
    fused = graph == "fused"
    assert q["attention_nodes"] == (backbone.architecture.n_layers if fused else 0)
    assert ("Attention" in ops) == fused and "GroupQueryAttention" not in ops
    assert q["kernel_nodes"] > 0 and manifest.optimization["own_kernels"] is True


@pytest.mark.parametrize("quantize", ["int4-a16", "int4-a8"])
def test_integer_activation_exports_round_them_in_the_kernel_only(exports, tiny_llama_dir, tmp_path, monkeypatch,
                                                                   capsys, quantize):
    """int4-a16 / int4-a8: the same weights as int4, every prefixkit matmul node marked to round
    its activations; logits move from int4's by the rounding (measured on this model: 4e-5 of
    the largest at 16 bits, 4e-3 at 8), a row stays the same alone and in a batch, and a
    session without the kernels runs int4's graph exactly (and says so)."""
    width = int(quantize.split("-a")[1])
    manifest = export_backbone(str(tiny_llama_dir), tmp_path / quantize, quantize=quantize)
    q = manifest.quantization
    assert q["method"] == quantize and q["bits"] == 4 and q["activations"] == f"int{width}"
    matmuls = [n for n in onnx.load(str(tmp_path / quantize / "model.onnx")).graph.node
               if n.op_type in ("MatMulQ4", "MatMulQ8")]
    assert len(matmuls) == q["kernel_nodes"] - q["attention_nodes"] > 0
    assert all([(a.name, a.i) for a in n.attribute if a.name == "activations"] == [("activations", width)]
               for n in matmuls)
    rtol = model_rtol(load_backbone(tiny_llama_dir).model.config)
    for case in manifest.parity["cases"].values():
        assert batch_vs_solo(case) < rtol, case
    ids = [5, 17, 3, 40, 8, 22, 9]
    plain = ExportedBackbone(exports["llama", "int4", "fused"]).run_alone(None, ids)[0]
    got = ExportedBackbone(tmp_path / quantize).run_alone(None, ids)[0]
    moved = np.abs(got - plain).max() / np.abs(plain).max()
    # further than fp32 summation order could move them; the upper ends measure the quantisation
    assert (rtol < moved < 1e-3) if width == 16 else (1e-3 < moved < 0.1), moved
    capsys.readouterr()
    monkeypatch.setenv("PREFIXKIT_KERNELS", "0")
    without = ExportedBackbone(tmp_path / quantize)
    assert f"rounds activations to int{width}" in capsys.readouterr().err
    np.testing.assert_array_equal(without.run_alone(None, ids)[0],
                                  ExportedBackbone(exports["llama", "int4", "fused"]).run_alone(None, ids)[0])


def test_where_the_kernels_cannot_be_built_an_int4_export_keeps_their_operators(tiny_llama_dir, tmp_path, monkeypatch):
    """The export is not optimised offline (that would inline the fallback bodies for good), so
    a machine that has the kernels still runs them on it."""
    from prefixkit.runtime import kernels

    monkeypatch.setattr(kernels, "library", lambda: None)
    manifest = export_backbone(str(tiny_llama_dir), tmp_path / "int4", quantize="int4")
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    assert manifest.optimization["offline"] is False and "cannot be built" in manifest.optimization["skipped"]
    assert "MatMulQ4" in {n.op_type for n in model.graph.node} and {f.name for f in model.functions} >= {"MatMulQ4"}
    assert manifest.parity["relative"] < QUANTISED["int4"]  # checked on the fallback bodies
    monkeypatch.undo()
    assert ExportedBackbone(tmp_path / "int4").own_kernels


def test_a_prefix_trained_on_the_backbone_validates_against_its_export(exports, tiny_llama_dir, tmp_path):
    backbone = load_backbone(tiny_llama_dir)
    manifest = load_manifest(exports["llama", None, "fused"])
    shape = backbone.architecture.kv_shape(4)
    prefix = Prefix(np.zeros(shape, np.float32), np.zeros(shape, np.float32), make_meta(backbone.fingerprint, 4))
    path = save_prefix(tmp_path / "user42.npz", prefix)
    assert load_prefix(path, architecture=manifest.architecture, fingerprint=manifest.fingerprint).prefix_len == 4
    other = load_manifest(exports["gpt2", None, "optimum"])
    with pytest.raises(ValueError, match="the prefix was made for another backbone"):
        load_prefix(path, architecture=other.architecture, fingerprint=other.fingerprint)


def test_exporting_again_does_nothing_and_force_redoes_it(exports, tiny_gpt2_dir, monkeypatch):
    folder = exports["gpt2", None, "optimum"]
    before = (folder / "model.onnx").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "_export_into", must_not_run)
    assert export_backbone(str(tiny_gpt2_dir), folder).fingerprint == load_manifest(folder).fingerprint
    assert (folder / "model.onnx").stat().st_mtime_ns == before
    with pytest.raises(ExportError, match="already holds another export .*--force"):
        export_backbone(str(tiny_gpt2_dir), folder, quantize="int8")
    monkeypatch.undo()
    export_backbone(str(tiny_gpt2_dir), folder, force=True)
    assert (folder / "model.onnx").stat().st_mtime_ns != before
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_failed_parity_check_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    from prefixkit.exporter import parity

    real = parity.check_parity

    def broken(*args, **kwargs):
        report = real(*args, **kwargs)
        report["relative"] = 0.5
        return report

    monkeypatch.setattr(parity, "check_parity", broken)
    # the limit is fp32 rounding for the tiny Llama's 2 layers, whose longest sums have 64 terms
    with pytest.raises(ExportError, match=f"differ from PyTorch by 5.0e-01 .* above the {rounding_rtol(2, 64):.1e} "
                                          "an export of 2 layers, 64 wide, rounding with eps 1.2e-07, must meet; "
                                          "nothing was written"):
        export_backbone(str(tiny_llama_dir), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_unsupported_architecture_is_named_with_the_supported_ones(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                           vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "neox")
    with pytest.raises(ExportError, match="'gpt_neox' backbones cannot be exported yet; supported: gpt2, llama"):
        export_backbone(str(tmp_path / "neox"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_an_export_is_refused_by_the_runtime(tmp_path, exports):
    with pytest.raises(ManifestError, match="not an exported backbone .*pt-export"):
        ExportedBackbone(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((exports["llama", None, "fused"] / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(data | {"format": 9}))
    with pytest.raises(ManifestError, match="manifest format 9"):
        load_manifest(copy)
    import shutil

    shutil.rmtree(copy)
    shutil.copytree(exports["llama", None, "fused"], copy)
    (copy / "model.onnx.data").unlink()
    with pytest.raises(ManifestError, match="model.onnx.data is missing; export the backbone again"):
        ExportedBackbone(copy)


def test_a_format_1_manifest_reads_with_that_format_s_values_and_a_format_2_one_needs_its_fields(tmp_path, exports):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exports["llama", None, "fused"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    assert data["format"] == 2 and "prefill" not in data["graph"]
    old_graph = {k: v for k, v in data["graph"].items() if k not in ("logits", "attention", "weights_beside")}
    (copy / "manifest.json").write_text(json.dumps(data | {"format": 1, "graph": old_graph | {"prefill": "per-row"}}))
    graph = load_manifest(copy).graph
    assert (graph.logits, graph.attention, graph.weights_beside) == ("all", "", False)
    (copy / "manifest.json").write_text(json.dumps(data | {"graph": {k: v for k, v in data["graph"].items()
                                                                      if k != "logits"}}))
    with pytest.raises(ManifestError, match="incomplete manifest .*graph.logits"):
        load_manifest(copy)


def test_cli_exports_and_reports_a_bad_backbone_in_one_line(tiny_llama_dir, tmp_path):
    cli = [sys.executable, "-m", "prefixkit.exporter.cli"]
    ok = subprocess.run(cli + [str(tiny_llama_dir), "--output", str(tmp_path / "e"), "--quantize", "int8"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"{tmp_path / 'e'}" in ok.stdout and "parity" in ok.stdout
    assert "checking parity with PyTorch" in ok.stderr
    bad = subprocess.run(cli + ["no-such-model"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "'no-such-model' is not a known backbone name" in bad.stderr


def test_model_of_another_export_under_a_manifest_is_caught(exports, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(exports["llama", None, "fused"], mixed)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(exports["gpt2", None, "optimum"] / name, mixed / name)
    with pytest.raises(ManifestError, match="model.onnx belongs to backbone .* the folder was mixed up"):
        ExportedBackbone(mixed)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fp16_export_runs_here_and_stays_within_half_precision(request, name, tmp_path):
    """The CPU computes fp16 graphs' operators in fp32 and stores their values in fp16: rounding
    with fp16's eps, once per stored value (width 1), per layer."""
    path = request.getfixturevalue(f"tiny_{name}_dir")
    manifest = export_backbone(str(path), tmp_path / "fp16", dtype="fp16")
    assert manifest.dtype == "float16" and manifest.optimization == {"offline": False}
    exported = ExportedBackbone(tmp_path / "fp16")
    backbone = load_backbone(path)
    report = check_parity(backbone.model, backbone.tokenizer, exported)
    rtol = rounding_rtol(network_depth(backbone.model.config.to_dict())[0], 1, eps=EPS16)
    for case in report["cases"].values():
        assert case["relative"] < rtol, case
        assert batch_vs_solo(case) < rtol, case


def test_auto_falls_back_to_optimum_when_the_fused_graph_cannot_be_built(tiny_llama_dir, tmp_path, monkeypatch):
    def builder_fails(hf_folder, out):
        raise ExportError("ONNX Runtime GenAI's model builder failed (simulated)")

    monkeypatch.setattr(onnx_export, "_build_fused", builder_fails)
    manifest = export_backbone(str(tiny_llama_dir), tmp_path / "out")
    assert manifest.graph.kind == "optimum-decoder-with-past"
    assert manifest.source["settings"]["graph"] == "auto"
    # gated by fp32 rounding for the tiny Llama's 2 layers, whose longest sums have 64 terms
    assert manifest.parity["relative"] < manifest.parity["limit"] == rounding_rtol(2, 64)
    assert {k: manifest.parity["limit_from"][k] for k in ("layers", "width")} == {"layers": 2, "width": 64}
    monkeypatch.setattr(onnx_export, "_export_into", None)  # the same request again: nothing to do
    assert export_backbone(str(tiny_llama_dir), tmp_path / "out").graph.kind == "optimum-decoder-with-past"
    monkeypatch.undo()
    monkeypatch.setattr(onnx_export, "_build_fused", builder_fails)
    with pytest.raises(ExportError, match="simulated"):  # asked for by name: no fallback
        export_backbone(str(tiny_llama_dir), tmp_path / "named", graph="fused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_fused_fp32_graph_runs_prefixkits_attention_as_groupqueryattention_does(exports, tiny_llama_dir,
                                                                                     monkeypatch):
    """Where the library is registered the kernel computes the fp32 graph's attention; without it
    ONNX Runtime runs the operator's body, GroupQueryAttention: the logits of a prefill and of a
    right-padded decode step differ, but by no more than fp32 rounding (the attention alone:
    test_attention_kernel.py), and a row is the same alone and in a batch."""
    rtol = model_rtol(load_backbone(tiny_llama_dir).model.config)
    folder = exports["llama", None, "fused"]
    mine = ExportedBackbone(folder)
    monkeypatch.setenv("PREFIXKIT_KERNELS", "0")
    theirs = ExportedBackbone(folder)
    assert mine.own_kernels and not theirs.own_kernels
    ids = [5, 17, 3, 40, 8, 22, 9]
    got, cache = mine.run_alone(None, ids)
    want, _ = theirs.run_alone(None, ids)
    assert 0 < np.abs(got - want).max() / np.abs(want).max() < rtol
    short, short_cache = mine.run_alone(None, ids[:3])
    step = right_padded_step([cache, short_cache], [11, 12])
    got = mine.forward(step)[0]
    want = theirs.forward(step)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < rtol
    alone = mine.forward(right_padded_step([short_cache], [12]))[0]
    np.testing.assert_array_equal(got[1], alone[0])


def test_an_int4_export_made_before_the_kernels_says_how_to_get_them(exports, tmp_path, capsys):
    """Its manifest has no quantization.kernel_nodes (or, from before prefixkit.Attention, no
    attention_nodes): it runs on ONNX Runtime's kernels, and the user is told on each load that
    pt-export --force remakes it; a current export says nothing."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exports["llama", "int4", "fused"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["quantization"]["kernel_nodes"], manifest["graph"]["attention"]  # neither existed then
    manifest["format"] = 1  # a manifest without graph.attention is format 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert not ExportedBackbone(old).own_kernels
    err = capsys.readouterr().err
    assert "exported before prefixkit's own CPU kernel for its matmuls" in err and "pt-export --force" in err
    del manifest["quantization"]["attention_nodes"]
    manifest["quantization"]["kernel_nodes"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    ExportedBackbone(old)
    assert "own CPU kernel for its attention" in capsys.readouterr().err
    assert ExportedBackbone(exports["llama", "int4", "fused"]).own_kernels
    assert "pt-export --force" not in capsys.readouterr().err
    # an fp32 fused export from before prefixkit.Attention: GroupQueryAttention in the graph
    fp32 = tmp_path / "fp32"
    shutil.copytree(exports["llama", None, "fused"], fp32)
    manifest = json.loads((fp32 / "manifest.json").read_text())
    del manifest["graph"]["attention"]
    manifest["format"] = 1
    (fp32 / "manifest.json").write_text(json.dumps(manifest))
    assert not ExportedBackbone(fp32).own_kernels
    assert "own CPU kernel for its attention" in capsys.readouterr().err
    assert ExportedBackbone(exports["llama", None, "fused"]).own_kernels
    assert ExportedBackbone(exports["llama", None, "optimum"]).own_kernels is False
    assert "pt-export --force" not in capsys.readouterr().err
