#!/usr/bin/env python3
"""One GPU window, one command: fail-fast CUDA checks, short benchmarks, then Table 4 at one seed,
all inside a hard time budget. Run it through scripts/gpu.sh:

    bash scripts/gpu.sh 540                    # on the GPU machine: everything, in 540 s at most
    bash scripts/gpu.sh 540 --plan             # what would run, and every command, without running anything
    bash scripts/gpu.sh 100000 --dry-run       # every phase on the CPU with tiny settings (a test runs this)
    bash scripts/gpu.sh 300 --phases table4 epochs=50   # one phase; key=value overrides reach Table 4's sam-train
    bash scripts/gpu.sh 120 --phases checks --checks compile,cuda_graphs   # re-check two paths

The phases, in order of value; each declares the least time worth starting it and the most it may use:
  checks  every CUDA path runs at all, through the public entry points (sam-train overrides, a pytest
          selection), each in its own process with its own time limit, all at once: one line each in
          checks.txt (ok / FAILED or TIMEOUT with the last error line / skipped with why)
  bench   bench_step.py (the per-device rows, then the step suite), bench_pack.py and bench_engine.py,
          one after another (they time things), each with few steps and its share of the phase's time
  table4  Table 4's 4 noise rates x {SAM, SGD} at seed 0, as two packs (hydra/launcher=pack) on the
          JPEG CIFAR-10 image folder in $SAM_CIFAR10_JPEG, in budget-labelled run directories; SAM gets
          2/3 of the time left (its step costs two passes), SGD the rest; at its share a sweep gets SIGINT,
          which marks its runs interrupted after their last finished epoch
The plan is made before anything runs, from the budget and the declared minimums alone: a phase
whose minimum does not fit in what the budget leaves after the minimums of the phases before it is
skipped, and says why. At run time a phase gets what is left less the later phases' minimums, up to
its own limit; every command is stopped at its share (SIGINT, then SIGKILL after GRACE_S).

Everything lands in $OUT (default results/bench/gpu-<date>), only the files in FILES (a device
returns at most 8): gpu.txt (the device, the plan, one summary line per phase, the benchmarks' key
figures), checks.txt, gpu.log (every command and its whole output), bench_step.jsonl,
bench_pack.jsonl, bench_engine.jsonl, profile_pack.txt (where a packed step's time goes) and
table4_runs.tar.gz (the run directories without checkpoints: `tar -xzf table4_runs.tar.gz -C results/runs/`).
Exit status: 0, or 1 when a check failed or ran out of time, 130 when stopped by Ctrl-C or SIGTERM
(what was done is kept and summarized), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Optional, TextIO

REPO = Path(__file__).resolve().parent.parent
RESERVE_S = 10  # kept at the end of the budget for the archive and the summary
GRACE_S = 15  # after SIGINT a command has this long (at most half its share) to write its files
FILES = ("gpu.txt", "checks.txt", "gpu.log", "bench_step.jsonl", "bench_pack.jsonl", "bench_engine.jsonl",
         "profile_pack.txt", "table4_runs.tar.gz")  # 8 at most: what a GPU machine lent for a session returns
TABLE4 = ",".join(f"t4_cifar10_resnet32_noise{rate}" for rate in (20, 40, 60, 80))
NO_DATA = "SAM_CIFAR10_JPEG is not set: it names the JPEG CIFAR-10 image folder (train/<class>/*, test/<class>/*)"


# -- the two modes: the GPU, and a dry run on the CPU with tiny settings ---------------------------
@dataclass(frozen=True)
class BenchCommand:
    name: str
    script: str  # in scripts/
    args: tuple[str, ...]
    expected_s: float  # on an H200 (estimated): the command's share of the bench phase is in proportion
    output: str  # the JSON-lines file it appends to (in FILES)


@dataclass(frozen=True)
class Mode:
    device: str
    problem: tuple[str, ...]  # the small synthetic run each training check trains
    device_batch: int  # for the per-device and pack checks; divides the problem's batch
    folder_steps: int  # the loader check's optimizer steps on the JPEG folder
    bench: tuple[BenchCommand, ...]
    table4: tuple[str, ...]  # overrides on every Table 4 call, before the user's
    stretch: float  # time limits (never the minimums) are multiplied by this: a CPU is slower
    not_run: tuple[str, ...] = ()  # bench commands this mode leaves out, with why (in the summary)


def bench(name: str, expected_s: float, *args: str) -> BenchCommand:
    script = name.replace("_per_device", "")
    return BenchCommand(name, f"{script}.py", args, expected_s, f"{script}.jsonl")


GPU = Mode(
    device="cuda",
    problem=("dataset=synthetic", "dataset.image_size=32", "dataset.train_size=2048", "dataset.test_size=512",
             "model=resnet20", "batch_size=256", "epochs=2", "engine.eval_batch_size=512"),
    device_batch=32, folder_steps=20,
    bench=(  # in order of value: the per-device step (issue 8), packs (issue 9), the step suite, end to end
        bench("bench_step_per_device", 25, "--device", "cuda", "--per-device", "--warmup", "5", "--steps", "10",
              "--rounds", "3"),
        bench("bench_pack", 40, "--device", "cuda", "--sizes", "4,8", "--warmup", "3", "--steps", "5"),
        bench("bench_step", 75, "--device", "cuda", "--suite", "gpu", "--no-per-device", "--warmup", "5", "--steps",
              "10", "--rounds", "3"),
        bench("bench_engine", 60, "--device", "cuda", "--warmup", "10", "--steps", "30"),
    ),
    table4=(), stretch=1.0)

DRY_RUN = Mode(
    device="cpu",
    problem=("dataset=synthetic", "dataset.image_size=8", "dataset.train_size=32", "dataset.test_size=32",
             "model=resnet20", "batch_size=32", "epochs=1", "engine.eval_batch_size=32"),
    device_batch=16, folder_steps=2,
    bench=(
        bench("bench_pack", 1, "--device", "cpu", "--sizes", "1", "--optims", "sam", "--model", "wrn10_1", "--batch",
              "16", "--device-batch", "8", "--warmup", "1", "--steps", "1"),
        bench("bench_step", 1, "--device", "cpu", "--model", "wrn10_1", "--batch", "8", "--warmup", "1", "--steps", "1",
              "--rounds", "1"),
        bench("bench_engine", 1, "--device", "cpu", "--warmup", "1", "--steps", "1", "--workers", "1"),
    ),
    table4=("train_steps=1", "model.name=wrn10_1", "engine=cpu", "batch_size=32", "device_batch=16"),
    stretch=10.0,
    not_run=("bench_step_per_device: not in a dry run (its CPU suite, ResNet-20 at batch 64, takes minutes)",))

MODES = {"gpu": GPU, "dry-run": DRY_RUN}


# -- one window: where things go, and the clock -----------------------------------------------------
@dataclass
class Window:
    mode: Mode
    out: Path
    work: Path  # scratch: the checks' runs, the benchmarks' raw files, Table 4's runs before the archive
    end: float  # time.monotonic() at which the budget, less RESERVE_S, runs out
    data: Optional[str]  # the JPEG CIFAR-10 folder ($SAM_CIFAR10_JPEG)
    name: str  # Table 4's runs: <runs_root>/<name>/<preset>/<overrides>
    overrides: list[str]  # the user's, for Table 4
    checks: list[str]  # the checks selected
    benches: list[str]  # the bench commands selected
    log: TextIO = field(default=sys.stdout)

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass
class Outcome:
    rc: Optional[int]
    timed_out: bool
    seconds: float
    output: str


def sam_train() -> list[str]:
    """The sam-train console script: $SAM_TRAIN, the one beside this Python, or on PATH; else the module."""
    beside = Path(sys.executable).with_name("sam-train")
    exe = os.environ.get("SAM_TRAIN") or (str(beside) if beside.is_file() else shutil.which("sam-train"))
    return [exe] if exe else [sys.executable, "-c", "from sam_repro.cli import train_main; train_main()"]


def start(argv: list[str], log_path: Path) -> Optional[subprocess.Popen]:
    """A command in its own process group (so that a stop reaches its workers too), output to log_path;
    None (and why, in log_path) when it cannot start."""
    with open(log_path, "w") as sink:
        try:
            # SIGINT back to its default: a shell's background job (nohup, `&`) starts with it ignored, and
            # the child would inherit that, so the stop at its share would never reach it
            return subprocess.Popen(argv, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        except OSError as err:
            sink.write(f"error: could not start {argv[0]}: {err}\n")
            return None


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_all(jobs: list[tuple[Optional[subprocess.Popen], float]]) -> list[tuple[Optional[int], bool, float]]:
    """Wait for every (process, seconds allowed); one that outlasts its seconds gets SIGINT (the runs
    record the interruption), then SIGKILL GRACE_S later. Returns (exit code, timed out, seconds).
    Stopped itself (Ctrl-C, SIGTERM), it stops them the same way first: they run in their own sessions."""
    began = time.monotonic()
    stop_at = [began + max(limit - GRACE_S, limit / 2) for _, limit in jobs]
    kill_at = [began + limit for _, limit in jobs]
    timed_out = [False] * len(jobs)
    ended: list[Optional[float]] = [began if proc is None else None for proc, _ in jobs]
    try:
        while any(e is None for e in ended):
            now = time.monotonic()
            for i, (proc, _) in enumerate(jobs):
                if ended[i] is not None or proc is None:
                    continue
                if proc.poll() is not None:
                    ended[i] = now
                    signal_group(proc, signal.SIGKILL)  # workers the command left behind
                elif now >= kill_at[i]:
                    signal_group(proc, signal.SIGKILL)
                elif now >= stop_at[i] and not timed_out[i]:
                    timed_out[i] = True
                    signal_group(proc, signal.SIGINT)
            time.sleep(0.2)
    except BaseException:
        running = [proc for proc, _ in jobs if proc is not None and proc.poll() is None]
        for proc in running:
            signal_group(proc, signal.SIGINT)
        for proc in running:
            try:
                proc.wait(GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)
        raise
    return [(None if proc is None else proc.returncode, stopped, end - began)
            for (proc, _), stopped, end in zip(jobs, timed_out, ended)]


def run_commands(w: Window, commands: list[tuple[str, list[str], float]]) -> list[Outcome]:
    """Run (label, argv, seconds allowed) all at once; each command and its output go to gpu.log."""
    logs = w.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [(start(argv, logs / f"{label}.log"), limit) for label, argv, limit in commands]
    outcomes = []
    for (label, argv, limit), (rc, timed_out, seconds) in zip(commands, wait_all(jobs)):
        output = (logs / f"{label}.log").read_text(errors="replace")
        print(f"\n===== {label}: {' '.join(argv)}\n===== allowed {limit:.0f} s; exit {rc}"
              f"{' (stopped at its time limit)' if timed_out else ''} after {seconds:.0f} s", file=w.log)
        w.log.write(output)
        w.log.flush()
        outcomes.append(Outcome(rc, timed_out, seconds, output))
    return outcomes


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "exception", "traceback", "failed")):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


# -- phase 1: the checks --------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    limit_s: float
    command: Callable[[Window], list[str]]
    cuda_only: bool = False  # a dry run on the CPU skips it
    judge: Callable[[Window, Outcome], tuple[bool, str]] = lambda w, o: (o.rc == 0, "")


def train(name: str, *overrides: str, multirun: bool = False) -> Callable[[Window], list[str]]:
    """A sam-train command on the mode's small problem, in its own runs_root below the work folder."""
    def command(w: Window) -> list[str]:
        return [*sam_train(), *(["-m"] if multirun else []), *w.mode.problem, f"engine.device={w.mode.device}",
                "engine.progress=false", f"runs_root={w.work / 'checks' / name}",
                *(o.format(device_batch=w.mode.device_batch) for o in overrides)]
    return command


