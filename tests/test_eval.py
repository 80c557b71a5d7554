"""pt-eval's metrics against the official E2E script's published values and hand-checked cases,
and pt-eval end to end on a tiny export."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA
from prefixkit.evaluation.metrics import data_to_text_scores, e2e_bleu, e2e_nist, e2e_scores

BIN = Path(sys.executable).parent
EXAMPLE = DATA / "e2e_metrics_example"


def official_example() -> tuple[list[str], list[list[str]]]:
    refs: list[list[str]] = [[]]
    for line in (EXAMPLE / "devel-conc.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            refs[-1].append(line.strip())
        elif refs[-1]:
            refs.append([])
    if not refs[-1]:
        refs.pop()
    hyps = [line.strip() for line in (EXAMPLE / "baseline-output.txt").read_text(encoding="utf-8").splitlines()]
    return hyps, refs


def test_e2e_metrics_reproduce_the_official_script_to_four_decimals():
    # tuetschek/e2e-metrics, measure_scores.py -p on its example inputs (../shared/data SCORES.md).
    hyps, refs = official_example()
    assert len(hyps) == len(refs) == 10
    corpus, per_input = e2e_scores(hyps, refs)
    official = {"BLEU": 0.7203, "NIST": 7.7889, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}
    assert {k: round(corpus[k], 4) for k in official} == official
    assert all(len(v) == 10 for v in per_input.values())


def test_bleu_by_hand_and_against_sacrebleu():
    # "a b c d e" against "a b c d f": precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty.
    assert e2e_bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # Lowercased, and a shorter output pays exp(1 - r/c): "A b c d" against "a b c d e".
    assert e2e_bleu(["A b c d"], [["a b c d e"]]) == pytest.approx(math.exp(1 - 5 / 4))
    # sacrebleu (mteval-v13a too) agrees on a corpus with two references per input.
    import sacrebleu

    hyps, refs = official_example()
    two = [r[:2] for r in refs]
    expected = sacrebleu.corpus_bleu(hyps, [list(x) for x in zip(*two)], lowercase=True).score / 100
    assert e2e_bleu(hyps, two) == pytest.approx(expected, abs=1e-9)


def test_nist_by_hand():
    # Output = reference = "a b": unigrams each carry log2(2/1) = 1 bit, the bigram log2(1/1) = 0;
    # 2 bits over 2 unigrams, 0 over 1 bigram: NIST 1.0 (3- to 5-grams: none).
    assert e2e_nist(["a b"], [["a b"]], max_n=2) == pytest.approx(1.0)
    # Half the reference's length: the length penalty exp(-beta * ln(0.5)^2), beta = -ln 0.5 / ln(1.5)^2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    got = e2e_nist(["a"], [["a b"]], max_n=1)
    assert got == pytest.approx(1.0 * math.exp(-beta * math.log(0.5) ** 2))


def test_webnlg_style_scores_lowercase_bleu_and_count_ter_edits():
    scores, per_input = data_to_text_scores(["A b c d"], [["a b c d"]], lowercase=True)
    assert scores["BLEU"] == pytest.approx(1.0) and scores["TER"] == 0.0  # sacrebleu's TER ignores case
    assert 0 < scores["METEOR"] <= 1 and len(per_input["METEOR"]) == 1
    scores, _ = data_to_text_scores(["a b c e"], [["a b c d"]], lowercase=False)
    assert scores["TER"] == pytest.approx(1 / 4)  # one substitution in four reference words


@pytest.fixture(scope="module")
def tiny_export_and_prefix(tiny_llama_dir, tiny_export, tmp_path_factory):
    from prefixkit.exporter import load_backbone
    from prefixkit.exporter.reference import kv_of_text
    from prefixkit.runtime import make_meta, save_prefix
    from prefixkit.runtime.prefix import Prefix

    root = tmp_path_factory.mktemp("eval")
    (root / "tiny").symlink_to(tiny_export[0])  # the session's tiny export, read only
    backbone = load_backbone(tiny_llama_dir)
    key, value = kv_of_text(backbone.model, torch.tensor([[5, 6, 7]]))
    save_prefix(root / "p.npz", Prefix(key, value, make_meta(backbone.fingerprint, 3, template="{input}\n")))
    return root


def test_pt_eval_writes_generations_scores_and_a_summary(tiny_export_and_prefix, tmp_path):
    root = tiny_export_and_prefix
    done = subprocess.run(
        [str(BIN / "pt-eval"), str(DATA / "e2e_sample.csv"), "--export", str(root / "tiny"),
         "--prefix", str(root / "p.npz"), "--limit", "3", "--num-beams", "2", "--max-new-tokens", "8",
         "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # stderr is a pipe, not a terminal: progress comes as lines, the last one at the end
    assert re.search(r"^generating: 3/3 inputs \(100%\), [\d.]+ inputs/s, [\d,]+ tokens/s, \d+s elapsed$",
                     done.stderr, re.M), done.stderr
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(report["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert report["inputs"] == 3 and report["settings"]["num_beams"] == 2
    assert report["settings"]["template"] == "{input}\n"
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["references"]) > 1 for r in rows)
    # The corpus scores are those of the written outputs.
    again, _ = e2e_scores([r["output"] for r in rows], [r["references"] for r in rows])
    assert again["BLEU"] == pytest.approx(report["scores"]["BLEU"])
    assert "| all |" in (tmp_path / "out" / "summary.md").read_text()


WEBNLG_RUN = ["--num-beams", "1", "--max-new-tokens", "6", "--seen-categories", "Airport"]


@pytest.fixture(scope="module")
def webnlg_eval(tiny_export_and_prefix):
    """One scored pt-eval run over the WebNLG sample (scoring runs Java's METEOR: done once)."""
    root = tiny_export_and_prefix
    out = root / "webnlg-eval"
    done = subprocess.run(
        [str(BIN / "pt-eval"), str(DATA / "webnlg_sample.xml"), "--export", str(root / "tiny"),
         "--prefix", str(root / "p.npz"), *WEBNLG_RUN, "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_pt_eval_splits_webnlg_into_seen_and_unseen_categories(webnlg_eval):
    report = json.loads((webnlg_eval / "scores.json").read_text())
    assert set(report["scores"]) == {"BLEU", "METEOR", "TER"}
    assert set(report["by_split"]) == {"seen", "unseen"} and report["inputs"] == 5


def test_no_score_then_rescore_gives_the_scores_of_one_run(tiny_export_and_prefix, webnlg_eval, tmp_path):
    """--no-score generates without Java (e.g. on a GPU machine); --rescore scores those generations later."""
    root = tiny_export_and_prefix
    split = subprocess.run([str(BIN / "pt-eval"), str(DATA / "webnlg_sample.xml"), "--export", str(root / "tiny"),
                            "--prefix", str(root / "p.npz"), *WEBNLG_RUN, "--no-score", "-o", str(tmp_path / "split")],
                           capture_output=True, text=True, timeout=600)
    assert split.returncode == 0, split.stderr
    pending = json.loads((tmp_path / "split" / "scores.json").read_text())
    assert pending["scores"] is None and not (tmp_path / "split" / "summary.md").exists()
    rescored = subprocess.run([str(BIN / "pt-eval"), "--rescore", "-o", str(tmp_path / "split")],
                              capture_output=True, text=True, timeout=600)
    assert rescored.returncode == 0, rescored.stderr
    a = json.loads((webnlg_eval / "scores.json").read_text())
    b = json.loads((tmp_path / "split" / "scores.json").read_text())
    assert b["scores"] == a["scores"] and b["by_split"] == a["by_split"]
    assert (tmp_path / "split" / "generations.jsonl").read_text() == (webnlg_eval / "generations.jsonl").read_text()
    missing = subprocess.run([str(BIN / "pt-eval"), "--rescore", "-o", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no generations of a pt-eval run" in missing.stderr


def test_rouge_matches_hand_computed_values_with_stemming_and_the_best_reference():
    from prefixkit.evaluation.metrics import rouge_scores

    # unigrams: 5 of 6 shared (the x2, cat, on, mat); bigrams: 3 of 5 (the cat, on the, the mat);
    # longest common subsequence: "the cat on the mat", 5 of 6.
    corpus, per_input = rouge_scores(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert corpus["ROUGE-1"] == pytest.approx(5 / 6)
    assert corpus["ROUGE-2"] == pytest.approx(3 / 5)
    assert corpus["ROUGE-L"] == pytest.approx(5 / 6)
    # Porter stemming: cats/cat and running/runs meet; the better of two references counts.
    corpus, per_input = rouge_scores(["cats running", "a b"], [["dog", "cat runs"], ["a c", "x y"]])
    assert per_input["ROUGE-1"] == pytest.approx([1.0, 0.5])
    assert corpus["ROUGE-1"] == pytest.approx(0.75)
