"""Torch-free generation against Hugging Face `generate` in PyTorch fp32 with the same prefix
passed as past key values, greedy and beam search, on both graphs; and a row's output in a
mixed batch equal to the same row generated alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.reference import hf_generate, kv_of_text
from prefixkit.runtime.generate import Generator
from prefixkit.runtime.prefix import Prefix
from prefixkit.runtime.session import ExportedBackbone
from tolerance import model_rtol

GRAPHS = [("gpt2", "optimum"), ("llama", "optimum"), ("llama", "fused")]
PROMPTS = [
    "name : Aromi | Type : coffee shop | food : English",
    "name : The Eagle | area : riverside",
    "name : Zizzi | Type : pub | family friendly : yes | near : The Bakers",
]


@pytest.fixture(scope="module")
def setups(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir, tiny_export):
    """Per graph: the PyTorch backbone, a Generator over its fp32 export, and three rows with
    prefixes of length 0, 3 and 10 (the model's own key/values of real text)."""
    paths = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}
    made = {}
    for name, graph in GRAPHS:
        if (name, graph) == ("llama", "fused"):
            out = tiny_export[0]  # the session's, read only
        else:
            out = tmp_path_factory.mktemp(f"{name}-{graph}")
            export_backbone(str(paths[name]), out, graph=graph)
        backbone = load_backbone(paths[name])
        tok = backbone.tokenizer
        text_ids = tok("table-to-text: restaurant descriptions from tables").input_ids
        prefixes = [None]
        for p in (3, 10):
            key, value = kv_of_text(backbone.model, torch.tensor([text_ids[:p]]))
            prefixes.append(Prefix(key, value, {}))
        rows = [(prefix, tok(prompt).input_ids) for prefix, prompt in zip(prefixes, PROMPTS)]
        made[name, graph] = (backbone, Generator(ExportedBackbone(out)), rows)
    return made


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_greedy_equals_hugging_face_generate_with_the_prefix_as_past(setups, name, graph):
    backbone, generator, rows = setups[name, graph]
    got = generator.generate(rows, max_new_tokens=20)
    for (prefix, ids), generation in zip(rows, got):
        assert generation.token_ids == hf_generate(backbone.model, prefix, ids, 20)


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_beam_search_equals_hugging_face_generate_with_the_prefix_as_past(setups, name, graph):
    backbone, generator, rows = setups[name, graph]
    got = generator.generate(rows, max_new_tokens=16, num_beams=5, length_penalty=0.8)
    for (prefix, ids), generation in zip(rows, got):
        assert generation.token_ids == hf_generate(backbone.model, prefix, ids, 16, num_beams=5, length_penalty=0.8)


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "5 beams"])
@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_mixed_batch_rows_match_solo_generation(setups, name, graph, num_beams):
    backbone, generator, rows = setups[name, graph]
    together = generator.generate(rows, max_new_tokens=12, num_beams=num_beams)
    for row, generation in zip(rows, together):
        alone = generator.generate([row], max_new_tokens=12, num_beams=num_beams)[0]
        assert generation.token_ids == alone.token_ids
        if num_beams > 1:  # log-probabilities of logits equal within fp32 rounding
            assert generation.score == pytest.approx(alone.score, rel=model_rtol(backbone.model.config))


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_beams_that_end_early_are_ranked_as_hugging_face_ranks_them(setups, name, graph, length_penalty, early_stopping):
    """Random tiny models rarely say eos, so end hypotheses on tokens they do say: beams then
    finish at different lengths and the length penalty decides between them."""
    backbone, generator, rows = setups[name, graph]
    greedy = generator.generate(rows, max_new_tokens=12)
    eos = sorted({g.token_ids[3] for g in greedy} | {g.token_ids[6] for g in greedy})
    settings = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    got = generator.generate(rows, max_new_tokens=12, eos_token_ids=eos, **settings)
    lengths = set()
    for (prefix, ids), generation in zip(rows, got):
        want = hf_generate(backbone.model, prefix, ids, 12, eos_token_id=eos, **settings)
        assert generation.token_ids == want
        lengths.add(len(want))
    if length_penalty < 1.0:  # a larger penalty may rightly prefer the long hypotheses
        assert min(lengths) < 12  # some row really ended on an eos


