"""convert never deletes what is not its own, and leaves nothing behind on any exit: a destination that is or
holds the working directory or the source is refused, --force replaces only a previous conversion, a killed run's
staging directory is removed by the next run, SIGTERM and a full disk clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from cli_helpers import ENV, one_error_line, run_main
from conftest import save_drafter, tiny_drafter, tiny_target

import treeflash_mlx.convert as convert_module
from treeflash_mlx.convert import STAGING_MARK, convert, remove_stale_staging


def converted_source(tmp_path: Path) -> Path:
    """A drafter checkpoint in the published layout (what convert reads)."""
    return save_drafter(tiny_drafter(tiny_target("qwen3", hidden=32, layers=2)), tmp_path / "src")

def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}

@pytest.mark.parametrize("where", ["cwd", "parent of cwd", "source", "parent of source"])
def test_convert_refuses_a_destination_holding_the_working_directory_or_the_source(tmp_path, monkeypatch, capsys,
                                                                                    where):
    src = converted_source(tmp_path / "in")
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep").write_text("mine")
    monkeypatch.chdir(work)
    dst = {"cwd": Path("."), "parent of cwd": work.parent, "source": src, "parent of source": src.parent}[where]
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, convert_module.main, "--hf-path", src, "--mlx-path", dst, "--force")
    assert code == 1 and "choose a new directory" in one_error_line(err)
    assert snapshot(tmp_path) == before, "nothing was deleted or left behind"

def test_force_replaces_only_a_previous_conversion(tmp_path, capsys):
    src = converted_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, convert_module.main, "--hf-path", src, "--mlx-path", out, "--force")
    assert code == 1 and "not a previous conversion" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert convert(str(src), out, force=True) == out  # an empty directory holds nothing to lose
    first = (out / "model.safetensors").read_bytes()
    assert convert(str(src), out, dtype="float16", force=True) == out  # a previous conversion is replaced
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

def make_staging(parent: Path, name: str, pid: int, marked: bool = True) -> Path:
    path = parent / f".{name}.tmp-{pid}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"partial")
    if marked:
        (path / STAGING_MARK).touch()
    return path

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid

def test_stale_staging_of_a_killed_run_is_removed_and_nothing_else(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    stale = make_staging(tmp_path, "out", dead)
    running = make_staging(tmp_path, "out", alive)
    foreign = make_staging(tmp_path, "out", dead + 1 if dead + 1 != alive else dead + 2, marked=False)
    other_output = make_staging(tmp_path, "other", dead)
    assert remove_stale_staging(tmp_path / "out") == [stale]
    assert not stale.exists() and running.exists() and foreign.exists() and other_output.exists()

def test_a_run_removes_what_a_killed_run_left(tmp_path):
    src = converted_source(tmp_path)
    stale = make_staging(tmp_path, "out", dead_pid())
    convert(str(src), tmp_path / "out")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]

def test_sigterm_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = converted_source(tmp_path)
    real_save = mx.save_safetensors

    def save_then_terminated(*args, **kwargs):
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(convert_module.mx, "save_safetensors", save_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        convert(str(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is put back"

def test_full_disk_during_conversion_is_one_line_and_leaves_nothing(tmp_path):
    """A real write failure: the file size limit makes every write past 64 KiB fail as a full disk would."""
    src = converted_source(tmp_path)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "from treeflash_mlx.convert import main\n"
        f"sys.exit(main(['--hf-path', {str(src)!r}, '--mlx-path', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 1, proc.stderr
    one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
