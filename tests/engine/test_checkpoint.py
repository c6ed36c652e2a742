"""sam_repro.rundir: a writer killed in the middle of a write never damages the old file.

Each test runs a child process that writes through the real function and kills itself with
SIGKILL from inside the write (no signal handler, no cleanup, no `finally` runs: exactly a
`kill -9` or an OOM kill). The kill happens at a fixed point of the write, so nothing depends on
timing: the parent only waits for the child to end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from sam_repro.rundir import CHECKPOINT, atomic_write, load_checkpoint, save_checkpoint, write_json

REPO = Path(__file__).resolve().parents[2]


def run_child(code: str, run_dir: Path) -> subprocess.CompletedProcess:
    prog = textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def old_state() -> dict:
    return {"epoch": 3, "model": {"w": torch.arange(1000, dtype=torch.float32)}, "history": [{"epoch": 3}]}


def test_save_then_load_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None  # no checkpoint yet: a fresh run
    save_checkpoint(tmp_path, old_state())
    got = load_checkpoint(tmp_path)
    assert got["epoch"] == 3 and torch.equal(got["model"]["w"], old_state()["model"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    assert oct((tmp_path / CHECKPOINT).stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_checkpoint_writer_killed_during_torch_save_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, old_state())
    # The new state holds an object whose pickling kills the process: torch.save is half-way
    # through serializing a real training state (a large tensor is already in it) when it dies.
    child = run_child("""
        import os, signal, sys, torch
        from sam_repro.rundir import save_checkpoint

        class KillMidWrite:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        state = {"epoch": 4, "model": {"w": torch.zeros(100000)}, "bomb": KillMidWrite()}
        save_checkpoint(sys.argv[1], state)
        print("not killed")
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr  # it really died inside the write
    got = load_checkpoint(tmp_path)
    assert got["epoch"] == 3 and torch.equal(got["model"]["w"], old_state()["model"]["w"])
    # A later save (the resumed run) replaces it normally; a leftover temporary file is harmless.
    save_checkpoint(tmp_path, {**old_state(), "epoch": 5})
    assert load_checkpoint(tmp_path)["epoch"] == 5


def test_a_writer_killed_after_half_the_bytes_are_on_disk_leaves_the_old_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, old_state())
    before = (tmp_path / CHECKPOINT).read_bytes()
    # The callback writes the first half of a real checkpoint, flushes it to the kernel, then dies.
    child = run_child("""
        import io, os, signal, sys, torch
        from pathlib import Path
        from sam_repro.rundir import CHECKPOINT, atomic_write

        buf = io.BytesIO()
        torch.save({"epoch": 4, "model": {"w": torch.ones(1000)}}, buf)
        data = buf.getvalue()

        def write(f):
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(Path(sys.argv[1]) / CHECKPOINT, write)
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(tmp_path)["epoch"] == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != CHECKPOINT]
    assert all(n.startswith(f".{CHECKPOINT}.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_metrics_json_writer_killed_mid_write_leaves_the_previous_document(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"status": "running", "epochs_done": 3})
    child = run_child("""
        import os, signal, sys
        from pathlib import Path
        from sam_repro.rundir import atomic_write

        def write(f):
            f.write('{"status": "compl')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(Path(sys.argv[1]) / "metrics.json", write, mode="w")
    """, tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert json.loads(target.read_text()) == {"status": "running", "epochs_done": 3}


def test_an_exception_inside_the_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def fail(f) -> None:
        f.write(b"new, half")
        raise RuntimeError("disk full")

    try:
        atomic_write(target, fail)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the error must propagate")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_write_json_refuses_nan_instead_of_writing_invalid_json(tmp_path: Path) -> None:
    try:
        write_json(tmp_path / "m.json", {"x": float("nan")})
    except ValueError:
        pass
    else:
        raise AssertionError("NaN must not reach metrics.json")
    assert not (tmp_path / "m.json").exists() and list(tmp_path.iterdir()) == []


def test_load_checkpoint_puts_tensors_where_map_location_says(tmp_path: Path) -> None:
    """resume loads onto the run's device: map_location must reach torch.load ('meta' stands in
    for a GPU here: a device other than the one the checkpoint was saved from)."""
    save_checkpoint(tmp_path, old_state())
    assert load_checkpoint(tmp_path)["model"]["w"].device.type == "cpu"
    got = load_checkpoint(tmp_path, map_location="meta")
    assert got["model"]["w"].device.type == "meta" and got["model"]["w"].shape == (1000,)


def test_the_temporary_file_is_a_hidden_sibling_and_missing_directories_are_created(tmp_path: Path) -> None:
    """os.replace is atomic only within one filesystem: the temporary must live in the target's own
    directory (not the system temp dir, which may be another mount). A new run directory's parents
    are created."""
    target = tmp_path / "new" / "deeper" / "metrics.json"
    during: list[list[str]] = []  # what the target's directory holds while the bytes are written
    atomic_write(target, lambda f: (during.append(sorted(p.name for p in target.parent.iterdir())), f.write("{}")),
                 mode="w")
    assert target.read_text() == "{}"
    assert len(during[0]) == 1 and during[0][0].startswith(".metrics.json.") and during[0][0].endswith(".tmp")
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
