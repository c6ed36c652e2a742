"""The project stands on its own: no tracked file cites a file its users do not have, every
docs/paper.md section a file cites exists, and docs/paper.md's per-preset tables match the presets.

docs/paper.md is the project's account of the paper and the official code; code, configs and docs
cite it (or the paper's own sections). Notes kept beside a development checkout are not shipped, so
a citation of them, or of a path on the machine the project was developed on, is a dead end for
a user.
"""
from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PAPER_DOC = ROOT / "docs" / "paper.md"

# What a user of the project does not have. Each pattern is written so that it does not match its
# own line here (an escaped character sits inside the cited name), so this file needs no exemption.
FORBIDDEN = {
    "the paper-notes file outside the project (cite docs/paper.md)": re.compile(r"PAPER\.md"),
    "the design-notes file outside the project (cite docs/*.md)": re.compile(r"DESIGN\.md"),
    "notes on the design kept outside the project (cite docs/*.md)": re.compile(r"(?i)\bdesign (doc|note)"),
    "a folder beside the checkout": re.compile(r"\.\./shared"),
    "a folder of the development machine's shared notes": re.compile(r"\bshared/(reference|device|wheels|hooks)\b"),
    "a path on the development machine": re.compile(r"/work\/"),
}
# A committed run directory records the paths that run actually used (its data root, its runs
# root): those are facts of the run, not citations, and a log is never rewritten after the fact.
RUN_RECORDS = {"config.yaml", "metrics.json", "metrics.jsonl", "sharpness.json", "train.log"}
# A citation of a docs/paper.md section: `docs/paper.md#<anchor>` anywhere, `paper.md#<anchor>` in a
# docs/ page's link, `(#<anchor>)` inside docs/paper.md itself.
CITED_ANCHOR = re.compile(r"(?:docs/)?paper\.md#([\w-]+)")
LOCAL_ANCHOR = re.compile(r"\]\(#([\w-]+)\)")
# A number in a table cell; not the digits of a name such as "C10".
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?")


def tracked_text_files() -> list[tuple[str, str]]:
    """(path relative to the root, text) of every file git tracks that is UTF-8 text."""
    try:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the tracked files cannot be listed")
    files = []
    for rel in listing.stdout.decode().split("\0"):
        path = ROOT / rel
        if not rel or not path.is_file():  # a file deleted in the working tree but not yet in git
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files.append((rel, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return files


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def paper_doc_anchors() -> set[str]:
    """Every anchor docs/paper.md's headings define (a repeated heading gets GitHub's -1, -2 suffix)."""
    anchors: set[str] = set()
    in_code = False
    for line in PAPER_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)", line)
        if match:
            slug, n = github_slug(match.group(1)), 0
            while (slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_slug_follows_githubs_rule() -> None:
    """Examples of GitHub's anchors, worked out by hand from its rule (so the check below is right)."""
    assert github_slug("Table 1: CIFAR from scratch") == "table-1-cifar-from-scratch"
    assert github_slug("m-sharpness and the per-device batch") == "m-sharpness-and-the-per-device-batch"
    assert github_slug("Averaging, clipping and the base step") == "averaging-clipping-and-the-base-step"
    assert github_slug("The recipe (`augment=none`) & more") == "the-recipe-augmentnone--more"


def test_no_tracked_file_cites_a_file_users_do_not_have() -> None:
    offending = []
    for rel, text in tracked_text_files():
        if rel.startswith("results/runs/") and Path(rel).name in RUN_RECORDS:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    offending.append(f"{rel}:{number}: {what}: {line.strip()[:120]}")
    assert not offending, ("cite docs/paper.md (with its section), the paper's own sections, or the "
                           "right docs/*.md page instead:\n" + "\n".join(offending))


def test_every_cited_docs_paper_section_exists() -> None:
    anchors = paper_doc_anchors()
    assert {"the-algorithm", "hyperparameters-per-setting", "what-the-presets-assume"} <= anchors
    dangling = []
    for rel, text in tracked_text_files():
        for number, line in enumerate(text.splitlines(), start=1):
            cited = [m.group(1) for m in CITED_ANCHOR.finditer(line)
                     if m.group(0).startswith("docs/") or rel.startswith("docs/")]
            if rel == "docs/paper.md":
                cited += [m.group(1) for m in LOCAL_ANCHOR.finditer(line)]
            dangling += [f"{rel}:{number}: #{anchor}" for anchor in cited if anchor not in anchors]
    assert not dangling, "docs/paper.md has no section with these anchors:\n" + "\n".join(dangling)


def section_table_rows(heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first markdown table under `### heading` in docs/paper.md."""
    lines = PAPER_DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"### {heading}")
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if in_table and not set("".join(cells)) <= set("-: "):
                rows.append(cells)
            in_table = True
        elif in_table:
            break
    assert rows, f"no table under '### {heading}' in docs/paper.md"
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(cell)]


def preset(name: str) -> dict:
    """A preset file's own values (no composition: what the file itself says)."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "experiment" / f"{name}.yaml"))


def test_docs_paper_table1_rows_are_the_presets_values() -> None:
    rows = section_table_rows("Table 1: CIFAR from scratch")
    assert len(rows) == 5  # the five model rows of the paper's Table 1
    for _, setting, epochs, lr, wd, rho in rows:
        lrs = numbers(lr) * (2 // len(numbers(lr)))  # one value: both datasets; two: C10 then C100
        for dataset, lr_value, rho_value in zip(("cifar10", "cifar100"), lrs, numbers(rho)):
            values = preset(f"t1_{dataset}_{setting.strip('`')}")
            assert (values["epochs"], values["optim"]["lr"], values["optim"]["weight_decay"],
                    values["method_rho"]["sam"], values["batch_size"], values["device_batch"]) == (
                numbers(epochs)[0], lr_value, numbers(wd)[0], rho_value, 256, 32), (dataset, setting)


def test_docs_paper_table5_rows_are_the_presets_values() -> None:
    rows = section_table_rows("Table 5: SVHN and Fashion-MNIST")
    assert len(rows) == 4
    for _, _, lr, wd, rho, name in rows:
        values = preset(name.strip("`"))
        assert (values["optim"]["lr"], values["optim"]["weight_decay"], values["method_rho"]["sam"],
                values["batch_size"], values["device_batch"]) == (
            numbers(lr)[0], numbers(wd)[0], numbers(rho)[0], 256, 32), name
