"""scripts/gpu.sh (scripts/gpu_window.py): one GPU window, one command, inside a hard time budget.

On the CPU: the plan (decided from the budget and the declared minimums alone), every command it
would run on a GPU (each sam-train call composes, validates and switches on the path its check is
named for; each bench flag is one the script declares), the GPU-only test selection against the
test files, how a command past its share is stopped, and a dry run of every phase end to end.
"""
from __future__ import annotations

import ast
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from sam_repro.validate import validate
from tests.conftest import REPO, compose_config

sys.path.insert(0, str(REPO / "scripts"))
import gpu_window as gw  # noqa: E402

MINIMUM = {phase.name: phase.minimum_s for phase in gw.PHASES}
ALL_PHASES = [phase.name for phase in gw.PHASES]


def gpu_sh(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """scripts/gpu.sh as a user runs it; the data folder and $OUT only where the test gives them."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("SAM_CIFAR10_JPEG", "OUT")}
    full_env = {**inherited, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# -- the plan -------------------------------------------------------------------------------------
def test_a_phase_runs_exactly_when_its_minimum_fits_after_the_minimums_of_the_phases_before_it() -> None:
    everything = gw.RESERVE_S + sum(MINIMUM.values())
    assert gw.plan(everything, gw.PHASES, ALL_PHASES, True) == [None, None, None]
    short = gw.plan(everything - 1, gw.PHASES, ALL_PHASES, True)
    assert short[:2] == [None, None]
    assert f"needs at least {MINIMUM['table4']:g} s; the budget leaves {MINIMUM['table4'] - 1:g} s" in short[2]
    # without the checks the same budget has room for Table 4
    assert gw.plan(everything - 1, gw.PHASES, ["bench", "table4"], True) == ["not selected (--phases)", None, None]
    # room for the checks alone: the benchmarks and Table 4 are skipped, each saying why
    checks_only = gw.plan(gw.RESERVE_S + MINIMUM["checks"], gw.PHASES, ALL_PHASES, True)
    assert checks_only[0] is None and all("the budget leaves 0 s" in why for why in checks_only[1:])
    # less than the checks need: nothing runs
    assert all(gw.plan(gw.RESERVE_S + MINIMUM["checks"] - 1, gw.PHASES, ALL_PHASES, True))
    # Table 4 without its data is skipped whatever the budget, and says what is missing
    assert gw.plan(10 ** 6, gw.PHASES, ALL_PHASES, False)[2] == gw.NO_DATA and "SAM_CIFAR10_JPEG" in gw.NO_DATA


def test_a_budget_that_fits_only_the_checks_writes_the_summary_and_one_line_per_check(tmp_path: Path) -> None:
    """A real run, decided by the declared minimums: the checks phase runs (compile, the only check
    selected, is a CUDA path a dry run skips), the benchmarks and Table 4 are skipped with why."""
    budget = gw.RESERVE_S + MINIMUM["checks"] + MINIMUM["bench"] - 1
    result = gpu_sh(f"{budget}", "--dry-run", "--checks", "compile", env={"OUT": str(tmp_path / "out")})
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checks.txt", "gpu.log", "gpu.txt"]
    lines = (out / "checks.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [c.name for c in gw.CHECKS]
    assert all(line.endswith("skipped: not selected (--checks)") for line in lines if not line.startswith("compile:"))
    assert "compile: skipped: a CUDA-only path (a dry run on the CPU)" in lines
    summary = (out / "gpu.txt").read_text()
    bench_left = MINIMUM["bench"] - 1
    assert f"phase bench: skipped: needs at least {MINIMUM['bench']:g} s; the budget leaves {bench_left:g} s" in summary
    assert f"phase table4: skipped: {gw.NO_DATA}" in summary
    assert summary.splitlines()[0] == "device: no GPU: a dry run on the CPU"

    too_small = gpu_sh(f"{gw.RESERVE_S + MINIMUM['checks'] - 1}", "--dry-run", env={"OUT": str(tmp_path / "none")})
    assert too_small.returncode == 0, too_small.stderr
    lines = (tmp_path / "none" / "checks.txt").read_text().splitlines()
    assert len(lines) == len(gw.CHECKS)
    why = f"skipped: the checks phase did not run: needs at least {MINIMUM['checks']:g} s"
    assert all(why in line for line in lines)


def test_bad_arguments_get_one_line_naming_the_value_and_what_is_allowed() -> None:
    result = gpu_sh("540", "--checks", "compile,cuda_graph")
    assert result.returncode == 2 and result.stderr.startswith(
        "scripts/gpu.sh: error: --checks='compile,cuda_graph': cuda_graph unknown; allowed: solo_bf16, solo_fp32, ")
    negative = gpu_sh("-5")
    assert (negative.returncode, negative.stderr) == (2, "scripts/gpu.sh: error: budget_s=-5: must be > 0 (seconds)\n")
    assert len(result.stderr.splitlines()) == 1


# -- what it would run on a GPU -------------------------------------------------------------------
def planned(*args: str) -> list[tuple[str, list[str]]]:
    """(phase/label, argv) of every command `gpu.sh --plan` prints."""
    result = gpu_sh("540", "--plan", *args, env={"SAM_CIFAR10_JPEG": "/data/cifar10-jpeg"})
    assert result.returncode == 0, result.stderr
    commands = [line[2:].split(": ", 1) for line in result.stdout.splitlines() if line.startswith("$ ")]
    return [(label, argv.split()) for label, argv in commands]


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Hydra's expansion of a multirun's comma lists (one list of overrides per job)."""
    if overrides[:1] != ["-m"]:
        return [overrides]
    choices = [[f"{k}={v}" for v in value.split(",")] for k, _, value in (o.partition("=") for o in overrides[1:])]
    return [list(job) for job in itertools.product(*choices)]


# what each check must switch on: the reason it exists
SWITCHES = {
    "solo_bf16": lambda c: c.engine.precision == "bf16" and c.device_batch is None,
    "solo_fp32": lambda c: c.engine.precision == "fp32" and c.device_batch is None,
    "per_device": lambda c: c.device_batch is not None and c.device_batch < c.batch_size,
    "pack": lambda c: c.device_batch is not None and c.device_batch < c.batch_size,
    "compile": lambda c: c.engine.compile and not c.engine.cuda_graphs,
    "cuda_graphs": lambda c: c.engine.cuda_graphs,
    "loader_autoaugment": lambda c: c.engine.loader == "device" and c.augment.autoaugment == "cifar10"
                                    and c.dataset.source == "folder" and c.dataset.root == "/data/cifar10-jpeg",
}


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_every_sam_train_call_composes_validates_and_switches_on_its_path(mode: str) -> None:
    commands = planned(*(["--dry-run"] if mode == "dry-run" else []))
    device = gw.MODES[mode].device
    trained = {label for label, argv in commands if argv[0].endswith("sam-train")}
    expected = {f"checks/{c.name}" for c in gw.CHECKS if not (c.cuda_only and device == "cpu")} - {"checks/gpu_tests"}
    assert trained == expected | {"table4/table4_sam", "table4/table4_sgd"}
    table4 = []
    for label, argv in commands:
        if not argv[0].endswith("sam-train"):
            continue
        for job in sweep_jobs(argv[1:]):
            cfg = compose_config(job)
            validate(cfg)
            check = label.split("/")[1]
            if check in SWITCHES:
                assert SWITCHES[check](cfg), (label, job)
            if label.startswith("table4"):
                table4.append(cfg)
            else:
                assert cfg.engine.device == device
    assert "hydra/launcher=pack" in dict(commands)["checks/pack"] + dict(commands)["table4/table4_sam"]
    assert sorted((c.dataset.label_noise, c.optim.name) for c in table4) == sorted(
        itertools.product((0.2, 0.4, 0.6, 0.8), ("sam", "sgd")))  # Table 4's 8 runs at seed 0, on the JPEG folder
    assert all(c.seed == 0 and c.dataset.source == "folder" for c in table4)
    if mode == "gpu":  # the presets as they stand; the GPU when there is one
        assert all((c.model.name, c.epochs, c.batch_size, c.device_batch, c.engine.device)
                   == ("resnet32", 200, 256, 32, "auto") for c in table4)


def declared_flags(script: Path) -> set[str]:
    """The --flags a script's argparse declares (read from its source)."""
    return {node.args[0].value for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
            and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")}


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_every_bench_command_uses_flags_its_script_declares(mode: str) -> None:
    plan = planned(*(["--dry-run"] if mode == "dry-run" else []))
    commands = [argv for label, argv in plan if label.startswith("bench/")]
    assert len(commands) == len(gw.MODES[mode].bench)
    for argv in commands:
        script = Path(argv[1])
        assert script.parent == REPO / "scripts"
        used = {a for a in argv[2:] if a.startswith("--")}
        assert used <= declared_flags(script), (script.name, used - declared_flags(script))
        assert "--out" in used and "--device" in used


def test_the_gpu_tests_check_selects_every_test_that_skips_itself_without_cuda() -> None:
    """The reference: a line scan of the test files for a skipif that reads torch.cuda."""
    expected = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("@pytest.mark.skipif(") and "torch.cuda" in line:
                name = next(m.group(1) for m in (re.match(r"def (test_\w+)", rest) for rest in lines[i + 1:]) if m)
                expected.add(f"{path.relative_to(REPO).as_posix()}::{name}")
    assert set(gw.gpu_only_tests()) == expected
    assert {"tests/optim/test_sam.py::test_no_host_synchronization_on_cuda",
            "tests/optim/test_sam_norms.py::test_keeping_the_norms_adds_no_host_synchronization",
            "tests/data/test_loaders.py::test_cuda_loader_never_synchronizes_inside_an_epoch",
            "tests/models/test_stochastic.py::test_replay_on_cuda"} <= expected


def test_runs_are_named_after_the_gpu_and_labelled_as_budget_rows() -> None:
    assert gw.runs_name("NVIDIA H200, 143771 MiB, 570.86.15") == "budget_h200_cifar10jpeg_table4"
    assert gw.runs_name("NVIDIA A100-SXM4-80GB, 81920 MiB, 535.104") == "budget_a100_cifar10jpeg_table4"
    assert gw.runs_name("nvidia-smi did not run ([Errno 2] No such file)") == "budget_gpu_cifar10jpeg_table4"


def test_table4_summary_projects_a_whole_seed_from_the_packs_seconds_per_epoch(tmp_path: Path) -> None:
    """A window that ended mid-schedule: SAM's pack stopped after 3 epochs, SGD's after 6; the
    projection is (median s/epoch x 200) summed over the two packs."""
    epoch_s = {"sam": [5.0, 4.0, 4.2], "sgd": [2.0, 2.6, 2.1, 2.3, 2.2, 2.4]}
    for optim, times in epoch_s.items():
        for rate in (20, 40, 60, 80):
            run = tmp_path / "budget_h200_cifar10jpeg_table4" / f"t4_cifar10_resnet32_noise{rate}" / f"optim={optim}"
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "epoch_s": t}) + "\n"
                                                       for i, t in enumerate(times)))
            (run / "metrics.json").write_text(json.dumps({
                "status": "running", "error": "interrupted (KeyboardInterrupt); re-run the same command to resume",
                "epochs_done": len(times), "final": {"test_err": rate / 2 + (optim == "sgd")},
                "config": {"optimizer": optim, "label_noise": rate / 100, "epochs": 200, "train_steps": None}}))
    line = gw.table4_summary(tmp_path / "budget_h200_cifar10jpeg_table4")
    assert line.startswith("8 runs in budget_h200_cifar10jpeg_table4 (table4_runs.tar.gz): ")
    assert "sam: 4 runs, 3/200 epochs (interrupted), 4.20 s/epoch, test_err 10.0 / 20.0 / 30.0 / 40.0 % at noise " \
           "0.2 / 0.4 / 0.6 / 0.8" in line
    assert "sgd: 4 runs, 6/200 epochs (interrupted), 2.25 s/epoch, test_err 11.0 / 21.0 / 31.0 / 41.0 %" in line
    assert line.endswith(f"; a whole seed at these speeds: {(4.2 * 200 + 2.25 * 200) / 60:.1f} min")


