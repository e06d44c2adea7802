"""Routing analysis: FACTS.md §6 from the authors' released counts, metrics by hand, the CLI, and
counting from a checkpoint against an independent computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import RELEASED_COUNTS as RELEASED

from drop_upcycling.cli import main
from drop_upcycling.errors import UserError
from drop_upcycling.plotstyle import method_key, method_label, method_style, parse_formats
from drop_upcycling.routing import layer_metrics, routing_metrics, shared_top_k
from drop_upcycling.routing_csv import COUNT_COLUMNS, read_counts


@pytest.fixture(scope="module")
def released() -> pd.DataFrame:
    return read_counts(RELEASED)


# ---------------------------------------------------------------------------- FACTS §6
def test_released_counts_shape(released: pd.DataFrame) -> None:
    assert sorted(released["model"].unique()) == ["DU-0.5-8x1.5B", "FS-8x1.5B", "NU-8x1.5B"]
    assert set(released["domain"]) == {"c4", "en_wikipedia", "ja_mc4", "ja_wikipedia", "code_stack"}
    assert sorted(released["layer"].unique()) == list(range(24))
    assert sorted(released["expert"].unique()) == list(range(8))
    # Every (model, domain, layer) routed the same number of tokens, twice each (top-2): our default budget.
    from drop_upcycling.count_routing import DEFAULT_TOKENS_PER_DOMAIN

    totals = released.groupby(["model", "domain", "layer"])["assignments"].sum()
    assert (totals == 2 * DEFAULT_TOKENS_PER_DOMAIN).all()


def test_nu_routes_every_domain_to_the_same_two_experts(released: pd.DataFrame) -> None:
    """FACTS §6: NU sends every domain to the same 2 experts. In the released counts this holds in
    all 24 layers, and those two experts take at least 75% of every domain's assignments."""
    nu = shared_top_k(released, "NU-8x1.5B", k=2)
    assert len(nu) == 24
    assert nu["same_top_k"].all(), nu[~nu["same_top_k"]]
    assert nu["min_top_k_share"].min() > 0.75
    # Layer 23: experts 1 and 3 take (almost) everything.
    assert nu.set_index("layer").loc[23, "experts"] == "1,3"
    assert nu.set_index("layer").loc[23, "min_top_k_share"] > 0.99


def test_fs_and_du_route_domains_to_different_experts(released: pd.DataFrame) -> None:
    for model in ("FS-8x1.5B", "DU-0.5-8x1.5B"):
        assert not shared_top_k(released, model, k=2)["same_top_k"].any(), model
    spec = routing_metrics(released).pivot(index="layer", columns="model", values="specialization")
    assert (spec["FS-8x1.5B"] > spec["NU-8x1.5B"]).all()
    assert (spec["DU-0.5-8x1.5B"] > spec["NU-8x1.5B"]).all()
    assert spec["NU-8x1.5B"].max() < 0.2


def test_du_layer_23_leaves_four_experts_unused(released: pd.DataFrame) -> None:
    m = routing_metrics(released).set_index(["model", "layer"])
    assert m.loc[("DU-0.5-8x1.5B", 23), "unused_experts"] == 4
    # Elsewhere DU uses nearly all experts (at most one unused), unlike NU.
    du = m.loc["DU-0.5-8x1.5B"]
    assert du.drop(index=23)["unused_experts"].max() <= 1
    assert m.loc["NU-8x1.5B", "unused_experts"].min() >= 2
    assert m.loc[("DU-0.5-8x1.5B", 23), "top_expert_c4"] == 0
    assert m.loc[("DU-0.5-8x1.5B", 23), "top_expert_ja_wikipedia"] in (3, 7)


# ---------------------------------------------------------------------------- metrics by hand
def _counts(model: str, rows: dict[str, list[int]], layer: int = 0) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": model, "domain": d, "layer": layer, "expert": e, "assignments": a, "distinct_tokens": 1}
        for d, assigns in rows.items() for e, a in enumerate(assigns)
    ], columns=COUNT_COLUMNS)