def loader_command(w: Window) -> list[str]:
    """The device-resident loader with AutoAugment (and Cutout), on the JPEG CIFAR-10 when there is one:
    it also decodes and caches the folder that Table 4 then reads."""
    command = train("loader_autoaugment", "engine.loader=device", "augment=autoaugment")(w)
    if not w.data:
        return command
    return [*[a for a in command if not a.startswith("dataset")], "dataset=cifar10", "dataset.source=folder",
            f"dataset.root={w.data}", f"train_steps={w.mode.folder_steps}"]


def gpu_only_tests(tests: Path = REPO / "tests") -> list[str]:
    """The tests that skip themselves without CUDA (a `skipif` whose condition reads torch.cuda): the
    checks only a GPU can make (no host synchronization in the step or the loader, CUDA RNG replay)."""
    def cuda_skip(decorator: ast.expr) -> bool:
        return (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                and decorator.func.attr == "skipif" and bool(decorator.args)
                and "cuda" in ast.unparse(decorator.args[0]))

    found = []
    for path in sorted(tests.rglob("test_*.py")):  # tests/ mirrors the package: every folder
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(cuda_skip(d) for d in node.decorator_list):
                found.append(f"{path.relative_to(tests.parent).as_posix()}::{node.name}")
    return found


def pytest_command(w: Window) -> list[str]:
    dry = ["--collect-only"] if w.mode.device == "cpu" else []  # on the CPU they would only skip
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *dry, *gpu_only_tests()]


