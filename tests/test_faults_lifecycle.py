"""Faults in a run's life: nothing lost, every bad input one line.

Resume never destroys a run; two writers of one output exclude each other; NaN options and weights,
operating-system errors at the output (read-only, not a folder, disk full) and SIGTERM end in one
line with nothing half-written left; SIGKILL's leftovers are removed by the next run; outputs get the
modes the umask asks for; a failing torchrun rank ends the launcher's output in one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from drop_upcycling import checkpoint, fsio, train
from drop_upcycling.cli import main as cli
from drop_upcycling.data import prepare_all
from drop_upcycling.errors import UserError
from drop_upcycling.parallel import free_port

# A tiny MoE on the synthetic corpus: 4 steps of 8 sequences of 32 tokens take about a second.
TRAIN = {"model": {"base": "tiny-moe", "vocab_size": 512}, "seq_len": 32, "global_batch_tokens": 256,
         "micro_batch_size": 2, "steps": 4, "save_every": 1, "keep_last": 10, "lr": 3e-3, "min_lr": 3e-4,
         "warmup_steps": 1, "seed": 0, "dtype": "fp32"}


# ---------------------------------------------------------------------------- helpers
def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _one_line(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """The one line on stderr (progress bars, which hold ``%|``, aside) and that it says ``needles``."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    err = "\n".join(lines)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _leftovers(folder: Path) -> list[str]:
    """Hidden entries (temp dirs, trash, locks) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def _train(config: Path, *argv: str) -> int:
    """``drop-upcycling train CONFIG ...`` in this process (one rank)."""
    return cli(["train", str(config), *argv])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def train_config(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("faults-train")
    d = {**TRAIN, "data": {"corpus": str(corpus_dir), "pinned": False, "cache_dir": str(root / "cache"),
                           "vocab_size": 512, "max_docs_per_domain": 200}}
    (root / "run.yaml").write_text(yaml.safe_dump(d))
    data = d["data"]  # prepared here, so that the tests' stderr holds only what they check
    prepare_all(data["corpus"], data["cache_dir"], data["vocab_size"], max_docs_per_domain=data["max_docs_per_domain"],
                pinned=False)
    return root / "run.yaml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, train_config: Path) -> Path:
    """A finished 4-step run with a checkpoint after every step (all kept)."""
    out = tmp_path_factory.mktemp("faults-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _single_rank(mp)
        assert _train(train_config, "--out", str(out)) == 0
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _single_rank(monkeypatch)
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _config_with(tmp_path: Path, base: Path, **changes) -> Path:
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(base.read_text()), **changes}))
    return path


# ---------------------------------------------------------------------------- 1. resume never destroys a run
def _drop_latest(out: Path) -> None:
    shutil.rmtree(out / "checkpoints" / "step-00000004")


def _break_latest(out: Path) -> None:
    (out / "checkpoints" / "step-00000004" / "trainer" / "state.json").unlink()


def _latest_names_missing(out: Path) -> None:
    (out / "checkpoints" / "latest").write_text("step-00000009\n")


@pytest.mark.parametrize("damage", [_drop_latest, _break_latest, _latest_names_missing],
                         ids=["latest-folder-deleted", "latest-incomplete", "latest-names-missing-step"])
def test_resume_continues_from_the_newest_complete_checkpoint(run_copy: Path, train_config: Path, damage,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = _metrics(run_copy)
    damage(run_copy)
    newest = 4 if damage is _latest_names_missing else 3
    assert _train(train_config, "--out", str(run_copy), "--resume") == 0
    after = _metrics(run_copy)
    assert after[:newest] == before[:newest]  # not retrained: the very same lines (tokens_per_s included)
    for a, b in zip(after, before, strict=True):
        assert a["loss"] == b["loss"] and a["step"] == b["step"]  # bitwise the same run
    ckpts = sorted(p.name for p in (run_copy / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{s:08d}" for s in range(1, 5)]  # nothing pruned
    assert f"resumed from {run_copy / 'checkpoints' / f'step-{newest:08d}'}" in caplog.text


def _no_checkpoint_left(out: Path) -> None:
    for p in (out / "checkpoints").glob("step-*"):
        shutil.rmtree(p)


def _no_checkpoints_dir(out: Path) -> None:
    shutil.rmtree(out / "checkpoints")


def _all_incomplete(out: Path) -> None:
    for p in (out / "checkpoints").glob("step-*"):
        (p / "trainer" / "rank-00000.json").unlink()


@pytest.mark.parametrize(("damage", "message"), [
    (_no_checkpoint_left, "names step-00000004, which does not exist"),
    (_no_checkpoints_dir, "checkpoints does not exist"),
    (_all_incomplete, "is incomplete (no trainer/rank-00000.json)"),
], ids=["latest-names-missing-step-no-other", "checkpoints-gone-metrics-there", "all-incomplete"])
def test_resume_without_a_complete_checkpoint_refuses_and_keeps_everything(
        run_copy: Path, train_config: Path, damage, message: str, capsys: pytest.CaptureFixture) -> None:
    damage(run_copy)
    before = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    assert _train(train_config, "--out", str(run_copy), "--resume") == 2
    _one_line(capsys, message, "--restart", "4 steps logged")
    after = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("remove", ["metrics.jsonl", "run.json", None])
def test_a_run_folder_with_history_is_never_started_over_without_restart(
        run_copy: Path, train_config: Path, remove: str | None, capsys: pytest.CaptureFixture) -> None:
    if remove:
        (run_copy / remove).unlink()
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert _train(train_config, "--out", str(run_copy)) == 2
    _one_line(capsys, "already holds a run", "--resume", "--restart")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before


def test_restart_discards_the_history_explicitly(run_copy: Path, train_config: Path) -> None:
    (run_copy / "checkpoints" / "latest").write_text("step-00000009\n")
    assert _train(train_config, "--out", str(run_copy), "--restart", "--steps", "2") == 0
    assert [r["step"] for r in _metrics(run_copy)] == [1, 2]
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]
    assert json.loads((run_copy / "run.json").read_text())["run"]["steps"] == 2


@pytest.mark.parametrize(("changes", "field"), [({"lr": 1e-3}, "lr"), ({"grad_clip": 0.5}, "grad_clip"),
                                                ({"steps": 6}, "steps")])
def test_resume_with_a_changed_config_is_refused_or_recorded(run_copy: Path, train_config: Path, tmp_path: Path,
                                                             changes: dict, field: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    _drop_latest(run_copy)
    config = _config_with(tmp_path, train_config, **changes)
    before = (run_copy / "metrics.jsonl").read_bytes()
    assert _train(config, "--out", str(run_copy), "--resume") == 2
    _one_line(capsys, f"{field} ", "--allow-config-change")
    assert (run_copy / "metrics.jsonl").read_bytes() == before

    assert _train(config, "--out", str(run_copy), "--resume", "--allow-config-change") == 0
    record = json.loads((run_copy / "run.json").read_text())
    assert record["resumes"][-1]["step"] == 3 and field in record["resumes"][-1]["changes"]
    assert record["resumes"][-1]["changes"][field]["to"] == changes[field]


# ---------------------------------------------------------------------------- 2. one writer per output
def _held_upcycle(src: Path, out: Path) -> list[str]:
    return ["upcycle", str(src), str(out), "--num-experts", "2"]


@pytest.mark.parametrize("command", ["upcycle", "train"])
def test_a_second_writer_is_refused_naming_the_first(command: str, tiny_dense_dir: Path, train_config: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    _single_rank(monkeypatch)
    out = tmp_path / "out"
    with fsio.claim(out, "upcycle"):  # the first writer, still running
        if command == "upcycle":
            assert cli(_held_upcycle(tiny_dense_dir, out)) == 2
        else:
            assert _train(train_config, "--out", str(out)) == 2
        _one_line(capsys, f"is being written by process {os.getpid()} on {socket.gethostname()} (upcycle)")
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    assert _leftovers(tmp_path) == []  # the lock went with its holder


def test_concurrent_upcycles_to_one_output_never_both_succeed(tiny_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "drop_upcycling.cli", *_held_upcycle(tiny_dense_dir, out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip()
    assert len(loser.splitlines()) == 1 and ("is being written by process" in loser or "already exists" in loser)
    assert _leftovers(tmp_path) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = fsio.lock_path(out)
    stale.write_text(f"{fsio.LOCK_MARK} {_dead_pid()} {socket.gethostname()} upcycle\n")
    other = tmp_path / ".other.lock"  # a stale lock of another output in the same folder
    other.write_text(f"{fsio.LOCK_MARK} {_dead_pid()} {socket.gethostname()} upcycle\n")
    assert cli(_held_upcycle(tiny_dense_dir, out)) == 0
    assert (out / "config.json").is_file() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- 4. NaN
def _nan_dense(dense: Path, tmp: Path) -> Path:
    d = tmp / "nan-dense"
    shutil.copytree(dense, d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.full_like(tensors["model.layers.1.mlp.up_proj.weight"],
                                                                   float("nan"))
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "noise", "--noise-std", "nan"], "noise std must be a finite number >= 0, got nan"),
    (["--method", "noise", "--noise-std", "inf"], "noise std must be a finite number >= 0, got inf"),
    (["--max-shard-size", "nan"], "--max-shard-size must be a positive number of GB, got nan"),
    (["--max-shard-size", "0"], "--max-shard-size must be a positive number of GB, got 0.0"),
    (["NAN-SOURCE", "--method", "drop"], "model.layers.1.mlp.up_proj.weight of the dense model holds NaN"),
    (["NAN-SOURCE", "--method", "drop", "--stats", "full"], "model.layers.1.mlp.up_proj.weight"),
])
def test_nan_options_and_weights_fail_in_one_line(args: list[str], message: str, tiny_dense_dir: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tiny_dense_dir
    if args[0] == "NAN-SOURCE":
        src, args = _nan_dense(tiny_dense_dir, tmp_path), args[1:]
    out = tmp_path / "out"
    assert cli(["upcycle", str(src), str(out), "--num-experts", "2", *args]) == 2
    _one_line(capsys, message)
    assert not out.exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- 5. OS errors at the output
def _parent_is_a_file(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "out", "afile is a file, not a folder"


def _read_only_parent(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A read-only folder; root ignores the mode bits, so creating files there is refused by hand too."""
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def wrapped(path, *args, **kwargs):
            if str(path).startswith(str(ro) + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    return ro / "out", "Permission denied"


def _disk_full(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.PlannedWriter, "add", full)  # upcycle's shard writer
    monkeypatch.setattr(checkpoint, "save_file", full)  # the trainer's checkpoint files
    return tmp / "out", "No space left on device"


@pytest.fixture
def restore_modes(tmp_path: Path) -> Iterator[None]:
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)