def test_layer_metrics_by_hand() -> None:
    counts = _counts("m", {"c4": [50, 50, 0, 0], "code_stack": [0, 50, 49, 1]})
    mat = counts.pivot(index="domain", columns="expert", values="assignments")
    mat = mat.div(mat.sum(axis=1), axis=0)
    got = layer_metrics(mat, unused_threshold=0.02)
    pooled = np.array([0.25, 0.5, 0.245, 0.005])
    assert got["entropy"] == pytest.approx(-sum(p * math.log2(p) for p in pooled))
    h_code = -(0.5 * math.log2(0.5) + 0.49 * math.log2(0.49) + 0.01 * math.log2(0.01))
    assert got["mean_domain_entropy"] == pytest.approx((1.0 + h_code) / 2)
    assert got["unused_experts"] == 1  # expert 3: 0% and 1%; expert 2 has 49% in code
    assert got["specialization"] == pytest.approx(0.5 + 0 + 0.49 + 0.01)
    assert got["top_expert_c4"] == 0 and got["top_expert_code_stack"] == 1


def test_uniform_routing_metrics() -> None:
    counts = _counts("m", {"c4": [10] * 8, "ja_mc4": [10] * 8})
    m = routing_metrics(counts).iloc[0]
    assert m["entropy"] == pytest.approx(3.0)
    assert m["specialization"] == pytest.approx(0.0)
    assert m["unused_experts"] == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop(columns=["distinct_tokens"]), "lacks column"),
    (lambda df: df[df["expert"] != 2], "does not list experts"),
    (lambda df: df.assign(assignments=df["assignments"] * 0.5), "non-negative integers"),
    (lambda df: df.assign(assignments=-1), "non-negative integers"),
    (lambda df: pd.concat([df, df]), "does not list experts"),
    (lambda df: df.assign(assignments=0), "no assignments"),
])
def test_bad_counts_are_user_errors(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "bad.csv"
    mutate(_counts("m", {"c4": [3, 1, 2, 4]})).to_csv(path, index=False)
    with pytest.raises(UserError, match=message):
        read_counts(path)


def test_same_model_in_two_files_is_refused(tmp_path: Path) -> None:
    for name in ("a.csv", "b.csv"):
        _counts("m", {"c4": [3, 1]}).to_csv(tmp_path / name, index=False)
    with pytest.raises(UserError, match="duplicate counts"):
        read_counts([tmp_path / "a.csv", tmp_path / "b.csv"])


# ---------------------------------------------------------------------------- CLI
def test_analyze_routing_cli(tmp_path: Path, released: pd.DataFrame, capsys) -> None:
    # Two files (one model each) to exercise the multi-file path, drawn as SVG and PNG.
    paths = []
    for model in ("NU-8x1.5B", "DU-0.5-8x1.5B"):
        p = tmp_path / f"{model}.csv"
        released[released["model"] == model].to_csv(p, index=False)
        paths.append(str(p))
    out = tmp_path / "out"
    rc = main(["analyze", "routing", "--counts", *paths, "--out", str(out), "--formats", "png,svg",
               "--layers", "0", "23"])
    assert rc == 0
    metrics = pd.read_csv(out / "routing_metrics.csv")
    assert list(metrics.columns[:7]) == ["model", "layer", "num_experts", "entropy", "mean_domain_entropy",
                                         "unused_experts", "specialization"]
    assert len(metrics) == 48
    assert {f"top_expert_{d}" for d in released["domain"].unique()} <= set(metrics.columns)
    png = (out / "routing_fig5.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "routing_fig5.svg").read_text().lstrip().startswith("<?xml")
    assert "DU-0.5-8x1.5B" in capsys.readouterr().out


def test_analyze_routing_cli_errors(tmp_path: Path, capsys) -> None:
    assert main(["analyze", "routing", "--counts", str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "routing", "--counts", str(RELEASED), "--out", str(tmp_path / "o"),
                 "--layers", "99"]) == 2
    assert "layer(s) 99" in capsys.readouterr().err
    assert main(["analyze", "routing", "--counts", str(RELEASED), "--out", str(tmp_path / "o"),
                 "--formats", "jpg"]) == 2
    assert "figure format" in capsys.readouterr().err
    assert not (tmp_path / "o" / "routing_fig5.png").exists()


def test_analysis_half_imports_no_torch() -> None:
    """Figure 5 and the metrics from released counts need neither torch nor the model code: the
    analysis module and the counts format it reads import only pandas-level dependencies."""
    code = ("import sys, drop_upcycling.routing, drop_upcycling.routing_csv; "
            "sys.exit(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('drop_upcycling.model', "
            "'drop_upcycling.count_routing'))) or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- plot style
def test_method_names() -> None:
    assert method_key("DU-0.5-8x1.5B") == "DU-0.5"
    assert method_key("NU-8x1.5B") == "NU"
    assert method_key("rnu-0.5_8x152m") == "RNU-0.5"
    assert method_label("NU") == "naive upcycling (NU)"
    assert method_label("DU-0.5") == "Drop-Upcycling r=0.5 (DU-0.5)"
    assert method_label("FS") == "from scratch (FS)"
    assert method_label("RNU-0.5") == "noise upcycling (RNU-0.5)"
    assert method_label("dense") == "dense"
    assert method_label("DU-0.5-8x1.5B") == "Drop-Upcycling r=0.5 (DU-0.5), 8x1.5B"
    assert method_label("DU-0.25") == "Drop-Upcycling r=0.25 (DU-0.25)"
    assert method_style("DU-0.25").color == method_style("DU-0.25").color  # deterministic
    colors = [method_style(k).color for k in ("dense", "FS", "NU", "RNU-0.5", "DU-0.5", "DU-1.0", "BTX")]
    assert len(set(colors)) == len(colors)
    assert parse_formats("PNG, pdf") == ["png", "pdf"]
    with pytest.raises(UserError):
        parse_formats("gif")


# ---------------------------------------------------------------------------- counting
def test_counter_by_hand() -> None:
    import torch

    from drop_upcycling.count_routing import RoutingCounter

    counter = RoutingCounter(num_layers=2, num_experts=4, vocab_size=10)
    ids = torch.tensor([[5, 5, 7]])
    layer0 = torch.tensor([[0, 1], [0, 1], [1, 2]])
    layer1 = torch.tensor([[3, 2], [2, 3], [3, 2]])
    counter.update(ids, [layer0, layer1])
    counter.update(torch.tensor([[9]]), [torch.tensor([[0, 3]]), torch.tensor([[0, 1]])])
    rows = pd.DataFrame(counter.rows("m", "c4")).set_index(["layer", "expert"])
    assert rows.loc[0, "assignments"].tolist() == [3, 3, 1, 1]
    assert rows.loc[0, "distinct_tokens"].tolist() == [2, 2, 1, 1]  # e0 {5, 9}, e1 {5, 7}, e2 {7}, e3 {9}
    assert rows.loc[1, "assignments"].tolist() == [1, 1, 3, 3]
    assert rows.loc[1, "distinct_tokens"].tolist() == [1, 1, 2, 2]
    assert counter.tokens == 4


def _hf_counts(ckpt: Path, chunks: list, domain: str) -> pd.DataFrame:
    """Independent reference: transformers' Mixtral router logits -> softmax -> top-k, counted in numpy."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = hf.config
    assign = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), dtype=np.int64)
    seen = [[set() for _ in range(cfg.num_local_experts)] for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        for chunk in chunks:
            out = hf(chunk[None], output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(torch.softmax(logits.float(), -1), cfg.num_experts_per_tok, -1).indices.numpy()
                for tok, experts in zip(chunk.tolist(), top, strict=True):
                    for e in experts:
                        assign[layer, e] += 1
                        seen[layer][e].add(tok)
    return pd.DataFrame([
        {"model": ckpt.name, "domain": domain, "layer": layer, "expert": e, "assignments": int(assign[layer, e]),
         "distinct_tokens": len(seen[layer][e])}
        for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)
    ], columns=COUNT_COLUMNS)


def test_count_routing_matches_transformers(tiny_moe_dir: Path) -> None:
    import torch

    from drop_upcycling.checkpoint import load_model
    from drop_upcycling.count_routing import count_checkpoint

    gen = torch.Generator().manual_seed(0)
    # Token ids from a narrow range so that tokens repeat and distinct counts differ from assignments;
    # a shorter last chunk exercises the batching of unequal lengths.
    chunks = {"c4": [torch.randint(0, 40, (32,), generator=gen) for _ in range(3)] + [torch.randint(0, 40, (7,))],
              "code_stack": [torch.randint(100, 500, (32,), generator=gen) for _ in range(2)]}
    model = load_model(tiny_moe_dir)
    got = count_checkpoint(model, chunks, tiny_moe_dir.name, batch_size=2, progress=False)
    expected = pd.concat([_hf_counts(tiny_moe_dir, c, d) for d, c in chunks.items()], ignore_index=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)
    # Every token is routed to exactly K experts per layer.
    per_layer = got.groupby(["domain", "layer"])["assignments"].sum()
    assert (per_layer.loc["c4"] == 2 * (3 * 32 + 7)).all() and (per_layer.loc["code_stack"] == 2 * 64).all()


def test_count_routing_refuses_dense(tiny_dense_dir: Path) -> None:
    import torch

    from drop_upcycling.checkpoint import load_model
    from drop_upcycling.count_routing import count_routing

    with pytest.raises(UserError, match="dense model"):
        count_routing(load_model(tiny_dense_dir), [torch.zeros(4, dtype=torch.long)], "d", "c4")


# ---------------------------------------------------------------------------- routing CKPT (CLI)
@pytest.fixture(scope="module")
def small_split(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(prepared data root, its splits folder, its tokenizer dir) from the first documents of each domain."""
    from drop_upcycling.data import prepare_all

    prepared = prepare_all(corpus=corpus_dir, cache_dir=tmp_path_factory.mktemp("data"), vocab_size=512,
                           max_docs_per_domain=150, test_fraction=0.2, pinned=False)
    return Path(prepared.root), Path(prepared.splits_dir), Path(prepared.tokenizer_dir)


def test_routing_cli_counts_test_split(small_split: tuple[Path, Path], tiny_moe_dir: Path, tmp_path: Path) -> None:
    import torch
    from tokenizers import Tokenizer

    from drop_upcycling.checkpoint import load_model
    from drop_upcycling.count_routing import count_checkpoint

    _, splits, tok_dir = small_split
    out = tmp_path / "counts"
    budget, chunk = 300, 128
    rc = main(["routing", str(tiny_moe_dir), "--out", str(out), "--splits", str(splits), "--tokenizer", str(tok_dir),
               "--tokens-per-domain", str(budget), "--chunk-len", str(chunk), "--batch-size", "2"])
    assert rc == 0
    got = pd.read_csv(out / "routing_counts.csv")
    assert list(got.columns) == list(pd.read_csv(RELEASED, nrows=1).columns) == COUNT_COLUMNS
    meta = json.loads((out / "routing_counts.json").read_text())
    assert meta["tokens_per_domain"] == dict.fromkeys(["c4", "en_wikipedia", "ja_mc4", "code_stack"], budget)

    # Independent stream: encode each test document in file order, EOS after each, first `budget` tokens,
    # cut into `chunk`-token pieces; count those with the (separately verified) counter.
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    chunks = {}
    for domain in meta["tokens_per_domain"]:
        stream: list[int] = []
        for line in (splits / "test" / f"{domain}.jsonl").read_text().splitlines():
            stream += [*tokenizer.encode(json.loads(line)["text"]).ids, eos]
        stream = stream[:budget]
        chunks[domain] = [torch.tensor(stream[i:i + chunk]) for i in range(0, budget, chunk)]
    expected = count_checkpoint(load_model(tiny_moe_dir), chunks, tiny_moe_dir.name, progress=False)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)

    # The counts feed the analysis directly; a second run refuses to overwrite.
    assert main(["analyze", "routing", "--counts", str(out), "--out", str(tmp_path / "a")]) == 0
    assert pd.read_csv(tmp_path / "a" / "routing_metrics.csv")["model"].unique().tolist() == [tiny_moe_dir.name]
    assert main(["routing", str(tiny_moe_dir), "--out", str(out), "--splits", str(splits),
                 "--tokenizer", str(tok_dir)]) == 2


def test_routing_cli_default_reads_the_routing_texts_whole(pinned_corpus: Path, small_split: tuple[Path, Path, Path],
                                                           tiny_moe_dir: Path, tmp_path: Path) -> None:
    """The default text is the released analysis's: each domain's corpus file encoded at once, full
    chunks only, up to the budget; an explicit --splits still reads the test split."""
    import torch
    from tokenizers import Tokenizer

    from drop_upcycling.checkpoint import load_model
    from drop_upcycling.count_routing import count_checkpoint

    _, splits, tok_dir = small_split
    budget, chunk = 1000, 128  # 7 full chunks (896 tokens): the partial eighth is dropped, as in the release
    out = tmp_path / "counts"
    assert main(["routing", str(tiny_moe_dir), "--out", str(out), "--corpus", str(pinned_corpus), "--tokenizer",
                 str(tok_dir), "--tokens-per-domain", str(budget), "--chunk-len", str(chunk), "--domains", "c4",
                 "ja_mc4"]) == 0
    meta = json.loads((out / "routing_counts.json").read_text())
    assert meta["source"].startswith("routing texts") and meta["tokens_per_domain"] == {"c4": 896, "ja_mc4": 896}
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    chunks = {}
    for domain in ("c4", "ja_mc4"):
        ids = tokenizer.encode((pinned_corpus / f"{domain}.txt").read_text(encoding="utf-8")).ids
        chunks[domain] = [torch.tensor(ids[i:i + chunk]) for i in range(0, 896, chunk)]
    expected = count_checkpoint(load_model(tiny_moe_dir), chunks, tiny_moe_dir.name, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "routing_counts.csv"), expected, check_dtype=False)
    # A test split is still one flag away, and asking for both is one clear error.
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "t"), "--splits", str(splits), "--tokenizer",
                 str(tok_dir), "--tokens-per-domain", "256", "--chunk-len", str(chunk)]) == 0
    assert json.loads((tmp_path / "t" / "routing_counts.json").read_text())["source"] == "JSONL documents"
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "x"), "--splits", str(splits),
                 "--text", "routing-texts", "--tokenizer", str(tok_dir)]) == 2
    assert not (tmp_path / "x").exists()