def judge_pytest(w: Window, outcome: Outcome) -> tuple[bool, str]:
    """pytest's last line; on a GPU a skipped test is a failure (it did not check what it is for)."""
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    if w.mode.device != "cpu" and "skipped" in summary:
        return False, f"{summary}: a GPU-only test skipped on the GPU"
    return outcome.rc == 0, summary + (" (a dry run collects them, a GPU runs them)" if w.mode.device == "cpu" else "")


CHECKS = (
    Check("solo_bf16", 75, train("solo_bf16", "optim=sam", "engine.precision=bf16")),
    Check("solo_fp32", 75, train("solo_fp32", "optim=sam", "engine.precision=fp32")),
    Check("per_device", 75, train("per_device", "optim=sam", "device_batch={device_batch}")),
    Check("pack", 75, train("pack", "hydra/launcher=pack", "device_batch={device_batch}", "optim=sam,sgd", "seed=0,1",
                            multirun=True)),
    Check("compile", 100, train("compile", "optim=sam", "engine.compile=true"), cuda_only=True),
    Check("cuda_graphs", 100, train("cuda_graphs", "optim=sam", "engine.cuda_graphs=true"), cuda_only=True),
    Check("loader_autoaugment", 75, loader_command),
    Check("gpu_tests", 75, pytest_command, judge=judge_pytest),
)


