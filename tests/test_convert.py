"""pt-convert: a PEFT prefix-tuning adapter, with PEFT's reparametrising MLP or without it (P-tuning
v2's deep prompts, as PEFT holds them), becomes a prefix file that the runtime generates with
exactly as PEFT's own `generate` does with the adapter, greedy and with beams."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.runtime.generate import Generator
from prefixkit.runtime.prefix import load_prefix
from prefixkit.runtime.session import ExportedBackbone
from prefixkit.training.convert import ConvertError, convert_peft

BIN = Path(sys.executable).parent
PROMPTS = ["name : Aromi | Type : coffee shop | food : English", "name : The Eagle | area : riverside"]


@pytest.fixture(scope="module", params=[True, False], ids=["prefix tuning", "p-tuning v2"])
def adapter(request, tiny_llama_dir, tmp_path_factory):
    """A PEFT prefix-tuning adapter for the tiny Llama as PEFT initialises and saves one: 6
    virtual tokens through its MLP (prefix_projection, saved as the MLP's output), or the
    key/values themselves (P-tuning v2)."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(3)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=request.param,
                                encoder_hidden_size=32)
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    get_peft_model(load_backbone(tiny_llama_dir).model, config).save_pretrained(folder)
    return folder


def peft_generate(model, tokenizer, ids: list[int], max_new_tokens: int, num_beams: int) -> list[int]:
    """PEFT's generate with the adapter, cut after the first eos (as the runtime stops)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, num_beams=num_beams,
                             pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else eos
    first = min((out.index(e) for e in eos if e in out), default=None)
    return out if first is None else out[: first + 1]


def test_a_converted_adapter_generates_token_for_token_as_peft_does(adapter, tiny_llama_dir, tiny_export, tmp_path):
    from peft import PeftModel

    out = tmp_path / "user42.npz"
    done = subprocess.run([str(BIN / "pt-convert"), str(adapter), "-o", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    backbone = load_backbone(tiny_llama_dir)
    prefix = load_prefix(out, backbone.architecture, backbone.fingerprint)
    assert prefix.prefix_len == 6 and prefix.meta["converted_from"]["peft_type"] == "PREFIX_TUNING"
    theirs = PeftModel.from_pretrained(load_backbone(tiny_llama_dir).model, str(adapter)).eval()
    generator = Generator(ExportedBackbone(tiny_export[0]))
    rows = [(prefix, backbone.tokenizer(p).input_ids) for p in PROMPTS]
    for num_beams in (1, 4):
        got = generator.generate(rows, max_new_tokens=12, num_beams=num_beams)
        for (_, ids), generation in zip(rows, got):
            assert generation.token_ids == peft_generate(theirs, backbone.tokenizer, ids, 12, num_beams)
        bare = generator.generate([(None, ids) for _, ids in rows], max_new_tokens=12, num_beams=num_beams)
        assert [g.token_ids for g in bare] != [g.token_ids for g in got]  # the prefix steers: not a vacuous match


def test_other_adapters_and_other_backbones_are_refused_in_one_sentence(adapter, tiny_gpt2_dir, tiny_llama_dir,
                                                                         tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = tmp_path / "lora"
    get_peft_model(load_backbone(tiny_llama_dir).model, LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
    with pytest.raises(ConvertError, match="is a LORA adapter; pt-convert takes PEFT prefix tuning"):
        convert_peft(lora, tmp_path / "x.npz")
    with pytest.raises(ConvertError, match=r"the adapter's key/values are \[2, 2, 6, 16\] .* takes \[layers 2, "
                                           r"KV heads 4, positions 6, head size 8\]"):
        convert_peft(adapter, tmp_path / "y.npz", backbone=str(tiny_gpt2_dir))
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()
