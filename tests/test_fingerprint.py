"""The backbone fingerprint and architecture numbers, computed identically from a PyTorch
model and from its saved folder, and the prefix format working with real key/values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixkit.exporter import fingerprint_folder, fingerprint_model, load_backbone
from prefixkit.runtime import backbone_fingerprint, load_prefix, make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix
from prefixkit.exporter.reference import kv_of_text, logits_after_prefix
from tolerance import assert_within, model_rtol


def test_model_in_memory_and_its_saved_folder_have_one_fingerprint(tiny_backbone_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_backbone_dir)
    from_folder = fingerprint_folder(tiny_backbone_dir)
    assert fingerprint_model(model) == from_folder
    assert load_backbone(tiny_backbone_dir).fingerprint == from_folder
    assert from_folder.startswith("pkfp1-") and len(from_folder) == 6 + 64


def test_fingerprint_is_of_the_weights_as_stored_not_the_load_dtype(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.float16)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    stored = fingerprint_folder(tmp_path)
    assert stored != fingerprint_folder(tiny_llama_dir)  # rounding to fp16 made another model
    assert load_backbone(tmp_path).fingerprint == stored  # loaded in fp32, same identity
    assert fingerprint_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)) == stored


def test_changing_one_weight_by_one_ulp_changes_the_fingerprint(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = fingerprint_model(model)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))
    assert fingerprint_model(model) != before


def test_changing_the_config_changes_the_fingerprint(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = fingerprint_model(model)
    model.config.rope_theta = 500000.0
    assert fingerprint_model(model) != before


def test_fingerprint_of_fixed_input_never_changes():
    # Pinned on 2026-11-25: every prefix ever trained carries a fingerprint, so the
    # algorithm must not drift between releases. Changing it needs FINGERPRINT_VERSION 2.
    config = {
        "model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "hidden_size": 4, "head_dim": 2, "vocab_size": 3,
        "max_position_embeddings": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    }
    tensors = [("w", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(3, np.float16))]
    assert backbone_fingerprint(config, tensors) == PINNED
    assert backbone_fingerprint(config, tensors[::-1]) == PINNED  # order and names do not matter
    assert backbone_fingerprint(config, [("x", t) for _, t in tensors]) == PINNED


PINNED = "pkfp1-c1267b79ab178d5242fcc2b7ec1548db5d6d6926e0b49912b69ffaf04c7821cf"


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("tiny_gpt2_dir", dict(model_type="gpt2", n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8)),
        ("tiny_llama_dir", dict(model_type="llama", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16)),
    ],
)
def test_architecture_numbers_match_the_cache_pytorch_builds(request, fixture, expected):
    path = request.getfixturevalue(fixture)
    backbone = load_backbone(path)
    arch = backbone.architecture
    assert {k: getattr(arch, k) for k in expected} == expected
    key, value = kv_of_text(backbone.model, torch.tensor([[5, 6, 7]]))
    assert key.shape == value.shape == arch.kv_shape(3)


def test_prefix_saved_from_real_key_values_reproduces_the_full_sequence(tiny_backbone_dir, tmp_path):
    """A prefix made from the model's own key/values of some text, written and read back,
    then fed as past with positions starting at P, gives the logits of text + tokens."""
    backbone = load_backbone(tiny_backbone_dir)
    tok = backbone.tokenizer
    prefix_ids = tok("table-to-text:", return_tensors="pt").input_ids
    ids = tok(" name[Aromi], food[English]", return_tensors="pt").input_ids
    key, value = kv_of_text(backbone.model, prefix_ids)
    meta = make_meta(backbone.fingerprint, key.shape[2], method="init-text")
    path = save_prefix(tmp_path / "p.npz", Prefix(key, value, meta))
    loaded = load_prefix(path, architecture=backbone.architecture, fingerprint=backbone.fingerprint)

    got = logits_after_prefix(backbone.model, loaded.key, loaded.value, ids)
    with torch.no_grad():
        full = backbone.model(torch.cat([prefix_ids, ids], dim=1)).logits[0, prefix_ids.shape[1]:]
    assert_within(got, full, model_rtol(backbone.model.config))
