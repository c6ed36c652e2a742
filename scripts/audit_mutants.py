"""Re-apply the audit's surviving mutants (issue 12), one at a time, and check a test now kills each.

    .venv/bin/python scripts/audit_mutants.py [name ...]

Each mutant is a literal edit of one source line; the named test file must fail with it and the
file is restored afterwards (also on Ctrl-C). A quick check (about 2 minutes) beside `make mutate`;
it edits the checkout's sources while it runs, so run nothing else on the same checkout meanwhile.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, file, original text, mutated text, the test file that must kill it)
MUTANTS = [
    ("cosine step+1", "sam_repro/engine/schedule.py", "progress = (step - warmup)", "progress = (step + 1 - warmup)", "tests/engine/test_schedule.py"),
    ("warmup from 0", "sam_repro/engine/schedule.py", "min(1.0, (step + 1) / warmup)", "min(1.0, step / warmup)", "tests/engine/test_schedule.py"),
    ("bisect_left", "sam_repro/engine/schedule.py", "bisect.bisect_right", "bisect.bisect_left", "tests/engine/test_schedule.py"),
    ("noise +1", "sam_repro/data/noise.py", "[: round(rate * n)]", "[: round(rate * n) + 1]", "tests/data/test_label_noise.py"),
    ("noise no last class", "sam_repro/data/noise.py", "torch.randint(num_classes, (len(chosen),)", "torch.randint(num_classes - 1, (len(chosen),)", "tests/data/test_label_noise.py"),
    ("val_fraction ignored", "sam_repro/report/tables.py", "if not _same(val, exp.val_fraction):", "if False:", "tests/report/test_report_cells.py"),
    ("nan counted", "sam_repro/report/load.py", "    if not _finite(final.get(\"test_err\")):", "    if final.get(\"test_err\") is None:", "tests/report/test_report_cells.py"),
    ("grad_clip 0", "sam_repro/validate.py", "o.grad_clip is None or o.grad_clip > 0", "not o.grad_clip or o.grad_clip > 0", "tests/test_validate.py"),
    ("momentum 1", "sam_repro/validate.py", "0 <= o.momentum < 1", "0 <= o.momentum <= 1", "tests/test_validate.py"),
    ("epochs_done rows", "sam_repro/runlog.py", 'epochs_done=history[-1]["epoch"]', "epochs_done=len(history)", "tests/test_runlog.py"),
    ("non-atomic ckpt", "sam_repro/rundir.py", '    tmp = _write_temporary(current, lambda f: torch.save(state, f), "wb")', '    torch.save(state, current)\n    return', "tests/engine/test_checkpoint.py"),
    ("non-atomic write", "sam_repro/rundir.py", 'fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")', 'fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), str(path)', "tests/engine/test_checkpoint.py"),
    ("crop [0,2p)", "sam_repro/data/augment.py", "dy = randint(2 * p + 1,", "dy = randint(2 * p,", "tests/data/test_augment_draws.py"),
]


def killed(path: Path, old: str, new: str, test: str) -> tuple[bool, str]:
    """Apply one mutant, run its test file, restore the source; (the tests failed?, last line)."""
    src = path.read_text()
    assert src.count(old) == 1, f"{path}: the original text must occur exactly once: {old!r}"
    path.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                           cwd=REPO, capture_output=True, text=True)
    finally:
        path.write_text(src)
    return r.returncode == 1, (r.stdout.strip().splitlines() or [""])[-1]


def main() -> int:
    wanted = set(sys.argv[1:])
    survivors = 0
    for name, file, old, new, test in MUTANTS:
        if wanted and name not in wanted:
            continue
        ok, last = killed(REPO / file, old, new, test)
        survivors += not ok
        print(f"{'killed  ' if ok else 'SURVIVED'} {name:22s} {test}: {last}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