def test_report_says_which_text_the_routing_counts_came_from(tmp_path: Path) -> None:
    from drop_upcycling.report import routing_text_sources

    for label, source in (("a", "routing texts: x"), ("b", "prepared test shards"), ("c", "routing texts: x")):
        (tmp_path / label).mkdir()
        (tmp_path / label / "routing_counts.csv").write_text("")
        (tmp_path / label / "routing_counts.json").write_text(json.dumps({"source": source}))
    csvs = sorted(tmp_path.glob("*/routing_counts.csv"))
    assert routing_text_sources(csvs) == ["routing texts: x", "prepared test shards"]


def test_routing_cli_errors(small_split: tuple[Path, Path], tiny_moe_dir: Path, tiny_dense_dir: Path,
                            tmp_path: Path, capsys) -> None:
    _, splits, tok_dir = small_split
    common = ["--splits", str(splits), "--tokenizer", str(tok_dir)]
    assert main(["routing", str(tiny_dense_dir), "--out", str(tmp_path / "a"), *common]) == 2
    assert "dense model" in capsys.readouterr().err
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "b"), *common, "--domains", "klingon"]) == 2
    assert "klingon" in capsys.readouterr().err
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "c"), "--splits", str(splits)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["routing", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), *common]) == 2
    assert not (tmp_path / "b" / "routing_counts.csv").exists()


def test_routing_cli_prepared_shards_match_text_path(small_split: tuple[Path, Path, Path], tiny_moe_dir: Path,
                                                    tmp_path: Path) -> None:
    """--data reads the pre-tokenized test shards; tokenizing the test documents gives the same stream,
    so with a whole number of windows both paths count exactly the same tokens."""
    root, splits, tok_dir = small_split
    opts = ["--tokens-per-domain", "256", "--chunk-len", "128", "--domains", "c4", "code_stack"]
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "shards"), "--data", str(root), *opts]) == 0
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "text"), "--splits", str(splits),
                 "--tokenizer", str(tok_dir), *opts]) == 0
    meta = json.loads((tmp_path / "shards" / "routing_counts.json").read_text())
    assert meta["source"] == "prepared test shards"
    assert meta["tokens_per_domain"] == {"c4": 256, "code_stack": 256}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "shards" / "routing_counts.csv"),
                                  pd.read_csv(tmp_path / "text" / "routing_counts.csv"))
