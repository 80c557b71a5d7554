"""Encoder-decoder backbones (tiny random BART and T5): the PyTorch forward with prefixes
against Hugging Face, the export against PyTorch, the runtime against Hugging Face `generate`
and against PyTorch with prefixes in all three attentions, mixed-prefix batches against each
row alone, and the format-2 prefix file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.seq2seq import PrefixSeq2Seq, batched, prefix_parts
from prefixkit.runtime import Prefix, PrefixFileError, load_prefix, make_meta, save_prefix
from prefixkit.runtime import load
from prefixkit.runtime.seq2seq import ExportedSeq2Seq, Seq2SeqGenerator

from conftest import e2e_rows
from tolerance import assert_within, model_rtol


@pytest.fixture(scope="module")
def exports(tmp_path_factory, request):
    """Each tiny seq2seq backbone exported once: {"tiny_bart_dir": (hf folder, export folder)}."""
    out = {}
    root = tmp_path_factory.mktemp("seq2seq-exports")
    for name in ("tiny_bart_dir", "tiny_t5_dir"):
        source = request.getfixturevalue(name)
        out[name] = (source, root / name)
        export_backbone(str(source), root / name)
    return out


def random_prefix(exported, P: int, seed: int) -> Prefix:
    a = exported.architecture
    rng = np.random.default_rng(seed)

    def kv(L):
        return (rng.standard_normal((L, a.n_kv_heads, P, a.head_dim)) * 0.5).astype(np.float32)

    return Prefix(kv(a.n_layers), kv(a.n_layers), make_meta(exported.manifest.fingerprint, P, template="{input}"),
                  enc_key=kv(a.n_encoder_layers), enc_value=kv(a.n_encoder_layers), cross_key=kv(a.n_layers),
                  cross_value=kv(a.n_layers))


def sources(n: int) -> list[str]:
    return [row["mr"] for row in e2e_rows()[:n]]


@pytest.mark.parametrize("family", ["tiny_bart_dir", "tiny_t5_dir"])
def test_forward_equals_hugging_face_bare_and_with_a_decoder_prefix_as_past(family, request):
    from transformers import AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache

    model = AutoModelForSeq2SeqLM.from_pretrained(request.getfixturevalue(family)).eval()
    m = PrefixSeq2Seq(model)
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    targets = torch.randint(3, V, (2, 5), generator=g)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
        assert_within(m(ids, mask, targets), want, model_rtol(model.config))
        P = 4
        key, value = (torch.randn(m.n_dec_layers, 2, m.n_heads, P, m.head_dim, generator=g) for _ in range(2))
        past = EncoderDecoderCache(DynamicCache(ddp_cache_data=list(zip(key, value))), DynamicCache())
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets, past_key_values=past,
                     decoder_attention_mask=torch.ones(2, P + 5, dtype=torch.long), use_cache=True).logits
        prefix = m.empty_prefix(2)
        states = m.encode(ids, mask, *prefix["encoder"], torch.zeros(2, 0, dtype=torch.long))
        cross = m.cross(states, *prefix["cross"])
        positions = P + torch.arange(5).expand(2, 5)
        got, present_key, _ = m.decode(targets, positions, key, value, torch.ones(2, P + 5, dtype=torch.long),
                                       *cross, mask)
    assert_within(got, want, model_rtol(model.config))
    assert present_key.shape == (m.n_dec_layers, 2, m.n_heads, P + 5, m.head_dim)


def test_export_writes_two_graphs_within_fp32_parity_of_pytorch(exports):
    from transformers import AutoConfig

    for source, folder in exports.values():
        exported = ExportedSeq2Seq(folder)
        manifest = exported.manifest
        assert manifest.graph.kind == "seq2seq" and manifest.architecture.is_encoder_decoder
        assert all((folder / name).is_file() for name in ("encoder.onnx", "encoder.onnx.data", "decoder.onnx",
                                                            "decoder.onnx.data"))
        assert manifest.graph.weights_beside
        # gated by fp32 rounding for 2 + 2 layers whose longest sums (the feed-forward) have 128 terms
        assert manifest.parity["relative"] < manifest.parity["limit"], manifest.parity
        assert manifest.parity["limit"] == model_rtol(AutoConfig.from_pretrained(source))
        assert {k: manifest.parity["limit_from"][k] for k in ("layers", "width")} == {"layers": 4, "width": 128}
        assert manifest.decoder_start_token_id == 0
        # the same export again is recognised, not redone
        assert export_backbone(str(source), folder).created == manifest.created


def test_encoder_decoder_exports_refuse_decoder_only_options(tiny_bart_dir, tmp_path):
    from prefixkit.exporter.onnx_export import ExportError

    with pytest.raises(ExportError, match="encoder-decoder backbone"):
        export_backbone(str(tiny_bart_dir), tmp_path / "q", quantize="int4")


@pytest.mark.parametrize("num_beams", [1, 5])
def test_runtime_equals_hugging_face_generate_on_the_bare_backbone(exports, num_beams):
    from transformers import AutoModelForSeq2SeqLM

    for source, folder in exports.values():
        model = AutoModelForSeq2SeqLM.from_pretrained(source).eval()
        generator = load(folder)
        for text in sources(3):
            ids = generator.tokenizer.encode(text).ids
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=12, num_beams=num_beams, length_penalty=0.8, do_sample=False,
                                     early_stopping=False, no_repeat_ngram_size=0, forced_eos_token_id=None,
                                     forced_bos_token_id=None, min_length=0)
            want = out[0, 1:].tolist()  # without the decoder start token
            want = want[: want.index(2) + 1] if 2 in want else want  # HF pads after eos
            got = generator.generate([(None, ids)], max_new_tokens=12, num_beams=num_beams, length_penalty=0.8)
            assert got[0].token_ids == want, (source.name, text)


def _torch_greedy(model, prefix: Prefix, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding in PyTorch with the prefix in all three attentions, teacher-forced from
    scratch at each step (no cache): an independent path to the runtime's."""
    m = PrefixSeq2Seq(model)
    stacked = batched(prefix_parts(prefix), 1)
    source = torch.tensor([ids])
    out = [m.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(steps):
            logits = m(source, torch.ones_like(source), torch.tensor([out]), stacked,
                       torch.ones(1, prefix.prefix_len, dtype=torch.long))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == 2:
                break
    return out[1:]


def test_runtime_with_prefixes_in_all_three_attentions_equals_pytorch(exports):
    from transformers import AutoModelForSeq2SeqLM

    for source, folder in exports.values():
        model = AutoModelForSeq2SeqLM.from_pretrained(source).eval()
        generator = load(folder)
        exported = generator.exported
        for seed, text in enumerate(sources(3)):
            prefix = random_prefix(exported, 5 + seed, seed)
            ids = generator.tokenizer.encode(text).ids
            got = generator.generate([(prefix, ids)], max_new_tokens=10)[0].token_ids
            assert got == _torch_greedy(model, prefix, ids, 10), (source.name, text)


def _hugging_face_with_prefix(model, prefix: Prefix):
    """The Hugging Face model with its encoder and forward replaced by PrefixSeq2Seq's, the
    prefix in all three attentions, no cache: Hugging Face `generate` then runs its own greedy
    and beam search (expansion, reordering, scoring) over the prefixed model."""
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

    m = PrefixSeq2Seq(model)
    P = prefix.prefix_len
    parts = prefix_parts(prefix)

    def expand(part, B):
        return batched(parts, B)[part]

    class Encoder(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, **_):
            B = input_ids.shape[0]
            states = m.encode(input_ids, attention_mask, *expand("encoder", B), torch.ones(B, P, dtype=torch.long))
            return BaseModelOutput(last_hidden_state=states)

    encoder = Encoder()

    def forward(input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, **_):
        states = encoder_outputs.last_hidden_state
        B, T = states.shape[0], decoder_input_ids.shape[1]
        cross_key, cross_value = m.cross(states, *expand("cross", B))
        cross_mask = torch.cat([torch.ones(B, P, dtype=torch.long), attention_mask], dim=1)
        positions = (P + torch.arange(T)).expand(B, T)
        logits, _, _ = m.decode(decoder_input_ids, positions, *expand("decoder", B),
                                torch.ones(B, P + T, dtype=torch.long), cross_key, cross_value, cross_mask)
        return Seq2SeqLMOutput(logits=logits)

    model.get_encoder = lambda: encoder
    model.forward = forward
    return model


@pytest.mark.parametrize("num_beams", [1, 5])
def test_runtime_with_prefixes_equals_hugging_face_generate_over_the_prefixed_model(exports, num_beams):
    from transformers import AutoModelForSeq2SeqLM

    for source, folder in exports.values():
        generator = load(folder)
        exported = generator.exported
        for seed, text in enumerate(sources(3)):
            prefix = random_prefix(exported, 4 + 3 * seed, seed)
            model = _hugging_face_with_prefix(AutoModelForSeq2SeqLM.from_pretrained(source).eval(), prefix)
            ids = generator.tokenizer.encode(text).ids
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=12, num_beams=num_beams, length_penalty=0.8, do_sample=False,
                                     early_stopping=False, no_repeat_ngram_size=0, forced_eos_token_id=None,
                                     forced_bos_token_id=None, min_length=0, use_cache=False)
            want = out[0, 1:].tolist()
            want = want[: want.index(2) + 1] if 2 in want else want
            got = generator.generate([(prefix, ids)], max_new_tokens=12, num_beams=num_beams, length_penalty=0.8)
            assert got[0].token_ids == want, (source.name, text)


