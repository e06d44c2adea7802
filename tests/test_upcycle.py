"""Every upcycling method against its definition (FACTS.md §1), transformers, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import random_model
from safetensors.torch import load_file, save_file

from drop_upcycling.checkpoint import (
    DTYPES,
    CheckpointReader,
    hf_dense_ffn_name,
    hf_expert_name,
    load_model,
    save_model,
)
from drop_upcycling.cli import main as cli
from drop_upcycling.configs import ModelConfig
from drop_upcycling.model import keyed_generator
from drop_upcycling.upcycle import UpcycleOptions, _mean_std, router_weights, upcycle

# Wide enough for the statistics checks: 256 neurons, 64-dim rows.
STATS_DENSE = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, name="stats-dense")
PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@pytest.fixture(scope="module")
def stats_dense_dir(tmp_path_factory) -> Path:
    """A dense model with a few giant FFN neurons, so that the statistics of a dropped slice depend on
    which neurons it holds and differ clearly from those of the whole matrix."""
    model = random_model(STATS_DENSE, 3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            f = STATS_DENSE.intermediate_size
            scale = torch.ones(f)
            scale[torch.randperm(f, generator=g)[:8]] = 30.0  # a few giant neurons: slice stats vary a lot
            offset = torch.linspace(-0.05, 0.05, f)[torch.randperm(f, generator=g)]
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight.mul_(scale[:, None]).add_(offset[:, None])
            layer.mlp.down_proj.weight.mul_(scale[None, :]).add_(offset[None, :])
    return save_model(model, tmp_path_factory.mktemp("stats") / "dense")


def _dense_ffn(dense_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    r = CheckpointReader(dense_dir)
    return {m: r.get(hf_dense_ffn_name(layer, p)) for m, p in PROJ.items()}


def _expert(moe_dir: Path, layer: int, e: int, m: str) -> torch.Tensor:
    return CheckpointReader(moe_dir).get(hf_expert_name(layer, e, m))


def _changed_neurons(new: torch.Tensor, old: torch.Tensor, m: str) -> torch.Tensor:
    axis_other = 0 if m == "w2" else 1  # neurons are rows of w1/w3 and columns of w2
    return torch.nonzero((new != old).any(dim=axis_other)).flatten()


def _digest(ckpt: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(ckpt.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- function preservation
def test_naive_moe_in_transformers_computes_the_dense_model(tiny_dense_dir: Path, tmp_path: Path) -> None:
    moe_dir = tmp_path / "nu"
    upcycle(tiny_dense_dir, moe_dir, UpcycleOptions(method="naive", ratio=0.0, num_experts=8, seed=1))
    dense_hf = transformers.LlamaForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32)
    moe_hf = transformers.MixtralForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits, moe_logits = dense_hf(ids).logits, moe_hf(ids).logits
        ours_dense, ours_moe = load_model(tiny_dense_dir)(ids).logits, load_model(moe_dir)(ids).logits
    assert (moe_logits - dense_logits).abs().max() < 1e-4
    assert (ours_dense - dense_logits).abs().max() < 1e-4
    assert (ours_moe - moe_logits).abs().max() < 1e-4


def test_non_ffn_tensors_are_copied(tiny_dense_dir: Path, tmp_path: Path) -> None:
    upcycle(tiny_dense_dir, tmp_path / "du", UpcycleOptions(method="drop", ratio=0.5, num_experts=4))
    dense, moe = CheckpointReader(tiny_dense_dir), CheckpointReader(tmp_path / "du")
    for name in dense:
        if ".mlp." not in name:
            assert torch.equal(dense.get(name), moe.get(name)), name
    assert moe.config.is_moe and moe.config.num_experts == 4 and moe.config.rope_theta == dense.config.rope_theta


# ---------------------------------------------------------------------------- drop-upcycling
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_reinitializes_exactly_int_r_dff_neurons_per_matrix(stats_dense_dir: Path, tmp_path: Path, ratio) -> None:
    out = tmp_path / "du"
    upcycle(stats_dense_dir, out, UpcycleOptions(method="drop", ratio=ratio, num_experts=4, seed=5))
    f = STATS_DENSE.intermediate_size
    for layer in range(2):
        dense = _dense_ffn(stats_dense_dir, layer)
        for e in range(4):
            sets = {}
            for m in PROJ:
                new = _expert(out, layer, e, m)
                changed = _changed_neurons(new, dense[m], m)
                assert changed.numel() == int(ratio * f), (layer, e, m)
                # untouched neurons are bit-identical copies
                keep = torch.ones(f, dtype=torch.bool)
                keep[changed] = False
                if m == "w2":
                    assert torch.equal(new[:, keep], dense[m][:, keep])
                else:
                    assert torch.equal(new[keep], dense[m][keep])
                sets[m] = set(changed.tolist())
            if ratio < 1.0:  # per-matrix (default): independent sets
                assert sets["w1"] != sets["w3"] and sets["w1"] != sets["w2"]


def _reference_drop(dense: dict[str, torch.Tensor], seed: int, layer: int, expert: int, ratio: float,
                    index_mode: str, stats: str) -> dict[str, torch.Tensor]:
    """DU as the code computed it before the conversion was made fast (np.mean/np.std of the gathered
    slice, a clone with the fresh neurons copied in): the speed work must not change a bit."""
    out = {}
    for m in PROJ:
        axis = 1 if m == "w2" else 0
        which = m if index_mode == "per-matrix" else "shared"
        d_ff = dense[m].shape[axis]
        idx = torch.randperm(d_ff, generator=keyed_generator(seed, "index", layer, expert, which))[:int(ratio * d_ff)]
        a = (dense[m].index_select(axis, idx) if stats == "dropped" else dense[m]).float().numpy()
        mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64, ddof=1))
        shape = list(dense[m].shape)
        shape[axis] = idx.numel()
        fresh = torch.empty(shape).normal_(mean, std, generator=keyed_generator(seed, "drop", layer, expert, m))
        out[m] = dense[m].clone().index_copy_(axis, idx, fresh.to(dense[m].dtype))
    return out


@pytest.mark.parametrize("index_mode,stats,dtype", [
    ("per-matrix", "dropped", "bf16"), ("per-matrix", "dropped", "fp32"), ("shared", "full", "bf16"),
    ("per-matrix", "full", "fp32"),
])
def test_drop_output_is_bitwise_the_reference_computation(stats_dense_dir: Path, tmp_path: Path, index_mode: str,
                                                          stats: str, dtype: str) -> None:
    out = tmp_path / "du"
    upcycle(stats_dense_dir, out, UpcycleOptions(method="drop", ratio=0.375, num_experts=4, seed=9, dtype=dtype,
                                                 index_mode=index_mode, stats=stats))
    for layer in range(STATS_DENSE.num_hidden_layers):
        dense = {m: t.to(DTYPES[dtype]) for m, t in _dense_ffn(stats_dense_dir, layer).items()}
        for e in range(4):
            expected = _reference_drop(dense, 9, layer, e, 0.375, index_mode, stats)
            for m in PROJ:
                assert torch.equal(_expert(out, layer, e, m), expected[m]), (layer, e, m)


def test_mean_std_is_numpys_bit_for_bit() -> None:
    """The shared-sum mean/std equals np.mean/np.std(ddof=1) exactly, whatever the size (numpy sums
    in 8192-element buffers, pairwise within) and the scale."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows, cols = (int(n) for n in torch.randint(1, 3000, (2,), generator=g))
        scale = float(10.0 ** torch.randint(-5, 3, (1,), generator=g))
        t = (torch.randn(rows, cols // 4 + 1, generator=g) * scale + scale / 3).to(torch.bfloat16)
        a = t.float().numpy()
        expected = (float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64, ddof=1)) if a.size > 1 else 0.0)
        assert _mean_std(t) == expected, t.shape