def check_line(w: Window, check: Check, outcome: Outcome) -> str:
    ok, note = check.judge(w, outcome)
    if outcome.timed_out:
        return f"{check.name}: TIMEOUT after {outcome.seconds:.0f} s: {last_error_line(outcome.output)}"
    if not ok:
        return f"{check.name}: FAILED in {outcome.seconds:.0f} s: {note or last_error_line(outcome.output)}"
    return f"{check.name}: ok in {outcome.seconds:.0f} s" + (f" ({note})" if note else "")


def check_skip_reason(w: Window, check: Check) -> Optional[str]:
    if check.name not in w.checks:
        return "not selected (--checks)"
    if check.cuda_only and w.mode.device == "cpu":
        return "a CUDA-only path (a dry run on the CPU)"
    return None


def run_checks(w: Window, seconds: float) -> str:
    """Every check selected, all at once, each with its own limit (within the phase's seconds)."""
    todo = [c for c in CHECKS if check_skip_reason(w, c) is None]
    commands = [(c.name, c.command(w), min(c.limit_s * w.mode.stretch, seconds)) for c in todo]
    try:
        outcomes = dict(zip((c.name for c in todo), run_commands(w, commands)))
    except KeyboardInterrupt:
        whys = [check_skip_reason(w, c) or "stopped by a signal" for c in CHECKS]
        (w.out / "checks.txt").write_text("".join(f"{c.name}: skipped: {why}\n" for c, why in zip(CHECKS, whys)))
        raise
    lines = [check_line(w, c, outcomes[c.name]) if c.name in outcomes
             else f"{c.name}: skipped: {check_skip_reason(w, c)}" for c in CHECKS]
    (w.out / "checks.txt").write_text("\n".join(lines) + "\n")
    states = [check_state(line) for line in lines]
    return ", ".join(f"{states.count(s)} {s}" for s in ("ok", "FAILED", "TIMEOUT", "skipped") if s in states) + \
        " (checks.txt)"