@pytest.mark.parametrize("settings", [{"num_beams": 1}, {"num_beams": 4, "length_penalty": 0.7},
                                      {"num_beams": 3, "no_repeat_ngram_size": 2}])
def test_mixed_prefix_batch_equals_each_row_alone(exports, settings):
    from transformers import AutoConfig

    for source, folder in exports.values():
        rtol = model_rtol(AutoConfig.from_pretrained(source))
        generator = load(folder)
        exported = generator.exported
        long, short = random_prefix(exported, 7, 1), random_prefix(exported, 2, 2)
        texts = sources(4)
        rows = [(p, generator.tokenizer.encode(t).ids) for p, t in zip([long, None, short, long], texts)]
        together = generator.generate(rows, max_new_tokens=10, **settings)
        for row, mixed in zip(rows, together):
            alone = generator.generate([row], max_new_tokens=10, **settings)[0]
            assert mixed.token_ids == alone.token_ids
            if mixed.score is not None:  # log-probabilities of logits equal within fp32 rounding
                assert mixed.score == pytest.approx(alone.score, rel=rtol)
        assert len({tuple(g.token_ids) for g in together}) > 1  # the prefixes changed the outputs


def test_format_2_prefix_round_trips_and_is_checked_against_the_backbone(exports, tmp_path):
    (_, bart), (_, t5) = exports["tiny_bart_dir"], exports["tiny_t5_dir"]
    exported = ExportedSeq2Seq(bart)
    prefix = random_prefix(exported, 6, 0)
    path = save_prefix(tmp_path / "p.npz", prefix)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["cross_key", "cross_value", "enc_key", "enc_value", "key", "meta", "value"]
    loaded = load_prefix(path, exported.architecture, exported.manifest.fingerprint)
    assert loaded.meta["format"] == 2 and loaded.is_encoder_decoder
    for name in ("key", "value", "enc_key", "enc_value", "cross_key", "cross_value"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(prefix, name))
    generator = Seq2SeqGenerator(exported)
    generator.add_prefix("ok", path)
    # another backbone's prefix (T5 has the same shapes, another fingerprint) is refused
    other = ExportedSeq2Seq(t5)
    with pytest.raises(PrefixFileError, match="trained against backbone"):
        Seq2SeqGenerator(other).add_prefix("bart", path)
    # a decoder-only prefix on an encoder-decoder backbone, and the reverse
    decoder_only = save_prefix(tmp_path / "d.npz", Prefix(prefix.key, prefix.value, dict(prefix.meta)))
    assert load_prefix(decoder_only).meta["format"] == 1
    with pytest.raises(PrefixFileError, match="decoder-only backbone; this backbone"):
        generator.add_prefix("d", decoder_only)
    from prefixkit.runtime.backbone import Architecture

    llama_like = Architecture("llama", 2, 4, 4, 16, 64, 600, 128)
    with pytest.raises(PrefixFileError, match="encoder-decoder backbone; this backbone"):
        load_prefix(path, llama_like)
    # an encoder array of the wrong depth
    bad = Prefix(prefix.key, prefix.value, dict(prefix.meta), enc_key=prefix.enc_key[:1], enc_value=prefix.enc_value[:1],
                 cross_key=prefix.cross_key, cross_value=prefix.cross_value)
    save_prefix(tmp_path / "bad.npz", bad)
    with pytest.raises(PrefixFileError, match="encoder needs"):
        load_prefix(tmp_path / "bad.npz", exported.architecture)