def test_greedy_row_stops_at_its_eos(setups):
    _, generator, rows = setups["llama", "fused"]
    first = generator.generate(rows[:1], max_new_tokens=3)[0].token_ids
    out = generator.generate(rows[:1], max_new_tokens=10, eos_token_ids=[first[1]])[0].token_ids
    assert out == first[:2]  # the eos token closes the output


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "4 beams"])
@pytest.mark.parametrize("name, graph", [("gpt2", "optimum"), ("llama", "fused")], ids=["gpt2-optimum", "llama-fused"])
def test_no_repeat_ngram_and_min_new_tokens_act_as_in_hugging_face(setups, name, graph, num_beams):
    backbone, generator, rows = setups[name, graph]
    # Random tiny models repeat themselves at once (see the greedy outputs), so a 2-gram ban bites.
    plain = generator.generate(rows, max_new_tokens=16, num_beams=num_beams)
    banned = generator.generate(rows, max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=2)
    if name == "gpt2":  # its plain outputs repeat 2-grams, so the ban must change them
        assert [g.token_ids for g in plain] != [g.token_ids for g in banned]
    for (prefix, ids), generation in zip(rows, banned):
        want = hf_generate(backbone.model, prefix, ids, 16, num_beams=num_beams, no_repeat_ngram_size=2)
        assert generation.token_ids == want
        seq = ids + want  # no generated token completes a 2-gram seen earlier (the prompt may repeat)
        for j in range(len(ids), len(seq)):
            assert (seq[j - 1], seq[j]) not in set(zip(seq[: j - 1], seq[1:j]))
    # A frequent token as eos, held off for 6 tokens.
    eos = [plain[0].token_ids[1]]
    held = generator.generate(rows, max_new_tokens=16, num_beams=num_beams, min_new_tokens=6, eos_token_ids=eos)
    for (prefix, ids), generation in zip(rows, held):
        want = hf_generate(backbone.model, prefix, ids, 16, num_beams=num_beams, min_new_tokens=6, eos_token_id=eos)
        assert generation.token_ids == want
        assert eos[0] not in generation.token_ids[:6]


def test_sampling_is_seeded_and_its_limits_reduce_it_to_greedy(setups):
    _, generator, rows = setups["llama", "fused"]
    greedy = [g.token_ids for g in generator.generate(rows, max_new_tokens=10)]

    def sample(**kw):
        return [g.token_ids for g in generator.generate(rows, max_new_tokens=10, do_sample=True, **kw)]

    assert sample(seed=7, temperature=2.0) == sample(seed=7, temperature=2.0)
    assert sample(seed=7, temperature=2.0) != sample(seed=8, temperature=2.0)
    assert sample(seed=7, temperature=2.0) != greedy
    assert sample(seed=3, top_k=1, temperature=5.0) == greedy
    assert sample(seed=3, top_p=1e-6, temperature=5.0) == greedy


def test_bad_settings_are_refused_with_every_reason():
    from prefixkit.runtime.generate import GenerationSettings

    with pytest.raises(ValueError, match="max_new_tokens must be at least 1; .*temperature must be above 0"):
        GenerationSettings(max_new_tokens=0, temperature=0).check()
    with pytest.raises(ValueError, match="sampling works with num_beams 1"):
        GenerationSettings(do_sample=True, num_beams=3).check()


def _decode_in_lockstep(first, second, joining, steps: int, join_at: int, reorders: dict[int, list[int]],
                        check=None) -> None:
    """Decode two caches of the same two rows side by side: a third row (its cache `joining`)
    joins at step `join_at`, rows are selected as `reorders` says at those steps; the logits
    of every step must be equal bit for bit, and check(first, second) hold after each."""
    import numpy as np

    ids = np.array([5, 7])
    for step in range(steps):
        if step == join_at:
            for cache in (first, second):
                cache.append(*joining)
            ids = np.append(ids, 9)
        if step in reorders:
            for cache in (first, second):
                cache.select(np.array(reorders[step]))
            ids = ids[reorders[step]]
        a, b = first.forward(ids), second.forward(ids)
        np.testing.assert_array_equal(a, b)
        if check is not None:
            check(first, second)
        ids = a.argmax(-1)


