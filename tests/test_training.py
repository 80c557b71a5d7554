"""pt-train on the tiny backbones: only the prefix learns, the backbone stays bit-for-bit frozen,
a saved prefix means the same thing to PyTorch, PEFT and the runtime, and interrupted runs
resume to the same result."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA
from prefixkit.exporter.backbones import load_backbone
from prefixkit.exporter.reference import kv_of_text, logits_after_prefix
from prefixkit.runtime import load_prefix
from prefixkit.training.data import load_examples, tables
from prefixkit.training.trainer import TrainingError, TrainSettings, build_model, collate, tokenise, train
from tolerance import assert_within, model_rtol, rounding_rtol

BIN = Path(sys.executable).parent


def distinct_examples(n: int = 8):
    """n examples with n different inputs (one reference per E2E table), so memorising them is
    possible at all: references of one table share an input and cannot all be predicted."""
    return [group[0] for group in tables(load_examples(DATA / "e2e_sample.csv")).values()][:n]


def fast(**overrides) -> TrainSettings:
    return dataclasses.replace(TrainSettings(epochs=2, batch_size=4, lr=1e-2, save_every=2), **overrides)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_training_changes_only_the_prefix_and_leaves_every_backbone_weight_bit_identical(
        tiny_backbone_dir, tmp_path, method):
    backbone = load_backbone(tiny_backbone_dir)
    before = snapshot(backbone.model)
    model = build_model(backbone, fast(method=method))
    rows, _ = tokenise(backbone, distinct_examples(4), "{input}\n", 100)
    nll, count = model(**collate(rows, pad_id=2))
    (nll / count).backward()
    trainable = dict(model.trainable.named_parameters())
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.backbone.parameters())

    backbone = load_backbone(tiny_backbone_dir)
    result = train(backbone, distinct_examples(), distinct_examples()[:2], tmp_path / "p.npz",
                   fast(method=method), progress=False)
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    start = build_model(load_backbone(tiny_backbone_dir), fast(method=method)).prefix_arrays()
    assert not np.allclose(start[0], result.prefix.key)  # ... while the prefix did move


@pytest.mark.parametrize("backbone_dir", ["wide_llama_dir", "wide_gpt2_dir"])
def test_prefix_memorises_eight_examples_to_near_zero_loss(request, tmp_path, backbone_dir):
    backbone = load_backbone(request.getfixturevalue(backbone_dir))
    examples = distinct_examples(8)
    result = train(backbone, examples, examples, tmp_path / "p.npz",
                   TrainSettings(epochs=100, batch_size=8, lr=3e-3, warmup_ratio=0.05, patience=100),
                   progress=False)
    losses = [r["dev_loss"] for r in result.history]
    assert losses[0] > 5.0  # nats per output token: the random model knows nothing of them
    assert min(losses) < 0.05, losses[::10]


def first_rows(backbone, n):
    rows, _ = tokenise(backbone, distinct_examples(n), "{input}\n", 100)
    return collate(rows, pad_id=2)


def test_saved_prefix_reloaded_gives_the_in_memory_logits(tiny_backbone_dir, tmp_path):
    backbone = load_backbone(tiny_backbone_dir)
    result = train(backbone, distinct_examples(), [], tmp_path / "p.npz", fast(), progress=False)
    batch = first_rows(backbone, 1)
    with torch.no_grad():
        in_memory = result.model.logits(batch["input_ids"], batch["attention_mask"])[0]
    loaded = load_prefix(tmp_path / "p.npz", backbone.architecture, backbone.fingerprint)
    reference = logits_after_prefix(backbone.model, loaded.key, loaded.value, batch["input_ids"])
    assert_within(in_memory, reference, model_rtol(backbone.model.config))


def test_prefix_in_peft_prefix_tuning_model_gives_the_same_logits(tiny_backbone_dir, tmp_path):
    """PEFT's prefix tuning (prefix_projection off) holds the flattened key/values [P, L*2*H*D]
    as its embedding; given our trained prefix it must produce our model's logits."""
    from peft import PrefixTuningConfig, get_peft_model

    backbone = load_backbone(tiny_backbone_dir)
    result = train(backbone, distinct_examples(), [], tmp_path / "p.npz", fast(), progress=False)
    prefix = load_prefix(tmp_path / "p.npz", backbone.architecture, backbone.fingerprint)
    P = prefix.prefix_len
    flat = np.stack([prefix.key, prefix.value], axis=1).transpose(3, 0, 1, 2, 4).reshape(P, -1)
    peft_model = get_peft_model(load_backbone(tiny_backbone_dir).model,
                                PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(flat))
    batch = first_rows(backbone, 3)
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = result.model.logits(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert_within(got[real], expected[real], model_rtol(backbone.model.config))
    assert result.meta["parameters"]["prefix"] == prefix.key.size * 2


def test_init_text_starts_the_prefix_from_the_models_key_values_over_those_words(tiny_backbone_dir):
    backbone = load_backbone(tiny_backbone_dir)
    ids = backbone.tokenizer.backend_tokenizer.encode("table-to-text:", add_special_tokens=False).ids
    key, value = kv_of_text(backbone.model, torch.tensor([ids]))
    for reparam in (True, False):
        model = build_model(backbone, fast(init_text="table-to-text:", reparam=reparam))
        assert model.prefix_len == len(ids)
        got_key, got_value = model.prefix_arrays()
        # the same key/values; with the MLP, (init - its output) + its output: a sum of two, rounded
        assert_within(got_key, key, rounding_rtol(1, 2))
        assert_within(got_value, value, rounding_rtol(1, 2))


def test_prompt_method_saves_key_values_that_reproduce_its_virtual_tokens(tiny_backbone_dir, tmp_path):
    backbone = load_backbone(tiny_backbone_dir)
    settings = fast(method="prompt")
    result = train(backbone, distinct_examples(), [], tmp_path / "prompt.npz", settings, progress=False)
    saved = load_prefix(tmp_path / "prompt.npz", backbone.architecture, backbone.fingerprint)
    assert saved.meta["method"] == "prompt" and saved.prefix_len == settings.prefix_len
    assert result.meta["parameters"]["trained"] == settings.prefix_len * backbone.architecture.hidden_size
    # The virtual tokens run as input embeddings in front of real tokens give what the saved
    # key/values give as past.
    batch = first_rows(backbone, 1)
    with torch.no_grad():
        direct = result.model.logits(batch["input_ids"], batch["attention_mask"])[0]
    reference = logits_after_prefix(backbone.model, saved.key, saved.value, batch["input_ids"])
    assert_within(direct, reference, model_rtol(backbone.model.config))


def test_finetune_trains_every_weight_and_saves_a_model_folder_pt_export_takes(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefixkit.exporter.onnx_export import export_backbone

    backbone = load_backbone(tiny_gpt2_dir)
    before = snapshot(backbone.model)
    result = train(backbone, distinct_examples(), distinct_examples()[:2], tmp_path / "ft",
                   fast(method="finetune", lr=1e-3), progress=False)
    assert result.prefix is None and result.meta["parameters"]["trained"] == result.meta["parameters"]["backbone"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in backbone.model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in saved.state_dict().items())
    record = json.loads((tmp_path / "ft" / "prefixkit-finetune.json").read_text())
    assert record["method"] == "finetune" and record["template"] == "{input}\n"
    manifest = export_backbone(tmp_path / "ft", tmp_path / "ft-onnx", graph="optimum")
    assert manifest.fingerprint == load_backbone(tmp_path / "ft").fingerprint != backbone.fingerprint


@pytest.mark.parametrize("method", ["prefix", "finetune"])
def test_interrupted_run_resumes_to_the_same_result_as_an_uninterrupted_one(tiny_llama_dir, tmp_path, method):
    settings = fast(method=method, epochs=3, lr=1e-2 if method == "prefix" else 1e-3)
    examples, dev = distinct_examples(), distinct_examples()[:3]
    whole = train(load_backbone(tiny_llama_dir), examples, dev, tmp_path / "whole.npz", settings, progress=False)

    def interrupt_at_step_3(step, stop):
        if step == 3:
            stop()  # what Ctrl-C does

    out = tmp_path / "cut.npz"
    cut = train(load_backbone(tiny_llama_dir), examples, dev, out, settings, progress=False, on_step=interrupt_at_step_3)
    assert cut.interrupted and cut.step == 3 and not out.exists() and cut.checkpoint.exists()
    with pytest.raises(TrainingError, match="--resume"):
        train(load_backbone(tiny_llama_dir), examples, dev, out, settings, progress=False)
    with pytest.raises(TrainingError, match="other settings"):
        train(load_backbone(tiny_llama_dir), examples, dev, out, dataclasses.replace(settings, lr=0.5),
              resume=True, progress=False)
    resumed = train(load_backbone(tiny_llama_dir), examples, dev, out, settings, resume=True, progress=False)
    assert resumed.step == whole.step == resumed.total_steps
    assert [r.get("dev_loss") for r in resumed.history] == [r.get("dev_loss") for r in whole.history]
    if method == "prefix":
        np.testing.assert_array_equal(resumed.prefix.key, whole.prefix.key)
        np.testing.assert_array_equal(resumed.prefix.value, whole.prefix.value)
    else:
        a, b = whole.model.backbone.state_dict(), resumed.model.backbone.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not cut.checkpoint.parent.exists()  # a finished run leaves no checkpoint behind


def write_jsonl(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in examples))
    return path


def test_ctrl_c_on_pt_train_leaves_a_checkpoint_that_resume_completes(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", distinct_examples(8))
    command = [str(BIN / "pt-train"), str(data), "-o", str(tmp_path / "p.npz"), "--backbone", str(tiny_llama_dir),
               "--epochs", "60", "--batch-size", "4", "--dev-fraction", "0.25", "--patience", "1000", "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the first epoch is done: 59 are left to interrupt
        if line.startswith("epoch 1 "):
            break
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, rest
    assert "checkpoint saved" in rest and "--resume" in rest
    assert (tmp_path / "p.npz.checkpoint" / "last.pt").exists() and not (tmp_path / "p.npz").exists()
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "wrote" in done.stderr
    meta = load_prefix(tmp_path / "p.npz").meta
    assert meta["steps"] == meta["total_steps"] == 60 * 2


def test_two_process_accelerate_run_ends_with_identical_prefixes_on_both_ranks(tiny_llama_dir, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(Path(__file__).parent / "helpers" / "ddp_train.py"),
               str(tiny_llama_dir), str(DATA / "e2e_sample.csv"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes 2" in done.stdout
    rank0, rank1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(rank0, rank1)
    saved = load_prefix(tmp_path / "prefix.npz")
    np.testing.assert_array_equal(np.concatenate([saved.key.ravel(), saved.value.ravel()]), rank0)
    start = build_model(load_backbone(tiny_llama_dir), TrainSettings()).prefix_arrays()
    assert not np.allclose(start[0], saved.key)


def test_pt_train_cli_writes_a_prefix_the_runtime_loads_with_its_meta(tiny_gpt2_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", distinct_examples(10))
    out = tmp_path / "user42.npz"
    done = subprocess.run(
        [str(BIN / "pt-train"), str(data), "-o", str(out), "--backbone", str(tiny_gpt2_dir), "--epochs", "1",
         "--init-text", "table-to-text:", "--template", "Table: {input}\nText:", "--stop", "\n"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # stderr is a pipe, not a terminal: progress comes as lines, the last one at the end
    assert re.search(r"^prefix: (\d+)/\1 steps \(100%\), [\d.]+ steps/s, [\d,]+ tokens/s, \d+s elapsed, loss [\d.]+, "
                     r"epoch 1$", done.stderr, re.M), done.stderr
    meta = load_prefix(out).meta
    assert meta["template"] == "Table: {input}\nText:" and meta["stop"] == ["\n"]
    assert meta["method"] == "prefix" and meta["settings"]["init_text"] == "table-to-text:"
    assert meta["data"]["train_examples"] + meta["data"]["dev_examples"] == 10
    assert meta["losses"]["dev_before"] is not None and "% of the backbone" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--template", "no field"], "{input}"),
    (["--limit", "500"], "only"),
    (["-o", "prefix.txt"], ".npz"),
    (["--format", "dart"], "not valid JSON"),
])
def test_pt_train_explains_bad_options_in_one_sentence(tiny_gpt2_dir, tmp_path, args, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", distinct_examples(10))
    command = [str(BIN / "pt-train"), str(data), "--backbone", str(tiny_gpt2_dir)]
    if "-o" not in args:
        command += ["-o", str(tmp_path / "p.npz")]
    done = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
