"""A small four-domain corpus the tests write themselves, so that they need nothing outside the repository.

It has the shape of the authors' routing texts (the real corpus the product reads): the same four
file names, C4 and Japanese mC4 one document per line, English Wikipedia and The Stack blocks of lines
between blank lines. The domains differ the way the real ones do where the tests care: English web
prose, English encyclopedia articles, Japanese text (multi-byte, no spaces) and source code, so a
tokenizer, the split by document hash, the reader's domain mix, routing counts and tiny training runs
all see four distinct distributions. Everything is drawn from one seed: the same call writes the same
bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

_EN_SUBJECTS = ["the city council", "a local bakery", "our team", "the new library", "many visitors",
                "the school board", "a small startup", "the museum", "local farmers", "the river park",
                "this recipe", "the weekend market", "my neighbour", "the hiking club", "a family shop"]
_EN_VERBS = ["announced", "opened", "recommends", "celebrated", "improved", "reviewed", "shared",
             "planned", "finished", "supports", "offers", "welcomed", "delivered", "tested", "built"]
_EN_OBJECTS = ["a summer festival", "fresh bread every morning", "free parking on Sundays",
               "a guide for beginners", "new opening hours", "a discount for students", "the garden path",
               "three new trails", "an online store", "a cooking class", "better coffee", "the annual report",
               "handmade furniture", "a photo contest", "weekly yoga sessions"]
_EN_TAILS = ["this year", "last week", "for everyone", "near the station", "after the rain",
             "with great success", "on our website", "in the old town", "before the holidays",
             "at a fair price", "for the first time", "despite the weather", "together with friends"]

_WIKI_KINDS = ["river", "village", "mountain", "railway station", "species of beetle", "novel", "castle",
               "football club", "lake", "chemical compound", "painting", "university", "island", "bridge"]
_WIKI_PLACES = ["northern Italy", "central Canada", "the Scottish Highlands", "southern Chile", "Bavaria",
                "New South Wales", "eastern Finland", "the Balkans", "Patagonia", "western Kenya"]
_WIKI_FACTS = ["It was first described in {y}.", "The population was {n} at the {y} census.",
               "Its length is about {n} kilometres.", "It was rebuilt between {y} and {y2}.",
               "The name derives from an old word for {w}.", "It is listed as a protected site since {y}.",
               "The main building dates from the {c}th century.", "It has an elevation of {n} metres."]
_WIKI_WORDS = ["stone", "water", "forest", "bridge", "harbour", "meadow", "fortress", "market", "valley"]

_JA_TOPICS = ["東京", "京都", "大阪", "北海道", "この町", "私たち", "新しい店", "図書館", "学校", "駅前",
              "公園", "会社", "家族", "友達", "先生"]
_JA_OBJECTS = ["料理", "写真", "季節の花", "温泉", "本", "電車", "祭り", "映画", "音楽", "お茶", "桜",
               "地図", "天気", "旅行", "仕事"]
_JA_PREDICATES = ["を紹介します。", "がとても人気です。", "について考えました。", "を楽しみました。",
                  "が新しくなりました。", "を準備しています。", "はとてもきれいでした。", "を毎日見ています。",
                  "に行ってきました。", "を大切にしています。"]
_JA_LINKS = ["今日は", "昨日は", "週末に", "朝から", "久しぶりに", "みんなで", "ゆっくり", "初めて"]

_CODE_NAMES = ["load", "parse", "count", "merge", "render", "update", "compute", "filter", "build", "fetch",
               "encode", "split", "score", "check", "format"]
_CODE_NOUNS = ["items", "config", "tokens", "rows", "users", "records", "values", "paths", "weights", "nodes"]


def _c4(rng: random.Random, i: int) -> str:
    sentences = [f"{rng.choice(_EN_SUBJECTS).capitalize()} {rng.choice(_EN_VERBS)} {rng.choice(_EN_OBJECTS)} "
                 f"{rng.choice(_EN_TAILS)}." for _ in range(rng.randint(3, 8))]
    return f"Post {i}: " + " ".join(sentences)


def _wikipedia(rng: random.Random, i: int) -> str:
    title = f"{rng.choice(_WIKI_WORDS).capitalize()}{rng.choice(['ton', 'berg', 'ford', 'ville', 'wick'])} {i}"
    lines = [title, f"{title} is a {rng.choice(_WIKI_KINDS)} in {rng.choice(_WIKI_PLACES)}."]
    for _ in range(rng.randint(2, 5)):
        y = rng.randint(1500, 2015)
        fact = rng.choice(_WIKI_FACTS).format(y=y, y2=y + rng.randint(1, 40), n=rng.randint(10, 90_000),
                                              c=rng.randint(11, 19), w=rng.choice(_WIKI_WORDS))
        lines.append(fact)
    return "\n".join(lines)


def _ja_mc4(rng: random.Random, i: int) -> str:
    sentences = [f"{rng.choice(_JA_LINKS)}{rng.choice(_JA_TOPICS)}で{rng.choice(_JA_OBJECTS)}"
                 f"{rng.choice(_JA_PREDICATES)}" for _ in range(rng.randint(6, 14))]
    return f"記事{i} " + " ".join(sentences)  # web text: spaces between some sentences


def _code(rng: random.Random, i: int) -> str:
    name, noun = f"{rng.choice(_CODE_NAMES)}_{rng.choice(_CODE_NOUNS)}_{i}", rng.choice(_CODE_NOUNS)
    var, acc, limit = rng.choice(["item", "x", "value", "entry", "row"]), rng.choice(["out", "acc", "kept"]), \
        rng.randint(1, 100)
    test = rng.choice([f"{var} is None", f"{var} < {rng.randint(0, 9)}", f"not {var}", f"{var} % {rng.randint(2, 7)}"])
    body = [f"def {name}({noun}, limit={limit}):",
            f'    """{rng.choice(_CODE_NAMES).capitalize()} the first {limit} {noun}."""',
            f"    {acc} = []",
            f"    for {rng.choice(['i', 'k', 'n', 'idx'])}, {var} in enumerate({noun}[:limit]):",
            f"        if {test}:",
            f"            {rng.choice(['break', 'continue'])}",
            f"        {acc}.append({var} {rng.choice(['*', '+', '-', '//'])} {rng.randint(2, 9)})",
            f"    return {rng.choice([acc, f'sum({acc})', f'sorted({acc})', f'len({acc})'])}"]
    return "\n".join(body)


# domain -> (document maker, separator between documents): lines for c4/ja_mc4, blank lines otherwise.
_DOMAINS: dict[str, tuple[Callable[[random.Random, int], str], str]] = {
    "c4": (_c4, "\n"),
    "en_wikipedia": (_wikipedia, "\n\n"),
    "ja_mc4": (_ja_mc4, "\n"),
    "code_stack": (_code, "\n\n"),
}


def write_synthetic_corpus(out: Path, docs_per_domain: int = 600, seed: int = 0) -> Path:
    """Write ``out/{c4,en_wikipedia,ja_mc4,code_stack}.txt``: ``docs_per_domain`` distinct documents each."""
    out.mkdir(parents=True, exist_ok=True)
    for k, (domain, (make, sep)) in enumerate(_DOMAINS.items()):
        rng = random.Random(seed * 1000 + k)
        docs = [make(rng, i) for i in range(docs_per_domain)]
        (out / f"{domain}.txt").write_text(sep.join(docs) + "\n", encoding="utf-8")
    return out