# -- how commands end -----------------------------------------------------------------------------
def window(tmp_path: Path) -> gw.Window:
    return gw.Window(gw.DRY_RUN, tmp_path, tmp_path / "work", time.monotonic() + 60, None, "x", [], [], [],
                     log=io.StringIO())


def test_a_command_past_its_share_gets_sigint_first_and_each_check_line_says_what_happened(tmp_path: Path) -> None:
    """Three commands at once: one that can only end when stopped (it saves on SIGINT, as a pack records
    its interruption), one that fails, one that succeeds."""
    ready, saved = tmp_path / "ready", tmp_path / "saved"
    # `ready` is written inside the try: a SIGINT after it always finds the handler (a loaded machine may
    # deliver the share's SIGINT at any instant of the child's start)
    waits = "\n".join(["import pathlib, signal, sys", "try:", f"    pathlib.Path({str(ready)!r}).touch()",
                       "    signal.pause()  # never returns by itself", "except KeyboardInterrupt:",
                       f"    pathlib.Path({str(saved)!r}).touch()", "    print('interrupted: saved')",
                       "    sys.exit(1)"])
    fails = ("import sys\nprint('epoch 1/2')\nprint('sam-train: error: dataset.root=/nowhere does not exist')\n"
             "print('sam-train: sweep: 0 of 1 jobs done')\nsys.exit(2)")
    w = window(tmp_path)
    stopped, failed, passed = gw.run_commands(w, [("waits", [sys.executable, "-c", waits], 4),
                                                  ("fails", [sys.executable, "-c", fails], 60),
                                                  ("passes", [sys.executable, "-c", "print('epoch 2/2')"], 60)])
    if not ready.exists():
        pytest.skip("the waiting command never started within its 2 s: nothing to judge on this machine")
    assert stopped.timed_out and saved.exists() and "interrupted: saved" in stopped.output
    assert not failed.timed_out and failed.rc == 2 and passed.rc == 0 and not passed.timed_out
    check = gw.Check("pack", 75, lambda w: [])
    assert gw.check_line(w, check, stopped).startswith("pack: TIMEOUT after ")
    assert re.fullmatch(r"pack: FAILED in \d+ s: sam-train: error: dataset.root=/nowhere does not exist",
                        gw.check_line(w, check, failed))
    assert re.fullmatch(r"pack: ok in \d+ s", gw.check_line(w, check, passed))
    log = w.log.getvalue()
    assert log.index("===== waits") < log.index("===== fails") < log.index("===== passes") and "epoch 2/2" in log


