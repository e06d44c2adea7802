"""Metric and document helpers for the paper-suite tasks lm-eval lacks (``!function du_utils.*``).

Japanese has no spaces, so word-level metrics (BLEU with sacrebleu's default tokenizer, word F1)
would count a whole sentence as one token. Without MeCab (``sacrebleu[ja]`` needs the MeCab
binaries and a dictionary download) we score on characters: chrF (character n-gram F-score,
language-independent by design) and BLEU on characters (sacrebleu's ``char`` tokenizer); QA uses
character F1 as llm-jp-eval does. English targets (WMT20 ja-en) use standard BLEU (13a) and chrF.
"""

from __future__ import annotations

import ast
import unicodedata
from collections import Counter
from typing import Any


# ---------------------------------------------------------------------------- QA (JEMHopQA, NIILC)
def _norm(text: str) -> str:
    """NFKC (full-/half-width forms), no whitespace: answers differ in form, not content."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the character multisets of the normalized strings."""
    pred, ref = Counter(_norm(prediction)), Counter(_norm(reference))
    common = sum((pred & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def answers(doc: dict[str, Any]) -> list[str]:
    """The reference answers of a QA document (``answers`` list or a single ``answer``)."""
    value = doc.get("answers", doc.get("answer"))
    if isinstance(value, str):
        return [value]
    return [str(v) for v in (value or [])]


def first_answer(doc: dict[str, Any]) -> str:
    refs = answers(doc)
    return refs[0] if refs else ""


def qa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Best character F1 and exact match over the references for the first line of the generation."""
    pred = results[0].strip().split("\n")[0]
    refs = answers(doc) or [""]
    return {
        "char_f1": max(char_f1(pred, r) for r in refs),
        "exact_match": float(any(_norm(pred) == _norm(r) for r in refs)),
    }


# ---------------------------------------------------------------------------- WMT20
def _translation(doc: dict[str, Any]) -> dict[str, str]:
    """lighteval/sacrebleu_manual stores ``translation`` as the repr of a dict; accept a dict too."""
    t = doc["translation"]
    return ast.literal_eval(t) if isinstance(t, str) else dict(t)


def _process(dataset, src: str, tgt: str):
    def split(doc: dict[str, Any]) -> dict[str, str]:
        t = _translation(doc)
        return {"source": t[src], "target": t[tgt]}

    return dataset.map(split)


def process_wmt_en_ja(dataset):
    return _process(dataset, "en", "ja")


def process_wmt_ja_en(dataset):
    return _process(dataset, "ja", "en")


def mt_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[str, str]]:
    item = (doc["target"], results[0].strip())
    return {"chrf": item, "char_bleu": item}


def mt_process_results_en(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[str, str]]:
    item = (doc["target"], results[0].strip())
    return {"bleu": item, "chrf": item}


def _split(items: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    refs, preds = zip(*items, strict=True) if items else ((), ())
    return list(preds), [list(refs)]


def chrf_agg(items: list[tuple[str, str]]) -> float:
    """Corpus chrF (character 6-grams, beta 2) over (reference, prediction) pairs."""
    from sacrebleu.metrics import CHRF

    preds, refs = _split(items)
    return CHRF().corpus_score(preds, refs).score


def char_bleu_agg(items: list[tuple[str, str]]) -> float:
    """Corpus BLEU on characters (sacrebleu ``tokenize="char"``): BLEU for Japanese without MeCab."""
    from sacrebleu.metrics import BLEU

    preds, refs = _split(items)
    return BLEU(tokenize="char").corpus_score(preds, refs).score


def bleu_agg(items: list[tuple[str, str]]) -> float:
    """Corpus BLEU with sacrebleu's standard 13a tokenization (English targets)."""
    from sacrebleu.metrics import BLEU

    preds, refs = _split(items)
    return BLEU().corpus_score(preds, refs).score