# -- end to end: pt-train -> pt-export -> pt-serve on a tiny seq2seq task ----------------------------
WORDS = ["name", "city", "coffee", "high", "low", "food", "area"]  # one token each after a space


def _sequence(rng) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))


def _reverse(text: str) -> str:
    return " ".join(text.split()[::-1])


@pytest.fixture(scope="module")
def instructed_bart(tiny_bart_dir, tmp_path_factory):
    """The tiny BART, fully trained for a few hundred steps to copy ("x | copy" and plain "x") or
    reverse ("x | reverse") word sequences: a stand-in for a pretrained backbone that can do a
    task when told to. A prefix must then learn to tell it, with no instruction in the input."""
    import random

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    eos = model.config.eos_token_id
    for _ in range(300):
        inputs, outputs = [], []
        for _ in range(16):
            s = _sequence(rng)
            task = rng.choice(["copy", "reverse", "plain"])
            # the instruction follows the words, so they keep their positions without it
            inputs.append({"copy": s + " | copy", "reverse": s + " | reverse", "plain": s}[task])
            outputs.append(" " + (_reverse(s) if task == "reverse" else s))
        x = tokenizer(inputs, return_tensors="pt", padding=True, add_special_tokens=False)
        targets = [tokenizer(o, add_special_tokens=False).input_ids + [eos] for o in outputs]
        T = max(map(len, targets))
        labels = torch.full((16, T), -100)
        decoder_inputs = torch.full((16, T), eos)
        decoder_inputs[:, 0] = model.config.decoder_start_token_id
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(t)
            decoder_inputs[i, 1 : len(t)] = torch.tensor(t[:-1])
        loss = model(input_ids=x.input_ids, attention_mask=x.attention_mask, decoder_input_ids=decoder_inputs,
                     labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("instructed-bart")
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_prefix_learns_to_reverse_then_is_exported_and_served(instructed_bart, tmp_path):
    """pt-train a prefix on "x" -> reverse(x) (no instruction), pt-export the backbone, pt-serve
    the prefix; exact match on held-out sequences through the server, against the bare backbone
    (which copies) and against the runtime generating alone."""
    import json
    import random
    import subprocess

    import httpx

    from serving import BIN, Server

    rng = random.Random(1)
    held_out = sorted({_sequence(rng) for _ in range(60)})[:30]
    seen = set(held_out)
    train_rows, dev_rows = [], []
    while len(train_rows) < 160 or len(dev_rows) < 30:
        s = _sequence(rng)
        if s in seen:
            continue
        (train_rows if len(train_rows) < 160 else dev_rows).append({"input": s, "output": " " + _reverse(s)})
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix_path = tmp_path / "reverse.npz"
    subprocess.run([str(BIN / "pt-train"), str(tmp_path / "train.jsonl"), "--dev-data", str(tmp_path / "dev.jsonl"),
                    "--backbone", str(instructed_bart), "--prefix-len", "8", "--mid-dim", "64", "--lr", "1e-2",
                    "--epochs", "30", "--batch-size", "8", "--patience", "30", "--template", "{input}",
                    "--threads", "1", "-o", str(prefix_path)], check=True, capture_output=True)
    losses = load_prefix(prefix_path).meta["losses"]
    assert losses["dev_best"] < losses["dev_before"] / 8, losses  # nats per output token

    export = tmp_path / "export"
    subprocess.run([str(BIN / "pt-export"), str(instructed_bart), "--output", str(export)], check=True,
                   capture_output=True)
    server = Server(export, f"--prefix=reverse={prefix_path}")
    try:
        def served(model: str) -> list[str]:
            answer = httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": held_out, "max_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            return [c["text"].strip() for c in sorted(answer.json()["choices"], key=lambda c: c["index"])]

        reversed_, bare = served("reverse"), served(export.name)
    finally:
        server.stop()
    exact = np.mean([out == _reverse(s) for out, s in zip(reversed_, held_out)])
    exact_bare = np.mean([out == _reverse(s) for out, s in zip(bare, held_out)])
    copied_bare = np.mean([out == s for out, s in zip(bare, held_out)])
    print(f"dev loss {losses['dev_before']:.3f} -> {losses['dev_best']:.3f}; exact match (reverse) "
          f"{exact:.2f} with the prefix, {exact_bare:.2f} without (which copies {copied_bare:.2f})")
    assert copied_bare >= 0.8  # the bare backbone does what plain inputs taught it: copy
    assert exact >= 0.6 and exact > exact_bare + 0.4
    # pt-eval runs unchanged on the encoder-decoder export: ROUGE of the held-out reversals
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"input": s, "output": _reverse(s)}) + "\n"
                                                  for s in held_out))
    subprocess.run([str(BIN / "pt-eval"), str(tmp_path / "test.jsonl"), "--export", str(export), "--prefix",
                    str(prefix_path), "--metrics", "rouge", "--max-new-tokens", "8", "-o", str(tmp_path / "eval")],
                   check=True, capture_output=True)
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    matches = np.mean([r["output"].strip() == _reverse(r["input"]) for r in rows])
    assert set(scores) == {"ROUGE-1", "ROUGE-2", "ROUGE-L"} and len(rows) == len(held_out)
    assert scores["ROUGE-1"] >= matches - 1e-9 and (matches < 1 or scores["ROUGE-L"] == pytest.approx(1.0))
    assert matches >= 0.6  # 5 beams (pt-eval's default) as well as greedy
    # the server's answers are the runtime's, row by row
    generator = load(export)
    exported = generator.exported
    generator.add_prefix("reverse", prefix_path)
    alone = generator.complete([("reverse", s) for s in held_out[:5]], max_new_tokens=8)
    assert [c.text.strip() for c in alone] == reversed_[:5]