def check_state(line: str) -> str:
    """ok, FAILED, TIMEOUT or skipped: the word after the check's name."""
    return line.split(": ", 1)[1].split()[0].rstrip(":")


def checks_commands(w: Window) -> list[tuple[str, list[str]]]:
    return [(c.name, c.command(w)) for c in CHECKS if check_skip_reason(w, c) is None]


# -- phase 2: the benchmarks ----------------------------------------------------------------------
def bench_argv(w: Window, cmd: BenchCommand) -> list[str]:
    extra = ["--out", str(w.work / "bench")]
    if cmd.script == "bench_pack.py":
        extra += ["--profile", str(w.work / "profiles")]
    if cmd.script == "bench_engine.py" and w.data:
        extra += ["--data", w.data]  # the real JPEG CIFAR-10 (decoded once, cached by the loader check)
    return [sys.executable, str(REPO / "scripts" / cmd.script), *cmd.args, *extra]


def rows_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_bench(w: Window, seconds: float) -> str:
    """The bench commands one after another (each times things: never two at once), each with its
    share of what is left in proportion to its expected time, so that time one saves goes to the next."""
    end = time.monotonic() + seconds
    parts = [*w.mode.not_run, *(f"{c.name}: not selected (--bench)" for c in w.mode.bench if c.name not in w.benches)]
    commands = [c for c in w.mode.bench if c.name in w.benches]
    for k, cmd in enumerate(commands):
        share = (end - time.monotonic()) * cmd.expected_s / sum(c.expected_s for c in commands[k:])
        if share < 5:
            parts.append(f"{cmd.name}: skipped ({share:.0f} s left)")
            continue
        before = len(rows_in(w.work / "bench" / cmd.output))
        (outcome,) = run_commands(w, [(cmd.name, bench_argv(w, cmd), share)])
        rows = len(rows_in(w.work / "bench" / cmd.output)) - before
        state = "stopped at its time limit" if outcome.timed_out else "ok" if outcome.rc == 0 else \
            f"FAILED ({last_error_line(outcome.output)})"
        parts.append(f"{cmd.name}: {state}, {rows} rows in {outcome.seconds:.0f} s")
    for name in {c.output for c in commands}:
        if (w.work / "bench" / name).is_file():
            shutil.copy(w.work / "bench" / name, w.out / name)
    profiles = sorted((w.work / "profiles").glob("*.txt"))
    if profiles:
        (w.out / "profile_pack.txt").write_text("".join(f"===== {p.name}\n{p.read_text()}\n" for p in profiles))
    return "; ".join(parts)


