"""Summarize a mutmut run per module: killed / survived / timeout / other, and every survivor's diff.

    python scripts/mutation_summary.py --out results/mutation [--label after]

Reads `mutmut results --all true` (run from the repository root, after `mutmut run`) and the
mutants' wall times from mutmut's log (mutants/mutmut-debug.log*, `log_to_file = true`); writes
<out>/<label>.json (counts and mutant-seconds per module) and <out>/<label>.md (the table and the
surviving mutants' diffs, for the equivalence review in docs/testing.md).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

MUTMUT = str(Path(sys.executable).parent / "mutmut")
LINE = re.compile(r"^\s+(?P<name>[\w.]+__mutmut_\d+): (?P<status>.+)$")
COMPLETED = re.compile(r"Completed (?P<name>\S+__mutmut_\d+): exit=-?\d+ \((?P<seconds>[\d.]+)s\)")
LOG = Path("mutants/mutmut-debug.log")


def module_of(mutant: str) -> str:
    """sam_repro.engine.schedule.x_cosine__mutmut_3 -> sam_repro/engine/schedule.py (the last dotted
    part names the function, x_<name>, or the method, x<Class>ǁ<name>)."""
    parts = mutant.split("__mutmut_")[0].split(".")[:-1]
    path = "/".join(parts) + ".py"
    return path if Path(path).is_file() else "/".join(parts) + "/__init__.py"


def read_results() -> dict[str, str]:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return {m["name"]: m["status"].strip() for m in map(LINE.match, out.splitlines()) if m}


def diff_of(name: str) -> str:
    """`mutmut show NAME`'s text, computed in this process (a `mutmut show` per survivor costs ~0.5 s
    of start-up each: minutes for a few hundred survivors); the command itself if that API moved."""
    try:
        import mutmut.__main__ as mm

        mutant = mm.find_mutant(name)
        status = mm.status_by_exit_code[mutant.exit_code_by_key[name]]
        return f"# {name}: {status}\n{mm.get_diff_for_mutant(name, path=mutant.path)}".strip()
    except (ImportError, AttributeError, TypeError):
        return subprocess.run([MUTMUT, "show", name], capture_output=True, text=True).stdout.strip()


def mutant_seconds() -> dict[str, float]:
    """Each mutant's wall time in its forked test process, from the fork server's log (the newest
    entry wins when a mutant was re-run). Empty when the log is absent."""
    seconds: dict[str, float] = {}
    for log in sorted(LOG.parent.glob(LOG.name + ".*"), reverse=True) + [LOG]:  # rotated: .3 oldest
        if log.is_file():
            for m in COMPLETED.finditer(log.read_text(errors="replace")):
                seconds[m["name"]] = float(m["seconds"])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/mutation"))
    ap.add_argument("--label", default="summary")
    args = ap.parse_args()
    results = read_results()
    per_module: dict[str, Counter] = defaultdict(Counter)
    timed = mutant_seconds()
    seconds: Counter = Counter()
    for name, status in results.items():
        per_module[module_of(name)][status] += 1
        seconds[module_of(name)] += timed.get(name, 0.0)
    statuses = ["killed", "survived", "timeout", "no tests", "not checked", "suspicious", "segfault"]
    extra = sorted({s for c in per_module.values() for s in c} - set(statuses))
    cols = [s for s in statuses + extra if any(c[s] for c in per_module.values())]
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {mod: {**dict(sorted(c.items())), "mutant_seconds": round(seconds[mod], 1)}
              for mod, c in sorted(per_module.items())}
    (args.out / f"{args.label}.json").write_text(json.dumps(counts, indent=2) + "\n")
    lines = [f"# Mutation testing: {args.label}", "",
             "mutant s: the wall seconds of the module's mutants' test processes, summed (two run at once).", "",
             "| module | " + " | ".join(cols) + " | mutant s |", "|---|" + "---|" * (len(cols) + 1)]
    total: Counter = Counter()
    for mod, c in sorted(per_module.items()):
        total.update(c)
        lines.append(f"| {mod} | " + " | ".join(str(c[s]) for s in cols) + f" | {seconds[mod]:.0f} |")
    lines.append("| **all** | " + " | ".join(str(total[s]) for s in cols) + f" | {sum(seconds.values()):.0f} |")
    survivors = sorted(n for n, s in results.items() if s not in ("killed", "not checked"))
    lines += ["", f"## Not killed ({len(survivors)})", ""]
    for name in survivors:
        lines += [f"### {name}: {results[name]}", "", "```diff", diff_of(name), "```", ""]
    (args.out / f"{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 6 + len(per_module) + 1]))


if __name__ == "__main__":
    main()