def test_fused_graph_decodes_in_place_with_the_logits_of_the_copying_path(setups):
    """The fused graph's cache stays in preallocated buffers that GroupQueryAttention writes in
    place; through steps, a row joining, rows leaving and beam-style reorders, its logits are
    those of the path that copies the cache every step (checked against PyTorch above)."""
    from prefixkit.runtime.cache import KVCache, SharedKVCache, new_cache, right_pad

    _, generator, rows = setups["llama", "fused"]
    exported = generator.exported
    alone = [exported.run_alone(prefix, ids) for prefix, ids in rows]
    key, value, lens = right_pad([cache for _, cache in alone[:2]])
    shared = new_cache(exported, key, value, lens=lens)
    copied = KVCache(key, value, None, lens, exported)
    assert isinstance(shared, SharedKVCache)
    # Past the first 64-position block, so the buffers grow once. Beam-style reorders: every row
    # moved; some rows kept in place (same batch size, so the binding is reused); the identity;
    # and a shrink.
    _decode_in_lockstep(shared, copied, alone[2][1], steps=40, join_at=3,
                        reorders={6: [2, 0, 0], 10: [0, 0, 2], 14: [0, 1, 2], 18: [2, 1]})
    assert shared.key.shape[3] >= int(shared.lens.max())


def test_a_reorder_copies_from_where_a_row_and_its_source_differ():
    """SharedKVCache.select with a start per kept row: positions below it, which the caller
    promises already hold the source's values, are not copied; the rest is, and a source that
    is itself overwritten (swaps, cycles, one row to several) is read before it is. The result
    must equal a plain gather of every position, on rows whose positions hold a function of
    their token history (as a cache does)."""
    from types import SimpleNamespace

    from prefixkit.runtime.cache import SharedKVCache

    rng = np.random.default_rng(0)
    L, H, D, prompt, n = 2, 3, 4, 5, 6
    exported = SimpleNamespace(manifest=SimpleNamespace(max_positions=64), kv_dtype=np.dtype(np.float32))
    for trial in range(40):
        generated = int(rng.integers(0, 8))
        history = rng.integers(0, 2, (n, generated))  # two token values: rows often share a beginning
        lens = prompt + generated

        def cache_of(rows_history):
            out = np.zeros((L, len(rows_history), H, lens, D), np.float32)
            for r, h in enumerate(rows_history):
                for t in range(generated):  # position prompt + t depends on the tokens up to t
                    out[:, r, :, prompt + t] = hash(tuple(h[: t + 1])) % 1000
                out[:, r, :, :prompt] = 7.0
            return out

        key = cache_of(history)
        cache = SharedKVCache(exported, key, -key, np.full(n, lens))
        rows = rng.integers(0, n, n) if trial % 2 else rng.permutation(n)
        same = np.cumprod(history == history[rows], axis=1).sum(axis=1)
        cache.select(rows, same_before=prompt + same)
        np.testing.assert_array_equal(cache.key[:, :n, :, :lens], key[:, rows])
        np.testing.assert_array_equal(cache.value[:, :n, :, :lens], -key[:, rows])
        # and the promise is what saves the copies: a wrong one leaves the old values
        if generated and (same < generated).any() and not np.array_equal(rows, np.arange(n)):
            cache = SharedKVCache(exported, key, -key, np.full(n, lens))
            cache.select(rows, same_before=lens)
            np.testing.assert_array_equal(cache.key[:, :n, :, :lens], key)