def bench_figures(out: Path) -> list[str]:
    """One line per benchmark row with the figure its target is about."""
    keys = ("sam_over_sgd", "sam_extra_mem_over_param_bytes", "per_device_over_one_device_sam", "pack_over_solo",
            "ours_s_per_epoch", "speedup")
    labels = ("model", "precision", "compile", "cuda_graphs", "kind", "optim", "runs", "batch")
    lines = []
    for name in ("bench_step.jsonl", "bench_pack.jsonl", "bench_engine.jsonl"):
        for row in rows_in(out / name):
            label = " ".join(f"{k}={row[k]}" for k in labels if row.get(k) not in (None, False))
            figures = ", ".join(f"{k} {row[k]}" for k in keys if row.get(k) is not None)
            lines.append(f"  {name.split('.')[0]} {label}: {figures}")
    return lines


# -- phase 3: Table 4 at one seed -----------------------------------------------------------------
def table4_command(w: Window, optim: str) -> list[str]:
    return [*sam_train(), "-m", "hydra/launcher=pack", f"experiment={TABLE4}", f"optim={optim}", "seed=0",
            "dataset.source=folder", f"dataset.root={w.data}", "engine.progress=false",
            f"runs_root={w.work / 'runs' / w.name}", *w.mode.table4, *w.overrides]


def run_table4(w: Window, seconds: float) -> str:
    """SAM's pack first with 2/3 of the time (two passes per step), then SGD's with what is left:
    both end near the same epoch when neither finishes."""
    end = time.monotonic() + seconds
    runs = w.work / "runs"
    try:
        for optim, fraction in (("sam", 2 / 3), ("sgd", 1.0)):
            run_commands(w, [(f"table4_{optim}", table4_command(w, optim), (end - time.monotonic()) * fraction)])
    finally:  # stopped or not, what was trained comes back
        archive_runs(runs, w.name, w.out / "table4_runs.tar.gz")
    return table4_summary(runs / w.name)