@pytest.mark.parametrize("command", ["upcycle", "train"])
@pytest.mark.parametrize("fault", [_parent_is_a_file, _read_only_parent, _disk_full],
                         ids=["parent-is-a-file", "read-only-parent", "disk-full"])
def test_os_errors_at_the_output_are_one_line(command: str, fault, tiny_dense_dir: Path, train_config: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_modes,
                                              capsys: pytest.CaptureFixture) -> None:
    _single_rank(monkeypatch)
    out, reason = fault(tmp_path, monkeypatch)
    if command == "upcycle":
        assert cli(_held_upcycle(tiny_dense_dir, out)) == 2
    else:
        assert _train(train_config, "--out", str(out), "--steps", "1") == 2
    _one_line(capsys, f"cannot write {out}", reason)
    assert not (out / "config.json").exists() and not (out / "checkpoints" / "step-00000001").exists()
    for folder in {out.parent, out / "checkpoints"}:
        if folder.is_dir():
            assert _leftovers(folder) == []


# ---------------------------------------------------------------------------- 6. leftovers
_SLOW_UPCYCLE = """
import sys, time
from drop_upcycling import upcycle
make = upcycle._moe_tensors
def slow(*args, **kwargs):
    for i, item in enumerate(make(*args, **kwargs)):
        if i == 3:
            print("writing", flush=True)
            for _ in range(600):  # work, not one long sleep: see the test
                time.sleep(0.1)
        yield item
upcycle._moe_tensors = slow
from drop_upcycling.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_a_stopped_upcycle_leaves_nothing_for_long(sig: signal.Signals, tiny_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A runner that starts the suite in the background (`cmd &` without job control) passes SIGINT on
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default back.
    # The kernel may deliver the signal to any thread (the writer's); the main thread then runs the
    # handler at its next bytecode, so the stand-in for work must not be one uninterrupted 60 s sleep.
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_UPCYCLE, *_held_upcycle(tiny_dense_dir, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    assert any(".tmp-" in name for name in _leftovers(tmp_path))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:  # no clean-up possible: the next run to any output here removes the orphans
        assert _leftovers(tmp_path)
        assert cli(_held_upcycle(tiny_dense_dir, tmp_path / "other")) == 0
    else:
        lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
        assert proc.returncode == 128 + sig and len(lines) == 1, err
    assert _leftovers(tmp_path) == [] and not out.exists()


def test_overwriting_a_regular_file_leaves_no_trash(tiny_dense_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("an old file")
    assert cli([*_held_upcycle(tiny_dense_dir, out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and _leftovers(tmp_path) == []


def test_a_temp_of_a_live_process_or_another_host_is_kept(tiny_dense_dir: Path, tmp_path: Path) -> None:
    mine = tmp_path / f".x.tmp-{os.getpid()}@{socket.gethostname()}-abcdefgh"
    remote = tmp_path / f".y.tmp-{_dead_pid()}@not-{socket.gethostname()}-abcdefgh"
    dead = tmp_path / f".z.tmp-{_dead_pid()}@{socket.gethostname()}-abcdefgh"
    for p in (mine, remote, dead):
        p.mkdir()
    assert fsio.remove_orphans(tmp_path) == [dead]


# ---------------------------------------------------------------------------- 8. modes, dry run, launcher
@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["022", "027", "077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_outputs_follow_the_umask(umask: int, tiny_dense_dir: Path, train_config: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {("d", 0o777 & ~umask), ("f", 0o666 & ~umask)}
    assert cli(_held_upcycle(tiny_dense_dir, tmp_path / "moe")) == 0
    assert _modes(tmp_path / "moe") == expected
    _single_rank(monkeypatch)
    assert _train(train_config, "--out", str(tmp_path / "run"), "--steps", "1") == 0
    assert _modes(tmp_path / "run" / "checkpoints") == expected
    assert (tmp_path / "run" / "run.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("state", ["exists", "held"])
def test_dry_run_says_the_real_run_would_refuse(state: str, tiny_dense_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    with fsio.claim(out, "upcycle") if state == "held" else contextlib.nullcontext():
        if state == "exists":
            out.mkdir()
        assert cli([*_held_upcycle(tiny_dense_dir, out), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "the real run would refuse: " in stdout
    assert ("already exists" if state == "exists" else f"is being written by process {os.getpid()}") in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["would_refuse"]


def test_launcher_ends_with_the_failing_ranks_line(finished_run: Path, train_config: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    start = time.perf_counter()
    assert _train(train_config, "--out", str(out), "--nproc", "2", "--ep", "2") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("drop-upcycling train: error: rank 0: ")
    assert "already holds a run" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert time.perf_counter() - start < 120


def test_launcher_runs_torchrun(train_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(train_config, "--out", str(out), "--nproc", "2", "--ep", "2", "--steps", "1") == 0
    assert [r["step"] for r in _metrics(out)] == [1]
    assert json.loads((out / "run.json").read_text())["ep"] == 2


def test_nproc_under_torchrun_is_refused(train_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="--nproc starts torchrun itself"):
        train.run(_args(str(train_config), "--nproc", "2"))


def _args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    train.configure_parser(parser)
    return parser.parse_args(list(argv))