def test_beam_search_reorders_copy_only_what_differs_and_give_the_same_result(setups, monkeypatch):
    """Beam search passes, per beam, the positions up to its first token that differs from its
    new parent's; the tokens and scores equal those of reorders that copy every generated
    position, and fewer positions are copied."""
    from prefixkit.runtime.cache import SharedKVCache

    _, generator, rows = setups["llama", "fused"]
    select = SharedKVCache.select
    copied = {"trimmed": 0, "all": 0}

    def counting(kind):
        def wrapped(self, picked, same_before=0):
            picked = np.asarray(picked)
            width = int(self.lens[picked].max(initial=0))
            starts = np.broadcast_to(np.asarray(same_before), picked.shape)
            moved = picked != np.arange(len(picked))
            copied[kind] += int(np.maximum(width - starts, 0)[moved].sum())
            return select(self, picked, same_before)
        return wrapped

    monkeypatch.setattr(SharedKVCache, "select", counting("trimmed"))
    trimmed = generator.generate(rows, max_new_tokens=16, num_beams=5)
    monkeypatch.setattr(SharedKVCache, "select",
                        lambda self, picked, same_before=0: counting("all")(self, picked, np.min(same_before)))
    everything = generator.generate(rows, max_new_tokens=16, num_beams=5)
    assert [g.token_ids for g in trimmed] == [g.token_ids for g in everything]
    assert [g.score for g in trimmed] == [g.score for g in everything]
    assert 0 < copied["trimmed"] < copied["all"]


def test_generation_makes_room_for_all_its_tokens_at_once(setups, monkeypatch):
    """The in-place cache is made with room for every row (every beam) up to its last token,
    so it is never grown (copied whole and rebound) mid-way; here past 64 positions."""
    from prefixkit.runtime.cache import ROOM_STEP, SharedKVCache

    _, generator, rows = setups["llama", "fused"]
    grown = []
    grow = SharedKVCache._grow

    def recording(self, *args):
        before = self.key.shape
        grow(self, *args)
        if self.key.shape != before:
            grown.append((before, self.key.shape))

    monkeypatch.setattr(SharedKVCache, "_grow", recording)
    longest = max(len(ids) + (0 if prefix is None else prefix.prefix_len) for prefix, ids in rows)
    assert longest + 70 > ROOM_STEP
    for num_beams in (1, 3):
        got = generator.generate(rows, max_new_tokens=70, min_new_tokens=70, num_beams=num_beams)
        assert [len(g.token_ids) for g in got] == [70] * len(rows)
    assert grown == []


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_device_cache_gives_the_logits_of_the_host_cache(setups, name, graph):
    """The cache kept as ONNX Runtime values (what CUDA and TensorRT use, here run on the CPU
    provider): through steps, a row joining, beam-style reorders and rows leaving, with padding
    dropped on the device, its logits equal those of the numpy cache, and so do its tokens."""
    import onnxruntime as ort

    from prefixkit.runtime.cache import DeviceKVCache, KVCache, right_pad

    _, generator, rows = setups[name, graph]
    exported = generator.exported
    on_device = ExportedBackbone(exported.folder)
    on_device.cache_device = "cpu"
    left = exported.manifest.graph.padding == "left"

    def start(backbone, cache_type, first_rows):
        if left:
            batch = backbone.batch(first_rows)
            _, key, value = backbone.forward(batch)
            return cache_type(key, value, batch.attention_mask, None, backbone)
        key, value, lens = right_pad([backbone.run_alone(p, ids)[1] for p, ids in first_rows])
        return cache_type(key, value, None, lens, backbone)

    device, host = start(on_device, DeviceKVCache, rows[:2]), start(exported, KVCache, rows[:2])
    joining = exported.run_alone(*rows[2])[1]

    def same_shape(a, b):  # the same rows, and padding no row needs dropped alike
        assert (len(a), a.width) == (len(b), b.width)

    _decode_in_lockstep(device, host, joining, steps=12, join_at=2, check=same_shape,
                        reorders={4: [2, 0, 0], 6: [0, 0, 2], 8: [0, 1, 2], 9: [1, 2], 10: [1]})
    assert isinstance(device.key, ort.OrtValue)  # the device path ran, not a numpy fallback

    device_generator = Generator(on_device)
    for num_beams in (1, 5):
        got = device_generator.generate(rows, max_new_tokens=12, num_beams=num_beams)
        want = generator.generate(rows, max_new_tokens=12, num_beams=num_beams)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.score for g in got] == [w.score for w in want]