def archive_runs(runs: Path, name: str, archive: Path) -> None:
    """runs/<name> as one archive, without checkpoints (a device returns at most 16 MiB a file) and
    without the sweeps' manifests."""
    for path in [*runs.glob("**/*.pt"), *runs.glob("**/.sweeps")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if (runs / name).is_dir():
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(runs / name, arcname=name)


def table4_summary(root: Path) -> str:
    """Per optimizer: epochs done, seconds per epoch of its pack, the test errors by noise rate; then
    what a whole seed (both packs, every epoch) would take at those speeds: the figure the Table 4
    target (<= 10 min on one GPU) is about when the window ends first."""
    runs = [(json.loads(p.read_text()), rows_in(p.with_name("metrics.jsonl")))
            for p in sorted(root.glob("**/metrics.json"))]
    parts, pack_s = [], []  # pack_s: a whole schedule of each pack, where it can be told
    for optim in ("sam", "sgd"):
        mine = sorted(((s, r) for s, r in runs if s["config"]["optimizer"] == optim),
                      key=lambda run: run[0]["config"]["label_noise"])
        epoch_s = [row["epoch_s"] for _, rows in mine for row in rows if "epoch_s" in row]
        if not epoch_s:
            parts.append(f"{optim}: {len(mine)} runs, no epoch finished")
            continue
        config, per_epoch = mine[0][0]["config"], statistics.median(epoch_s)
        if config.get("train_steps"):  # a step-limited run: its epochs say nothing about a whole one
            done = f"train_steps={config['train_steps']}"
        else:
            done = f"{min(s['epochs_done'] for s, _ in mine)}/{config['epochs']} epochs"
            pack_s.append(per_epoch * config["epochs"])
        states = ", ".join(sorted({run_state(s) for s, _ in mine}))
        errors = " / ".join(f"{(s.get('final') or {}).get('test_err', float('nan')):.1f}" for s, _ in mine)
        noise = " / ".join(f"{s['config']['label_noise']:g}" for s, _ in mine)
        parts.append(f"{optim}: {len(mine)} runs, {done} ({states}), {per_epoch:.2f} s/epoch, "
                     f"test_err {errors} % at noise {noise}")
    whole = f"; a whole seed at these speeds: {sum(pack_s) / 60:.1f} min" if len(pack_s) == 2 else ""
    return f"{len(runs)} runs in {root.name} (table4_runs.tar.gz): " + "; ".join(parts) + whole


def run_state(summary: dict) -> str:
    """A run's status; run directories written before status `interrupted` existed said `running` with
    an `interrupted (...)` error."""
    interrupted = summary["status"] == "running" and "interrupted" in (summary.get("error") or "")
    return "interrupted" if interrupted else summary["status"]


# -- the phases and the plan ----------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    name: str
    minimum_s: float  # less than this and the phase is not worth starting
    limit_s: Optional[float]  # the most it may take (None: all that is left)
    run: Callable[[Window, float], str]  # given its seconds, does its work; returns its summary
    commands: Callable[[Window], list[tuple[str, list[str]]]]  # what it would run (--plan)
    needs_data: bool = False


PHASES = (
    Phase("checks", 45, 100, run_checks, checks_commands),
    Phase("bench", 60, 200, run_bench,
          lambda w: [(c.name, bench_argv(w, c)) for c in w.mode.bench if c.name in w.benches]),
    Phase("table4", 120, None, run_table4,
          lambda w: [(f"table4_{o}", table4_command(w, o)) for o in ("sam", "sgd")], needs_data=True),
)


def plan(budget_s: float, phases: tuple[Phase, ...], selected: list[str], have_data: bool) -> list[Optional[str]]:
    """For each phase None (it runs) or why it is skipped: decided from the budget and the declared
    minimums alone, never from a clock, so the same budget always gives the same plan."""
    left = budget_s - RESERVE_S
    whys: list[Optional[str]] = []
    for phase in phases:
        why = None
        if phase.name not in selected:
            why = "not selected (--phases)"
        elif phase.needs_data and not have_data:
            why = NO_DATA
        elif phase.minimum_s > left:
            why = (f"needs at least {phase.minimum_s:g} s; the budget leaves {max(left, 0):g} s after {RESERVE_S} s "
                   f"kept for the archive and the minimums of the phases before it")
        else:
            left -= phase.minimum_s
        whys.append(why)
    return whys


def plan_lines(budget_s: float, whys: list[Optional[str]], mode: Mode) -> list[str]:
    lines = [f"plan for {budget_s:g} s ({RESERVE_S} s kept for the archive and this summary):"]
    for phase, why in zip(PHASES, whys):
        limit = f"up to {phase.limit_s * mode.stretch:g} s" if phase.limit_s else "all that is left"
        lines.append(f"  {phase.name}: skipped: {why}" if why else
                     f"  {phase.name}: runs, at least {phase.minimum_s:g} s, {limit}")
    return lines


def gpu_line(mode: Mode) -> str:
    if mode.device == "cpu":
        return "no GPU: a dry run on the CPU"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "nvidia-smi printed nothing"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi did not run ({err})"


def runs_name(device: str) -> str:
    """Table 4's runs are budget rows (the JPEG copy, one window): the name says so, and where."""
    if device.startswith("no GPU"):
        return "budget_cpu_cifar10jpeg_table4_test"
    if device.startswith("nvidia-smi"):
        return "budget_gpu_cifar10jpeg_table4"
    model = next((t for t in device.split(",")[0].replace("-", " ").split() if any(ch.isdigit() for ch in t)), "gpu")
    return f"budget_{model.lower()}_cifar10jpeg_table4"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("budget_s", type=float, help="seconds for everything (the archive included)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for Table 4's sam-train calls")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU with tiny settings")
    parser.add_argument("--plan", action="store_true", help="print the plan and every command; run nothing")
    parser.add_argument("--phases", default=",".join(p.name for p in PHASES), help="comma-separated, of: %(default)s")
    parser.add_argument("--checks", default=",".join(c.name for c in CHECKS), help="comma-separated, of: %(default)s")
    parser.add_argument("--bench", default=",".join(c.name for c in GPU.bench), help="comma-separated, of: %(default)s")
    parser.add_argument("--name", help="Table 4's runs folder (default: budget_<gpu>_cifar10jpeg_table4)")
    args = parser.parse_args(argv)
    for option, given, known in (("--phases", args.phases, [p.name for p in PHASES]),
                                 ("--checks", args.checks, [c.name for c in CHECKS]),
                                 ("--bench", args.bench, [c.name for c in GPU.bench])):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            bad_input(f"{option}={given!r}: {', '.join(unknown)} unknown; allowed: {', '.join(known)}")
    if args.budget_s <= 0:
        bad_input(f"budget_s={args.budget_s:g}: must be > 0 (seconds)")
    return args


def bad_input(line: str) -> None:
    print(f"scripts/gpu.sh: error: {line}", file=sys.stderr)
    sys.exit(2)


def stop(signum: int, frame: object) -> None:
    """SIGTERM (`timeout`, a scheduler) as Ctrl-C: the running commands are stopped, the summary written."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    mode = MODES["dry-run" if args.dry_run else "gpu"]
    out = Path(os.environ.get("OUT") or REPO / "results" / "bench" / f"gpu-{date.today():%Y%m%d}").resolve()
    data = os.environ.get("SAM_CIFAR10_JPEG") or None
    device = gpu_line(mode)
    work = Path(tempfile.mkdtemp(prefix="gpu-sh-")) if not args.plan else Path(tempfile.gettempdir()) / "gpu-sh-PLAN"
    w = Window(mode, out, work, began + args.budget_s - RESERVE_S, data, args.name or runs_name(device),
               args.overrides, args.checks.split(","), args.bench.split(","))
    whys = plan(args.budget_s, PHASES, args.phases.split(","), data is not None)
    head = [f"device: {device}", *plan_lines(args.budget_s, whys, mode)]
    if args.plan:
        print("\n".join(head))
        for phase, why in zip(PHASES, whys):
            for label, command in ([] if why else phase.commands(w)):
                print(f"$ {phase.name}/{label}: {' '.join(command)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "gpu.txt"

    def say(line: str) -> None:  # the summary grows as phases end: a window cut short keeps what was done
        print(line, flush=True)
        with open(summary, "a") as f:
            f.write(line + "\n")

    summary.write_text("")
    for line in head:
        say(line)
    signal.signal(signal.SIGTERM, stop)
    stopped = False
    with open(out / "gpu.log", "a") as log:
        w.log = log
        for k, (phase, why) in enumerate(zip(PHASES, whys)):
            later = sum(p.minimum_s for p, y in zip(PHASES[k + 1:], whys[k + 1:]) if y is None)
            seconds = w.left() - later
            if phase.limit_s is not None:
                seconds = min(seconds, phase.limit_s * mode.stretch)
            if why is None and seconds < phase.minimum_s / 2:
                why = f"only {seconds:.0f} s left at its start (the phases before it overran)"
            if why is not None:
                say(f"phase {phase.name}: skipped: {why}")
                if phase.name == "checks":
                    (out / "checks.txt").write_text("".join(f"{c.name}: skipped: the checks phase did not run: {why}\n"
                                                            for c in CHECKS))
                continue
            t0 = time.monotonic()
            try:
                result = phase.run(w, seconds)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: its commands were stopped; say so, run nothing more
                say(f"phase {phase.name}: stopped by a signal after {time.monotonic() - t0:.0f} s")
                stopped = True
                break
            say(f"phase {phase.name}: {result} [{time.monotonic() - t0:.0f} s of {seconds:.0f}]")
    for line in bench_figures(out):
        say(line)
    shutil.rmtree(work, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    stray = [name for name in files if name not in FILES]
    say(f"done in {time.monotonic() - began:.0f} s of {args.budget_s:g}; {out}: {', '.join(files)}"
        + (f"; NOT returned by a device: {', '.join(stray)}" if stray else ""))
    checks = out / "checks.txt"
    states = [check_state(line) for line in checks.read_text().splitlines()] if checks.is_file() else []
    return 130 if stopped else 1 if {"FAILED", "TIMEOUT"} & set(states) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