def test_a_command_that_cannot_start_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    w = window(tmp_path)
    (outcome,) = gw.run_commands(w, [("missing", [str(tmp_path / "no-such-program")], 10)])
    assert outcome.rc is None and not outcome.timed_out
    assert gw.check_line(w, gw.Check("compile", 10, lambda w: []), outcome).startswith(
        f"compile: FAILED in 0 s: error: could not start {tmp_path / 'no-such-program'}")


# -- a dry run of every phase ---------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_checks_benchmarks_and_table4_as_two_packs_in_at_most_eight_files(tmp_path: Path) -> None:
    """Every phase on the CPU with tiny settings: a training check (a sweep of two packs), the
    packed-step benchmark, then Table 4's 4 noise rates x {SAM, SGD} on a tiny image folder (the JPEG
    copy's layout) as two packs of 4, one training step per run, archived without checkpoints."""
    from tests.data.test_data_sources import make_folder

    make_folder(tmp_path / "cifar10-jpeg", n_train=64, n_test=20)
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    result = gpu_sh("100000", "--dry-run", "--checks", "pack,compile", "--bench", "bench_pack", timeout=900,
                    env={"SAM_CIFAR10_JPEG": str(tmp_path / "cifar10-jpeg"), "OUT": str(out), "TMPDIR": str(scratch),
                         "OMP_NUM_THREADS": "1"})  # commands run side by side on 2 cores
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    produced = sorted(p.name for p in out.iterdir())
    assert len(gw.FILES) <= 8 and set(produced) <= set(gw.FILES)
    assert produced == ["bench_pack.jsonl", "checks.txt", "gpu.log", "gpu.txt", "profile_pack.txt",
                        "table4_runs.tar.gz"]
    assert not list(scratch.glob("gpu-sh-*"))  # the scratch folder is removed

    checks = dict(line.split(": ", 1) for line in (out / "checks.txt").read_text().splitlines())
    assert list(checks) == [c.name for c in gw.CHECKS]
    assert re.fullmatch(r"ok in \d+ s", checks["pack"])
    assert checks["compile"] == "skipped: a CUDA-only path (a dry run on the CPU)"
    assert all(checks[c] == "skipped: not selected (--checks)" for c in checks if c not in ("pack", "compile"))

    (row,) = [json.loads(line) for line in (out / "bench_pack.jsonl").read_text().splitlines()]
    assert row["runs"] == 1 and row["pack_over_solo"] > 0 and row["device"] == "cpu"
    assert "===== profile_pack_sam1.txt" in (out / "profile_pack.txt").read_text()

    sections = dict(re.findall(r"^===== (\w+): (.*?)(?=^===== \w+: |\Z)", (out / "gpu.log").read_text(), re.S | re.M))
    assert list(sections) == ["pack", "bench_pack", "table4_sam", "table4_sgd"]
    for optim in ("sam", "sgd"):
        log = sections[f"table4_{optim}"]
        assert log.count("pack of 4 runs") == 1 and "sweep: 4 of 4 jobs completed" in log and f"optim={optim} " in log
    with tarfile.open(out / "table4_runs.tar.gz") as archive:
        names = archive.getnames()
        summaries = [json.load(archive.extractfile(n)) for n in names if n.endswith("/metrics.json")]
    assert len(summaries) == 8 and all(s["status"] == "completed" for s in summaries)
    assert sorted((s["config"]["label_noise"], s["config"]["optimizer"]) for s in summaries) == sorted(
        (noise, optim) for noise in (0.2, 0.4, 0.6, 0.8) for optim in ("sam", "sgd"))
    assert not any(n.endswith(".pt") or "/.sweeps" in n for n in names)
    assert all(n.startswith("budget_cpu_cifar10jpeg_table4_test") for n in names)

    summary = (out / "gpu.txt").read_text().splitlines()
    phases = [line for line in summary if line.startswith("phase ")]
    assert [line.split(":")[0] for line in phases] == ["phase checks", "phase bench", "phase table4"]
    assert phases[0].startswith("phase checks: 1 ok, 7 skipped (checks.txt)")
    assert "bench_pack: ok, 1 rows in" in phases[1] and "bench_step: not selected (--bench)" in phases[1]
    assert phases[2].startswith("phase table4: 8 runs in budget_cpu_cifar10jpeg_table4_test (table4_runs.tar.gz)")
    assert summary[-1].startswith("done in ") and "NOT returned" not in summary[-1]
