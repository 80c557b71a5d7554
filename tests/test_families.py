"""The backbone families people deploy, each as a tiny random model built offline from its
config with the suite's tokenizer: Llama 3 (its rope scaling), Mistral (a sliding window
smaller than the sequences, so the window binds), Qwen2 (qkv bias), Qwen3 (q/k norm) and Phi-3
(fused qkv and gate/up), Gemma 2 (soft-capped attention and logits, made small enough to bind,
and a sliding window) and Gemma 3 (sliding and full layers, each with its own rotary base).

Per family: the export's parity with PyTorch within fp32 rounding (and under 1e-4); greedy and
5-beam outputs in a mixed batch token for token Hugging Face `generate`'s with the same prefix
as past; each row equal to the row alone; PEFT's PrefixTuningConfig, given our key/values, has
the runtime's logits; pt-train's prefix loads against the export and generates.

Initialisation std 0.1 on 64 wide layers spreads the logits over several units, so no
comparison is decided by near-ties."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.reference import hf_generate, kv_of_text
from prefixkit.runtime.generate import Generator
from prefixkit.runtime.manifest import ATTENTION_GQA, ATTENTION_KERNEL
from prefixkit.runtime.prefix import Prefix, load_prefix
from prefixkit.runtime.session import ExportedBackbone
from prefixkit.training.data import load_examples, tables
from prefixkit.training.trainer import TrainSettings, train
from conftest import DATA, _save_tiny
from tolerance import assert_within, model_rtol

PROMPTS = ["name : Aromi | Type : coffee shop | food : English", "name : The Eagle | area : riverside",
           "name : Zizzi | Type : pub | family friendly : yes | near : The Bakers"]
WINDOW = 8  # tokens; the rows run to 40 positions and more
SOFTCAP = 2.0  # Gemma 2's caps (50 on attention, 30 on logits) would not bind on a tiny model


def configs(vocab: int) -> dict:
    import transformers as t

    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=128, max_position_embeddings=128, vocab_size=vocab, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    return {
        # family: (config, graph pt-export's auto choice gives, attention of a fused graph)
        "llama3": (t.LlamaConfig(head_dim=16, rope_scaling=llama3, **common), "optimum", None),
        "mistral": (t.MistralConfig(head_dim=16, sliding_window=WINDOW, **common), "fused", ATTENTION_GQA),
        "qwen2": (t.Qwen2Config(**common), "fused", ATTENTION_KERNEL),
        "qwen3": (t.Qwen3Config(head_dim=16, **common), "fused", ATTENTION_GQA),
        "phi3": (t.Phi3Config(**common), "optimum", None),
        "gemma2": (t.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                  attn_logit_softcapping=SOFTCAP, final_logit_softcapping=SOFTCAP, **common),
                   "traced", None),
        "gemma3_text": (t.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                           layer_types=["sliding_attention", "full_attention"], **common),
                        "traced", None),
    }


FAMILIES = ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
GRAPH_KINDS = {"fused": "genai-gqa", "optimum": "optimum-decoder-with-past", "traced": "prefixkit-traced"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    name = request.param
    config, graph, attention = configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))[name]
    root = tmp_path_factory.mktemp(name)
    source = _save_tiny(config, tokenizer_dir, root / "model")
    manifest = export_backbone(str(source), root / "export")
    backbone = load_backbone(source)
    tok = backbone.tokenizer
    text_ids = tok("table-to-text: restaurant descriptions from tables").input_ids
    prefixes = [None] + [Prefix(*kv_of_text(backbone.model, torch.tensor([text_ids[:p]])), {}) for p in (3, 10)]
    rows = [(prefix, tok(prompt).input_ids) for prefix, prompt in zip(prefixes, PROMPTS)]
    return name, manifest, (graph, attention), backbone, Generator(ExportedBackbone(root / "export")), rows, root


def test_export_takes_the_expected_graph_and_matches_pytorch_within_fp32_rounding(family, capsys):
    name, manifest, (graph, attention), backbone, _, _, root = family
    assert manifest.architecture.model_type == backbone.model.config.model_type
    assert manifest.graph.kind == GRAPH_KINDS[graph], name
    if graph == "fused":  # where prefixkit's attention kernel does not fit, no note calls the export old
        assert manifest.graph.attention == attention
        ExportedBackbone(root / "export")
        assert "exported before" not in capsys.readouterr().err
    assert manifest.parity["relative"] <= min(manifest.parity["limit"], 1e-4)
    assert manifest.parity["argmax_equal"]


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "5 beams"])
def test_mixed_batch_equals_hugging_face_generate_and_each_row_alone(family, num_beams):
    name, _, _, backbone, generator, rows, _ = family
    together = generator.generate(rows, max_new_tokens=10, num_beams=num_beams)
    for (prefix, ids), generation in zip(rows, together):
        assert generation.token_ids == hf_generate(backbone.model, prefix, ids, 10, num_beams=num_beams), name
        alone = generator.generate([(prefix, ids)], max_new_tokens=10, num_beams=num_beams)[0]
        assert generation.token_ids == alone.token_ids, name


def test_peft_prefix_tuning_with_our_key_values_gives_the_runtimes_logits(family):
    from peft import PrefixTuningConfig, get_peft_model

    name, _, _, backbone, generator, rows, root = family
    prefix, ids = rows[2]
    P = prefix.prefix_len
    # PEFT holds a prefix as its embedding [P, L * 2 * H * D]: layer-major, key then value
    flat = np.stack([prefix.key, prefix.value], axis=1).transpose(3, 0, 1, 2, 4).reshape(P, -1)
    peft_model = get_peft_model(load_backbone(root / "model").model,
                                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(flat))
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    ours, _ = generator.exported.run_alone(prefix, ids)
    assert_within(ours[-1], theirs, model_rtol(backbone.model.config), name)


def test_pt_train_learns_a_prefix_the_export_serves(family, tmp_path):
    name, _, _, backbone, generator, _, _ = family
    examples = [group[0] for group in tables(load_examples(DATA / "e2e_sample.csv")).values()][:4]
    settings = dataclasses.replace(TrainSettings(epochs=1, batch_size=2, lr=1e-2, save_every=2),
                                   template="{input}\n", init_text="table-to-text:")
    result = train(backbone, examples, [], tmp_path / "p.npz", settings, progress=False)
    assert result.step == 2 and np.isfinite(result.meta["losses"]["train_last_epoch"])
    manifest = generator.exported.manifest
    prefix = load_prefix(tmp_path / "p.npz", manifest.architecture, manifest.fingerprint)
    generator.prefixes["trained"] = prefix
    completion = generator.complete([("trained", examples[0].input)], max_new_tokens=4)[0]
    assert len(completion.token_ids) >= 1, name


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_gemma_asked_for_a_graph_that_does_not_reproduce_it_is_refused_in_one_sentence(graph, tokenizer_dir,
                                                                                        tmp_path):
    from transformers import AutoTokenizer

    from prefixkit.exporter.onnx_export import ExportError

    config, _, _ = configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["gemma2"]
    source = _save_tiny(config, tokenizer_dir, tmp_path / "model")
    with pytest.raises(ExportError, match=r"neither the fused nor optimum's graph reproduces gemma2 backbones; "
                                          r"they export as prefixkit's traced graph \(--graph auto or traced\)."):
        export_backbone(str(source), tmp_path / "export", graph=graph)
    assert not (tmp_path / "export").exists()


def test_soft_capped_gemma_2_loads_with_the_attention_that_caps(tokenizer_dir, tmp_path):
    """transformers' SDPA path drops the attention cap; the tiny model's cap binds, so the two differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _, _ = configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["gemma2"]
    source = _save_tiny(config, tokenizer_dir, tmp_path / "model")
    backbone = load_backbone(source)
    assert backbone.model.config._attn_implementation == "eager"
    ids = torch.tensor([backbone.tokenizer(PROMPTS[0]).input_ids])
    sdpa = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa").eval()
    with torch.no_grad():
        capped, uncapped = backbone.model(ids).logits, sdpa(ids).logits
    assert (capped - uncapped).abs().max() > 100 * model_rtol(config) * capped.abs().max()


def test_rope_scaling_is_never_given_the_fused_graph(tokenizer_dir, tmp_path):
    """The model builder's graph ignores rope scaling; a quantised export would not catch it."""
    from transformers import AutoTokenizer

    from prefixkit.exporter.onnx_export import ExportError

    config, _, _ = configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["llama3"]
    source = _save_tiny(config, tokenizer_dir, tmp_path / "model")
    with pytest.raises(ExportError, match="without rope scaling; this is llama with head_dim 16 and rope scaling"):
        export_backbone(str(source), tmp_path / "fused", graph="fused")
    assert export_backbone(str(source), tmp_path / "int4", quantize="int4").graph.kind == GRAPH_KINDS["optimum"]
