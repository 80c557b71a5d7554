"""Tiny random backbones and a tokenizer built offline, so the suite never needs the network
(apart from the one real-model class, which fetches smollm2-135m once into the cache)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# prefixkit's kernels on any CPU, also where the default ("auto") would leave them out for want
# of AVX-512: the suite checks their portable path too. Child processes inherit it.
os.environ.setdefault("PREFIXKIT_KERNELS", "1")

DATA = Path(__file__).parent / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# `make check` leaves these out (marker `slow`): the README runner, tests that start servers
# or other processes, tests that train until something is learnt, and the real model (marker
# `real_model`). A module name alone marks the whole module; with names, those tests only.
SLOW = {
    "test_readme": None,
    "test_server": None,
    "test_server_limits": None,
    "test_fuzz": None,
    "test_prefix_serving": None,
    "test_object_store": None,
    "test_ray_serve": None,
    "test_code_paths": None,
    "test_training": {"test_prefix_memorises_eight_examples_to_near_zero_loss",
                      "test_ctrl_c_on_pt_train_leaves_a_checkpoint_that_resume_completes",
                      "test_two_process_accelerate_run_ends_with_identical_prefixes_on_both_ranks",
                      "test_pt_train_cli_writes_a_prefix_the_runtime_loads_with_its_meta",
                      "test_pt_train_explains_bad_options_in_one_sentence"},
    "test_eval": {"test_e2e_metrics_reproduce_the_official_script_to_four_decimals",
                  "test_webnlg_style_scores_lowercase_bleu_and_count_ter_edits",
                  "test_pt_eval_writes_generations_scores_and_a_summary",
                  "test_pt_eval_splits_webnlg_into_seen_and_unseen_categories",
                  "test_no_score_then_rescore_gives_the_scores_of_one_run"},
    "test_seq2seq": {"test_a_prefix_learns_to_reverse_then_is_exported_and_served",
                     "test_pt_train_on_t5_writes_a_format_2_prefix_its_export_generates_with"},
    "test_export": {"test_cli_exports_and_reports_a_bad_backbone_in_one_line"},
    "test_backbones": {"test_demo_reports_a_bad_backbone_in_one_line_without_traceback"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in SLOW and (SLOW[module] is None or item.originalname in SLOW[module]):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_export(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama exported once (fused graph) into a folder named "tiny", and its backbone,
    for the modules that serve it; none of them writes into the export."""
    from prefixkit.exporter.backbones import load_backbone
    from prefixkit.exporter.onnx_export import export_backbone

    folder = tmp_path_factory.mktemp("tiny-export") / "tiny"
    export_backbone(str(tiny_llama_dir), folder, graph="fused")
    return folder, load_backbone(tiny_llama_dir)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3-compatible server on loopback with a bucket "prefixes", and the environment
    (set for this process and the servers it starts) through which boto3 finds it."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "prefixkit-test",
           "AWS_SECRET_ACCESS_KEY": "prefixkit-test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        boto3.client("s3").create_bucket(Bucket="prefixes")
        yield env
    server.stop()


def e2e_rows() -> list[dict[str, str]]:
    with open(DATA / "e2e_sample.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained with `tokenizers` on the E2E sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [text for row in e2e_rows() for text in (row["mr"], row["ref"])]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def _save_tiny(config, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """Random GPT-2: 2 layers, 4 heads, 32 wide, tied embeddings, as a Hugging Face folder."""
    from transformers import AutoTokenizer, GPT2Config

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_positions=128, vocab_size=vocab,
        bos_token_id=0, eos_token_id=2, pad_token_id=2,
    )
    return _save_tiny(config, tokenizer_dir, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """Random Llama with grouped-query attention: 4 query heads of 16 share 2 KV heads (16 is
    the smallest head size ONNX Runtime's fused GroupQueryAttention kernel takes)."""
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        head_dim=16, intermediate_size=64, max_position_embeddings=128, vocab_size=vocab,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=2,
    )
    return _save_tiny(config, tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(params=["tiny_gpt2_dir", "tiny_llama_dir"])
def tiny_backbone_dir(request) -> Path:
    return request.getfixturevalue(request.param)


# Wider random backbones for the memorisation tests. The small ones above are initialised with
# std 0.02: after the final norm their logits stay within about ±0.6, so no prefix can make them
# confident. These (std 0.1, 256 wide, 4 layers) can be steered, and stay fast on a CPU.
@pytest.fixture(scope="session")
def wide_llama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = LlamaConfig(
        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, hidden_size=256, head_dim=16,
        intermediate_size=512, max_position_embeddings=128, vocab_size=vocab, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=2, initializer_range=0.1,
    )
    return _save_tiny(config, tokenizer_dir, tmp_path_factory.mktemp("wide-llama"))


@pytest.fixture(scope="session")
def wide_gpt2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, GPT2Config

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = GPT2Config(
        n_layer=4, n_head=16, n_embd=256, n_positions=128, vocab_size=vocab,
        bos_token_id=0, eos_token_id=2, pad_token_id=2, initializer_range=0.1,
    )
    return _save_tiny(config, tokenizer_dir, tmp_path_factory.mktemp("wide-gpt2"))


def _save_tiny_seq2seq(config, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bart_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """Random BART: 2 encoder and 2 decoder layers, 4 heads of 16, learned positions, std 0.1
    (steerable by a prefix, as the wide decoder-only models below)."""
    from transformers import AutoTokenizer, BartConfig

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = BartConfig(
        vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=2, pad_token_id=2, decoder_start_token_id=0, forced_eos_token_id=None,
        init_std=0.1, dropout=0.0, attention_dropout=0.0,
    )
    return _save_tiny_seq2seq(config, tokenizer_dir, tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """Random T5 (v1.1 style: gated GELU, untied head): 2+2 layers, 4 heads of 16, relative
    position buckets."""
    from transformers import AutoTokenizer, T5Config

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = T5Config(
        vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, eos_token_id=2, pad_token_id=2, decoder_start_token_id=0,
        initializer_factor=2.0, dropout_rate=0.0,
    )
    return _save_tiny_seq2seq(config, tokenizer_dir, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["tiny_bart_dir", "tiny_t5_dir"])
def tiny_seq2seq_dir(request) -> Path:
    return request.getfixturevalue(request.param)