def test_pt_train_on_t5_writes_a_format_2_prefix_its_export_generates_with(tiny_t5_dir, exports, tmp_path):
    """The trainer's path for T5 (relative positions, gated FF): loss falls over a few epochs on
    memorising four pairs, and the file loads against the T5 export; finetune is refused."""
    from prefixkit.exporter.backbones import load_backbone
    from prefixkit.training.data import Example
    from prefixkit.training.trainer import TrainingError, TrainSettings, train

    backbone = load_backbone(tiny_t5_dir)
    examples = [Example(f"{w} city", f" city {w}", w) for w in WORDS[:4]]
    result = train(backbone, examples, examples, tmp_path / "t5.npz",
                   TrainSettings(prefix_len=3, mid_dim=32, epochs=8, batch_size=4, lr=1e-2, patience=8,
                                 template="{input}"), progress=False)
    losses = [r["dev_loss"] for r in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    generator = load(exports["tiny_t5_dir"][1])
    exported = generator.exported
    prefix = generator.add_prefix("t5", tmp_path / "t5.npz")
    assert prefix.meta["format"] == 2 and prefix.enc_key.shape == exported.architecture.encoder_kv_shape(3)
    assert generator.complete([("t5", "name city")], max_new_tokens=4)[0].token_ids
    with pytest.raises(TrainingError, match="encoder-decoder backbone"):
        train(backbone, examples, examples, tmp_path / "f", TrainSettings(method="finetune"), progress=False)


def test_other_encoder_decoder_families_are_refused_in_one_sentence(tiny_bart_dir, tmp_path):
    """mBART (pre-norm) is not the BART forward: refused from its config, before any weights load."""
    import shutil

    from transformers import MBartConfig

    from prefixkit.exporter.backbones import BackboneError, load_backbone

    folder = tmp_path / "mbart"
    shutil.copytree(tiny_bart_dir, folder)
    MBartConfig(vocab_size=600, d_model=64, encoder_layers=2, decoder_layers=2).save_pretrained(folder)
    with pytest.raises(BackboneError, match="type 'mbart' are not supported; prefixkit runs the BART and T5"):
        load_backbone(folder)
