"""The method table and what derives from it: name parsing, order, styles, upcycle dispatch, recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drop_upcycling import methods
from drop_upcycling.configs import TrainConfig
from drop_upcycling.errors import UserError
from drop_upcycling.methods import METHODS, MOE_METHODS, UPCYCLE_METHODS, method_key, order_methods, rank
from drop_upcycling.plotstyle import OKABE_ITO, method_style
from drop_upcycling.recipes import main as recipes_main
from drop_upcycling.recipes import merge, resolve

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "recipes" / "configs" / "8x152m.yaml"


def test_the_table_is_consistent() -> None:
    for column in ("key", "slug", "order"):
        values = [getattr(m, column) for m in METHODS]
        assert len(set(values)) == len(values), column
    assert all(m.color in OKABE_ITO for m in METHODS)
    assert UPCYCLE_METHODS == ("scratch", "naive", "noise", "drop", "btx")
    assert methods.RATIO_UPCYCLE_METHODS == ("noise", "drop")
    for m in METHODS:  # every key and slug parses back to its key
        assert method_key(m.key) == m.key and method_key(f"{m.slug}-s1") == m.key


def test_every_upcycle_method_has_a_builder() -> None:
    from drop_upcycling.upcycle import EXPERT_FNS

    assert set(UPCYCLE_METHODS) == set(EXPERT_FNS) | {"scratch", "btx"}


def test_the_table_module_stays_light() -> None:
    """The analysis modules and the launchers import it: no torch, no matplotlib."""
    code = ("import sys, drop_upcycling.methods; "
            "assert not {'torch', 'matplotlib'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_order_and_styles() -> None:
    assert method_key("DU-0.25-8x1.5B") == "DU-0.25" and method_key("rnu0.1_x") == "RNU-0.1"
    assert method_key("Dense-s0") == "dense" and method_key("nux") == "nux"
    assert order_methods(["DU-0.5", "x", "dense", "BTX", "FS"]) == ["dense", "FS", "BTX", "DU-0.5", "x"]
    assert rank("dense", dense_last=True) > rank("DU-1.0", dense_last=True) and rank("FS", dense_last=True) == 0
    assert method_style("du0.25-s0").label == "Drop-Upcycling r=0.25 (DU-0.25)"
    assert method_style("DU-0.25").marker == method_style("DU-0.5").marker


def test_merge_is_key_by_key() -> None:
    base = {"a": 1, "data": {"corpus": None, "weights": {"c4": 1.0}}, "lr": 2e-4}
    assert merge(base, {"data": {"corpus": "x"}, "lr": 1e-4}) == {
        "a": 1, "data": {"corpus": "x", "weights": {"c4": 1.0}}, "lr": 1e-4}


def test_a_table_method_recipe(tmp_path: Path) -> None:
    r = resolve(BASE, "du0.5", runs="out")
    assert r.name == "8x152m_du0.5" and r.upcycle_args == ["--method", "drop", "--ratio", "0.5"]
    assert r.train["method"] == "DU-0.5" and r.train["init"] == "out/upcycled/8x152m_du0.5"
    assert r.train["out"] == "out/8x152m_du0.5" and not r.branches
    fs, btx = resolve(BASE, "fs"), resolve(BASE, "btx")
    assert fs.train["init"] is None and fs.upcycle_args == [] and btx.branches


def test_an_overlay_file_is_a_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A method without a row (another ratio, another lr) is one YAML file on top of the base."""
    over = tmp_path / "du0.25.yaml"
    over.write_text(yaml.safe_dump({"method": "DU-0.25", "lr": 1.0e-4, "upcycle": {"method": "drop", "ratio": 0.25,
                                                                                    "index_mode": "shared"}},
                                    sort_keys=False))
    assert recipes_main([str(BASE), str(over), "--runs", "r", "--write-dir", str(tmp_path / "cfg")]) == 0
    shell = capsys.readouterr().out
    assert "RECIPE_NAME=8x152m_du0.25" in shell
    assert "RECIPE_UPCYCLE=(--method drop --ratio 0.25 --index-mode shared)" in shell
    run = TrainConfig.from_yaml(tmp_path / "cfg" / "8x152m_du0.25.yaml")
    assert run.method == "DU-0.25" and run.lr == 1e-4 and run.init == "r/upcycled/8x152m_du0.25"


@pytest.mark.parametrize(("overlay", "message"), [
    ({"upcycle": {"method": "drop", "ratoi": 0.5}}, "unknown upcycle option"),
    ({"upcycle": {"method": "dropp"}}, "upcycle.method must be one of"),
    ({"lrr": 1}, "unknown training field"),
])
def test_a_bad_overlay_is_one_line(tmp_path: Path, overlay: dict, message: str) -> None:
    over = tmp_path / "bad.yaml"
    over.write_text(yaml.safe_dump(overlay))
    with pytest.raises(UserError, match=message):
        resolve(BASE, str(over))
    with pytest.raises(UserError, match="unknown method 'dux'"):
        resolve(BASE, "dux")


def test_list_is_the_tables_slugs(capsys: pytest.CaptureFixture[str]) -> None:
    assert recipes_main(["--list"]) == 0
    assert capsys.readouterr().out.split() == [m.slug for m in MOE_METHODS]