def test_shared_index_mode_uses_one_set_per_expert(stats_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "du-shared"
    upcycle(stats_dense_dir, out, UpcycleOptions(method="drop", ratio=0.5, num_experts=3, index_mode="shared"))
    dense = _dense_ffn(stats_dense_dir, 0)
    per_expert = []
    for e in range(3):
        sets = [set(_changed_neurons(_expert(out, 0, e, m), dense[m], m).tolist()) for m in PROJ]
        assert sets[0] == sets[1] == sets[2] and len(sets[0]) == 128
        per_expert.append(sets[0])
    assert per_expert[0] != per_expert[1]
    # with one shared set, half the neurons stay fully intact; with independent sets only ~1/8 do
    indep = tmp_path / "du-indep"
    upcycle(stats_dense_dir, indep, UpcycleOptions(method="drop", ratio=0.5, num_experts=1, top_k=1))
    intact = set(range(256))
    for m in PROJ:
        intact -= set(_changed_neurons(_expert(indep, 0, 0, m), dense[m], m).tolist())
    assert 10 <= len(intact) <= 60  # expectation 256/8 = 32


@pytest.mark.parametrize("stats", ["dropped", "full"])
def test_replaced_values_follow_the_source_statistics(stats_dense_dir: Path, tmp_path: Path, stats: str) -> None:
    out = tmp_path / stats
    upcycle(stats_dense_dir, out, UpcycleOptions(method="drop", ratio=0.25, num_experts=2, stats=stats, seed=9))
    dense = _dense_ffn(stats_dense_dir, 1)
    gap_to_other_mode = []
    for e in range(2):
        for m in PROJ:
            new = _expert(out, 1, e, m)
            idx = _changed_neurons(new, dense[m], m)
            axis = 1 if m == "w2" else 0
            fresh, old_slice = new.index_select(axis, idx).double(), dense[m].index_select(axis, idx).double()
            ref = old_slice if stats == "dropped" else dense[m].double()
            mu, sigma, n = ref.mean(), ref.std(), fresh.numel()
            assert abs(fresh.mean() - mu) < 5 * sigma / n**0.5, (e, m)
            assert abs(fresh.std() / sigma - 1) < 0.05, (e, m)
            other = dense[m].double() if stats == "dropped" else old_slice
            gap_to_other_mode.append(abs(fresh.std() / other.std() - 1))
    # the test can tell the modes apart: somewhere the other mode's sigma is far off
    assert max(gap_to_other_mode) > 0.1


def test_experts_differ_and_seeds_are_reproducible(tiny_dense_dir: Path, tmp_path: Path) -> None:
    opts = UpcycleOptions(method="drop", ratio=0.5, num_experts=4, seed=11)
    a, b = upcycle(tiny_dense_dir, tmp_path / "a", opts), upcycle(tiny_dense_dir, tmp_path / "b", opts)
    assert a.total_params == b.total_params
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    upcycle(tiny_dense_dir, tmp_path / "c", UpcycleOptions(method="drop", ratio=0.5, num_experts=4, seed=12))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    w = [_expert(tmp_path / "a", 0, e, "w1") for e in range(4)]
    assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i + 1, 4))


