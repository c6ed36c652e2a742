"""A non-editable install (`pip install .`) ships every subpackage and the whole config tree."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sam_repro.config import config_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_packages_and_configs_and_finds_them_when_installed(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("sam_repro-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "sam_repro").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel (pyproject packages list)"
    configs = {str(p.relative_to(config_dir())) for p in config_dir().rglob("*.yaml")}
    assert configs and all(f"sam_repro/conf/{c}" in names for c in configs)
    assert "sam_repro/report/paper_tables.csv" in names
    assert "hydra_plugins/sam_repro_pack_launcher/pack_launcher.py" in names  # hydra/launcher=pack

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([sys.executable, "-c", "from sam_repro.config import config_dir; print(config_dir())"],
                           cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    found = Path(probe.stdout.strip())
    assert found.is_relative_to(site) and (found / "train.yaml").is_file()
    assert (found / "experiment" / "t1_cifar10_wrn28_10_200ep.yaml").is_file()
