"""The reference trajectories are the files their README lists, byte for byte (sha256), and each holds
the keys the method tests read for all 8 steps."""
from __future__ import annotations

import hashlib
import re

import pytest

from tests.optim.methods.methods_helpers import FIXTURES, PARAMS, STEPS, fixture

LISTED = dict(re.findall(r"^\| `([\w.]+\.npz)` \| ([0-9a-f]{64}) \|$", (FIXTURES / "README.md").read_text(), re.M))


def test_the_readme_lists_every_fixture_file_and_no_other() -> None:
    assert LISTED and set(LISTED) == {p.name for p in FIXTURES.glob("*.npz")}


@pytest.mark.parametrize("name", sorted(LISTED))
def test_each_file_has_its_listed_sha256(name: str) -> None:
    assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == LISTED[name]


@pytest.mark.parametrize("name", sorted(n.removesuffix(".npz") for n in LISTED if n != "data.npz"))
def test_each_trajectory_has_every_step_of_every_parameter(name: str) -> None:
    fx = fixture(name)
    for key in ("param", "grad", "buffer", "buffer_firstpass"):
        assert all(fx[f"{key}/{p}"].shape[0] == STEPS for p in PARAMS if f"{key}/{p}" in fx)
    assert all(f"param/{p}" in fx and f"grad/{p}" in fx for p in PARAMS)
    assert fx["loss"].shape == (STEPS,) and fx["n_forwards"].shape == (STEPS,)
