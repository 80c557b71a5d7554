"""The metrics the field reports for table-to-text, computed offline.

E2E (`e2e_scores`): BLEU, NIST, METEOR, ROUGE-L and CIDEr as the E2E NLG Challenge's official
script (tuetschek/e2e-metrics, `measure_scores.py -p`, its Python BLEU/NIST mode) computes them:
  BLEU, NIST  lowercased, mteval-v13a tokenisation (sacrebleu's `13a` tokenizer), every
              reference of an input merged for clipping (max count over references); BLEU takes
              the closest reference length (the shorter on ties); NIST weighs n-grams by their
              information in all references of the corpus. Written here: no maintained package
              computes NIST this way (nltk's `corpus_nist` differs).
  METEOR, ROUGE-L, CIDEr   pycocoevalcap (the COCO caption code the official script ships) over
              PTB-tokenised text: METEOR 1.5 with `-l en -norm`, ROUGE-L (beta 1.2), CIDEr-D.
WebNLG and DART (`data_to_text_scores`): BLEU (sacrebleu, multi-bleu style, lowercased for
WebNLG), METEOR (as above) and TER (sacrebleu).
Summarisation (`rouge_scores`, the paper's XSUM table): ROUGE-1, ROUGE-2 and ROUGE-L F1 with
Google's rouge-score, Porter stemming on; with several references an input takes its best.

`hypotheses` is a list of strings, `references` a list of lists of strings (one list per input,
any number of references each).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's tokenisation, lowercased (the official script's Python mode)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _merged(refs: Sequence[Sequence[str]], n: int) -> Counter:
    """Each n-gram's largest count in any one reference: what a hypothesis may match."""
    merged: Counter = Counter()
    for ref in refs:
        for gram, count in _ngrams(ref, n).items():
            merged[gram] = max(merged[gram], count)
    return merged


def e2e_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU (0-1) with clipped n-gram precisions up to `max_n` and the brevity penalty
    against the closest reference lengths; a zero precision counts as 1e-15 so BLEU is defined."""
    hits, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for hyp, refs in zip(hypotheses, references):
        h, rs = mteval_tokens(hyp), [mteval_tokens(r) for r in refs]
        for n in range(1, max_n + 1):
            merged = _merged(rs, n)
            hits[n - 1] += sum(min(c, merged[g]) for g, c in _ngrams(h, n).items())
            totals[n - 1] += len(h) - n + 1  # as the official script: may go negative for short outputs
        hyp_len += len(h)
        ref_len += len(min(rs, key=lambda r: (abs(len(r) - len(h)), len(r))))
    log_precision = sum(math.log(max(hit, 1e-15) / max(total, 1e-9)) for hit, total in zip(hits, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / (hyp_len or 1e-5))
    return brevity * math.exp(log_precision)


NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # mteval: penalty 0.5 at 2/3 of the reference length


def e2e_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST: matched n-grams (clipped against the merged references) weighted by their
    information log2(count(w1..wn-1) / count(w1..wn)) over every reference of the corpus, summed
    per n over the hypotheses' n-gram totals, times the length penalty against the average
    reference length."""
    ref_counts: list[Counter] = [Counter() for _ in range(max_n + 1)]  # [0] counts reference words
    matched: list[list[dict]] = [[] for _ in range(max_n)]
    totals = [0] * max_n
    hyp_len, avg_ref_len = 0, 0.0
    for hyp, refs in zip(hypotheses, references):
        h, rs = mteval_tokens(hyp), [mteval_tokens(r) for r in refs]
        for n in range(1, max_n + 1):
            merged, own = _merged(rs, n), _ngrams(h, n)
            matched[n - 1].append({g: min(c, merged[g]) for g, c in own.items() if merged[g]})
            totals[n - 1] += len(h) - n + 1
            for r in rs:
                ref_counts[n].update(_ngrams(r, n))
        ref_counts[0][()] += sum(len(r) for r in rs)
        hyp_len += len(h)
        avg_ref_len += sum(len(r) for r in rs) / len(rs)

    def info(gram: tuple) -> float:
        return math.log2(ref_counts[len(gram) - 1][gram[:-1]] / ref_counts[len(gram)][gram])

    score = 0.0
    for n in range(max_n):
        gained = sum(info(g) * c for per_input in matched[n] for g, c in per_input.items())
        score += gained / totals[n] if totals[n] else 0.0
    ratio = hyp_len / avg_ref_len if avg_ref_len else 0.0
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


def ptb_tokenized(hypotheses: Sequence[str], references: Sequence[Sequence[str]]):
    """The COCO caption code's input: PTB-tokenised, lowercased, punctuation removed (Java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": h}] for i, h in enumerate(hypotheses)}
    tokenizer = PTBTokenizer()
    return tokenizer.tokenize(gts), tokenizer.tokenize(res)


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                metrics: Sequence[str] = ("METEOR", "ROUGE_L", "CIDEr")) -> tuple[dict, dict]:
    """Corpus scores and per-input scores {metric: [score per input]} from pycocoevalcap."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = ptb_tokenized(hypotheses, references)
    scorers = {"METEOR": Meteor, "ROUGE_L": Rouge, "CIDEr": Cider}
    corpus, per_input = {}, {}
    for name in metrics:
        scorer = scorers[name]()
        score, scores = scorer.compute_score(gts, res)
        corpus[name] = float(score)
        per_input[name] = [float(s) for s in scores]
        del scorer  # METEOR keeps a Java process until its scorer goes
    return corpus, per_input


def e2e_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """The E2E challenge's five metrics (corpus) and the per-input ones."""
    _check(hypotheses, references)
    corpus = {"BLEU": e2e_bleu(hypotheses, references), "NIST": e2e_nist(hypotheses, references)}
    coco, per_input = coco_scores(hypotheses, references)
    corpus.update(coco)
    per_input["sentBLEU"] = [e2e_bleu([h], [r]) for h, r in zip(hypotheses, references)]
    return corpus, per_input


def data_to_text_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                        lowercase: bool) -> tuple[dict, dict]:
    """BLEU and TER (sacrebleu; BLEU lowercased for WebNLG) and METEOR, corpus and per input."""
    import sacrebleu

    _check(hypotheses, references)
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams, lowercase=lowercase)
    ter = sacrebleu.corpus_ter(list(hypotheses), streams)
    meteor, per_input = coco_scores(hypotheses, references, ("METEOR",))
    return {"BLEU": bleu.score / 100, "METEOR": meteor["METEOR"], "TER": ter.score / 100}, per_input


def rouge_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """Corpus ROUGE-1/2/L (mean F1 over inputs) and the per-input values."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    names = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
    per_input: dict[str, list[float]] = {name: [] for name in names.values()}
    for hypothesis, refs in zip(hypotheses, references):
        best = {k: max(scorer.score(ref, hypothesis)[k].fmeasure for ref in refs) for k in names}
        for k, name in names.items():
            per_input[name].append(best[k])
    corpus = {name: sum(v) / len(v) for name, v in per_input.items()}
    return corpus, per_input


def _check(hypotheses, references) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} inputs.")
    if not hypotheses:
        raise ValueError("nothing to score.")
    if any(not refs for refs in references):
        raise ValueError("every input needs at least one reference.")


def by_group(groups: Sequence[str | None], per_input_scorer, hypotheses, references) -> dict:
    """Scores per group (e.g. WebNLG's seen / unseen categories): {group: scores}."""
    members: dict = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    return {group: per_input_scorer([hypotheses[i] for i in idx], [references[i] for i in idx])[0]
            for group, idx in members.items()}