def test_output_is_independent_of_sharding_and_expert_count(tiny_dense_dir: Path, tmp_path: Path) -> None:
    """Draws are keyed by (seed, layer, expert, matrix): shard layout and the number of experts built
    do not change any expert's values."""
    upcycle(tiny_dense_dir, tmp_path / "one", UpcycleOptions(method="drop", num_experts=8, seed=3))
    upcycle(tiny_dense_dir, tmp_path / "many", UpcycleOptions(method="drop", num_experts=4, seed=3),
            max_shard_bytes=100_000)
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    for e in range(4):
        for m in PROJ:
            assert torch.equal(_expert(tmp_path / "one", 1, e, m), _expert(tmp_path / "many", 1, e, m))


# ---------------------------------------------------------------------------- the other methods
def test_noise_adds_to_int_r_dff_neurons(stats_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rnu"
    upcycle(stats_dense_dir, out, UpcycleOptions(method="noise", ratio=0.5, num_experts=2, seed=2))
    dense = _dense_ffn(stats_dense_dir, 0)
    for m in PROJ:
        new = _expert(out, 0, 1, m)
        idx = _changed_neurons(new, dense[m], m)
        assert idx.numel() == 128
        axis = 1 if m == "w2" else 0
        delta = (new.index_select(axis, idx) - dense[m].index_select(axis, idx)).double()
        # added, not replaced: the difference is the noise itself, N(0, 0.02), whatever the weight scale
        assert abs(delta.mean()) < 5 * 0.02 / delta.numel() ** 0.5
        assert abs(delta.std() - 0.02) < 0.001


def test_scratch_has_std_002_and_equals_the_models_own_init(tiny_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fs"
    upcycle(tiny_dense_dir, out, UpcycleOptions(method="scratch", ratio=0.0, num_experts=4, seed=21))
    moe = CheckpointReader(out)
    w1 = torch.stack([moe.get(hf_expert_name(0, e, "w1")) for e in range(4)])
    assert abs(w1.std() - 0.02) < 0.001
    assert torch.equal(moe.get("model.norm.weight"), torch.ones(64))
    # nothing is copied from the dense model
    dense = CheckpointReader(tiny_dense_dir)
    assert not torch.equal(moe.get("model.embed_tokens.weight"), dense.get("model.embed_tokens.weight"))
    fresh = random_model(moe.config, 21)
    loaded = load_model(out)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_btx_experts_come_from_their_sources_and_the_rest_is_averaged(tmp_path: Path) -> None:
    cfg = STATS_DENSE.replace(intermediate_size=32)
    sources = []
    for i in range(4):
        sources.append(save_model(random_model(cfg, 100 + i), tmp_path / f"src{i}"))
    out = tmp_path / "btx"
    upcycle(None, out, UpcycleOptions(method="btx", num_experts=8), sources=sources)
    readers = [CheckpointReader(s) for s in sources]
    moe = CheckpointReader(out)
    for layer in range(cfg.num_hidden_layers):
        for e in range(8):
            for m, proj in PROJ.items():
                assert torch.equal(moe.get(hf_expert_name(layer, e, m)), readers[e // 2].get(hf_dense_ffn_name(layer, proj)))
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
        mean = torch.stack([r.get(name) for r in readers]).mean(0)
        assert torch.allclose(moe.get(name), mean, atol=1e-7)


@pytest.mark.parametrize("method,mean,std", [
    ("torch_rand_002", 0.0, 0.02), ("torch_rand", 0.5, 12 ** -0.5), ("torch_rand_mean0", 0.0, 12 ** -0.5),
    ("torch_normal_002", 0.0, 0.02), ("torch_normal_028", 0.0, 0.2887),
])
def test_router_inits(method: str, mean: float, std: float) -> None:
    w = router_weights(method, 8, 2048, seed=0, layer=3).double()
    assert abs(w.mean() - mean) < 4 * std / w.numel() ** 0.5 + 1e-12
    assert abs(w.std() / std - 1) < 0.02
    if method in ("torch_rand_002", "torch_rand_mean0"):
        assert abs(w.mean()) < 1e-7 * std / 0.02  # the sample mean is subtracted, as in the released scripts


def test_router_is_not_copied_between_layers(tiny_dense_dir: Path, tmp_path: Path) -> None:
    upcycle(tiny_dense_dir, tmp_path / "m", UpcycleOptions(method="naive", ratio=0.0, num_experts=4))
    r = CheckpointReader(tmp_path / "m")
    g0, g1 = r.get("model.layers.0.block_sparse_moe.gate.weight"), r.get("model.layers.1.block_sparse_moe.gate.weight")
    assert g0.shape == (4, 64) and not torch.equal(g0, g1)


def test_dtype_options(tiny_dense_dir: Path, tmp_path: Path) -> None:
    upcycle(tiny_dense_dir, tmp_path / "bf", UpcycleOptions(method="naive", ratio=0.0, num_experts=2, dtype="bf16"))
    assert CheckpointReader(tmp_path / "bf").get("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    upcycle(tiny_dense_dir, tmp_path / "auto", UpcycleOptions(method="naive", ratio=0.0, num_experts=2))
    assert CheckpointReader(tmp_path / "auto").get("model.norm.weight").dtype == torch.float32


def test_cli_upcycle_and_dry_run(tiny_dense_dir: Path, tmp_path: Path, capsys) -> None:
    (tiny_dense_dir / "tokenizer.json").write_text("{}")  # stand-in: only copying is checked
    try:
        assert cli(["upcycle", str(tiny_dense_dir), str(tmp_path / "dry"), "--dry-run"]) == 0
        assert not (tmp_path / "dry").exists()
        assert "active" in capsys.readouterr().out
        assert cli(["upcycle", str(tiny_dense_dir), str(tmp_path / "out"), "--method", "drop", "--ratio", "0.5",
                    "--num-experts", "4", "--seed", "3"]) == 0
        out = tmp_path / "out"
        assert (out / "tokenizer.json").is_file() and (out / "upcycling.json").is_file()
        record = json.loads((out / "upcycling.json").read_text())
        assert record["options"]["seed"] == 3 and record["options"]["method"] == "drop"
    finally:
        (tiny_dense_dir / "tokenizer.json").unlink()


# ---------------------------------------------------------------------------- bad input
def _mixtral_dir(tmp_path: Path) -> Path:
    return save_model(random_model("tiny-moe"), tmp_path / "mixtral")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _missing_tensor(dense: Path, tmp: Path) -> Path:
    d = _copy(dense, tmp / "missing-tensor")
    f = d / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    return d


def _misshaped_tensor(dense: Path, tmp: Path) -> Path:
    d = _copy(dense, tmp / "misshaped")
    f = d / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, f)
    return d


def _corrupt(dense: Path, tmp: Path) -> Path:
    d = _copy(dense, tmp / "corrupt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _no_config(dense: Path, tmp: Path) -> Path:
    d = _copy(dense, tmp / "no-config")
    (d / "config.json").unlink()
    return d


BAD_SOURCES = {
    "missing dir": (lambda dense, tmp: tmp / "nope", "does not exist"),
    "missing config": (_no_config, "config.json"),
    "mixtral source": (lambda dense, tmp: _mixtral_dir(tmp), "must be a dense Llama"),
    "missing tensor": (_missing_tensor, "lacks tensor model.layers.1.mlp.up_proj.weight"),
    "misshaped tensor": (_misshaped_tensor, "has shape (64, 100), expected (64, 128)"),
    "corrupt file": (_corrupt, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_fail_cleanly(case: str, tiny_dense_dir: Path, tmp_path: Path, capsys) -> None:
    make, message = BAD_SOURCES[case]
    src = make(tiny_dense_dir, tmp_path)
    out = tmp_path / "out"
    assert cli(["upcycle", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "ratio must be in [0, 1], got 1.5"),
    (["--ratio", "-0.1"], "ratio must be in [0, 1], got -0.1"),
    (["--top-k", "9"], "top-k must be between 1 and the number of experts (8), got 9"),
    (["--method", "naive", "--ratio", "0.5"], "--ratio applies to drop and noise"),
])
def test_impossible_options(args, message, tiny_dense_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli(["upcycle", str(tiny_dense_dir), str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_btx_source_checks(tiny_dense_dir: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert cli(["upcycle", out, "--method", "btx", "--sources", *[str(tiny_dense_dir)] * 3]) == 2
    assert "exactly 4 dense checkpoints" in capsys.readouterr().err
    other_dir = save_model(random_model(STATS_DENSE), tmp_path / "other")
    assert cli(["upcycle", out, "--method", "btx", "--sources", *[str(tiny_dense_dir)] * 3, str(other_dir)]) == 2
    assert "different shape" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_dense_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["upcycle", str(tiny_dense_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(["upcycle", str(tiny_dense_dir), str(out), "--overwrite", "--num-experts", "2"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
