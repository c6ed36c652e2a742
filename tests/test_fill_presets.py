"""The presets behind the report's fill commands: each one's composed config fills its paper cell.

Composes every Table 1, 4 and 5 preset (about 20 s), so it lives apart from the report's unit tests
and outside `make mutate`'s test selection: report/paper.py's and report/tables.py's own tests check
the fill commands and the cell filter that this test joins to configs/.
"""
from __future__ import annotations


def test_presets_named_by_fill_commands_produce_runs_that_fill_those_cells() -> None:
    """The fill command of every Table 1/4/5 cell names a preset whose composed config is exactly
    the setting the report accepts for that cell (else a preset's runs would land in budget.md)."""
    import re

    from sam_repro.report.paper import expected, fill_command
    from sam_repro.report.tables import differences, paper_cells
    from sam_repro.runlog import summary_config
    from tests.conftest import REPO, composed_shared

    checked = 0
    for _, cell in paper_cells().iterrows():
        if cell["method"] not in ("sam", "sgd"):
            continue  # the literature's methods (Tables 3, 4) have no preset of ours
        cmd = fill_command(int(cell["table"]), cell, [cell["method"]])
        overrides = [o for o in re.findall(r"(\S+=\S+)", cmd) if not o.startswith("seed=")]
        assert (REPO / "configs/experiment" / f"{overrides[0].split('=')[1]}.yaml").is_file(), cmd
        cfg = composed_shared(overrides)  # read only; tests/test_scripts.py composes the same 138 settings
        setting = {**summary_config(cfg, "bf16"), "data.source": cfg.dataset.source}  # what the run would log
        assert differences(setting, expected(cell)) == [], cmd
        checked += 1
    assert checked == 60 + 36 + 36 + 8 + 16