def test_shipped_device_graphs_are_what_the_exporter_builds():
    from prefixkit.exporter.cache_ops import DTYPES, OPS, OPS_DIR, op_file, op_model

    for op in OPS:
        for dtype in DTYPES:
            assert (OPS_DIR / op_file(op, dtype)).read_bytes() == op_model(op, dtype), (
                f"runtime/ops/{op_file(op, dtype)} is stale: python -m prefixkit.exporter.cache_ops")


def test_providers_come_from_the_environment_and_a_missing_one_is_named(setups, monkeypatch):
    from prefixkit.runtime.session import PROVIDERS_ENV, default_providers

    folder = setups["gpt2", "optimum"][1].exported.folder
    monkeypatch.delenv(PROVIDERS_ENV, raising=False)
    assert default_providers() == ("CPUExecutionProvider",)
    assert ExportedBackbone(folder).cache_device is None
    monkeypatch.setenv(PROVIDERS_ENV, "NoSuchExecutionProvider, CPUExecutionProvider")
    assert default_providers() == ("NoSuchExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(ValueError, match="execution provider NoSuchExecutionProvider is not in this onnxruntime"):
        ExportedBackbone(folder)


@pytest.mark.parametrize("n", [5 * 1024, 5 * 1031, 64 * 49])
def test_topk_of_long_rows_equals_a_full_sort(n):
    # Long rows are narrowed to a few strided chunks first; checked against a stable full sort,
    # with rows whose largest values sit in one chunk, in the tail past the last full chunk, or
    # anywhere.
    from prefixkit.runtime.generate import _topk

    rng = np.random.default_rng(n)
    values = rng.standard_normal((4, n)).astype(np.float32)
    M = n // 64
    values[1, 7 + M * np.arange(10)] += 10  # all ten in chunk 7
    values[2, 64 * M:] += 10  # in the tail (empty when n is a multiple of 64)
    for k in (1, 2, 10, 12):
        want = np.argsort(-values, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(_topk(values, k), want)


@pytest.mark.parametrize("name, graph", GRAPHS, ids=[f"{n}-{g}" for n, g in GRAPHS])
def test_a_prompt_prefilled_in_chunks_gives_the_one_go_logits_and_cache_bit_for_bit(setups, name, graph):
    """pt-serve prefills a long prompt a chunk at a time between decode steps; with chunks of
    two tokens or more the result must be the one-go prefill's exactly, so served tokens equal
    the runtime's alone."""
    from prefixkit.runtime.session import Prefill

    _, generator, rows = setups[name, graph]
    exported = generator.exported
    for prefix, ids in rows:
        ids = (ids * 4)[:40]
        logits, (key, value) = exported.run_alone(prefix, ids)
        for sizes in ([2], [3, 7, 2, 16, 5], [16, 23], [39]):  # sizes in turn; [39]: the 1-token rest joins it
            chunked = Prefill(exported, prefix, ids, room=4)
            calls = 0
            while not chunked.advance(sizes[calls % len(sizes)]):
                calls += 1
            assert chunked.left == 0 and calls + 1 == {2: 20, 3: 7, 16: 2, 39: 1}[sizes[0]]
            got_logits, (got_key, got_value) = chunked.result()
            np.testing.assert_array_equal(got_logits, logits[-1:])
            np.testing.assert_array_equal(got_key, key)
            np.testing.assert_array_equal(got_value, value)


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "4 beams"])
def test_hugging_face_with_a_static_cache_generates_as_with_a_dynamic_one(setups, num_beams):
    """The GPU benchmark's strongest baseline (a static cache, compiled) holds the prefix as the
    reference does."""
    backbone, _, rows = setups["llama", "fused"]
    for prefix, ids in rows:
        want = hf_generate(backbone.model, prefix, ids, 12, num_beams=num_beams)
        assert hf_generate(backbone.model, prefix, ids, 12, num_beams=num_beams, static=True) == want
