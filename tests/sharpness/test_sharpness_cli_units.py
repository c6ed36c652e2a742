"""`sam-sharpness`'s pieces one by one (sam_repro/sharpness/cli.py), cheaply: the options and the
defaults their help states, the argument checks, each part's JSON block against the instrument
called directly with the documented arguments (on the small CNN of tests/sharpness/test_sharpness.py), the
setup block, the merge into an existing sharpness.json, discovery below a root, and main's exits."""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from sam_repro.sharpness import cli as C
from sam_repro.sharpness import hessian, landscape, msharpness
from sam_repro.sharpness.objective import Objective, prepare_model
from tests.sharpness.test_sharpness_units import net_problem

F64 = torch.float64


def parse(*args: str) -> argparse.Namespace:
    return C._parser().parse_args(list(args))


def stated(value) -> str:
    """A default as the help text writes it: lists comma-joined, floats in %g."""
    if isinstance(value, list):
        return ",".join(stated(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_option_has_its_help_and_every_default_is_the_one_it_states() -> None:
    """The help says "default X" exactly where the option has a default, and X is it; an option
    without one (a path, a flag) defaults to None / False."""
    import re

    p = C._parser()
    actions = [a for a in p._actions if a.dest != "help"]
    keys = [a.option_strings[0] if a.option_strings else a.dest for a in actions]
    assert sorted(keys) == sorted(C.HELP) and p.description == C.DESCRIPTION
    for action, key in zip(actions, keys):
        assert action.help == C.HELP[key], key
        said = re.search(r"default ([^);]+)\)?$", C.HELP[key])
        if said is None:
            assert action.default in (None, False, []), key
        else:
            want = " ".join(stated(v) for v in action.default) if action.nargs == 2 else stated(action.default)
            assert said.group(1) == want, (key, action.default)


def test_the_help_page_names_the_program_its_groups_and_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse("--help")
    page = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert e.value.code == 0 and page.startswith("usage: sam-sharpness [-h] ")
    assert "[RUN_DIR ...]" in page and "--interp-range T_MIN T_MAX" in page
    for group in ("data and objective:", "hessian:", "m-sharpness:", "landscape:"):
        assert group in page
    for text in C.HELP.values():
        assert " ".join(text.split()) in page
    assert parse().run_dirs == [] and parse().parts == "hessian,msharpness,landscape"
    assert parse().graph_memory == 4.0 and parse().interp_range == [-0.5, 1.5]


def test_every_option_parses_to_its_type() -> None:
    a = parse("r1", "r2", "--runs", "root", "--missing-only", "--parts", "hessian", "--subset", "64", "--seed", "3",
              "--batch-size", "8", "--bn", "train", "--weight-decay", "in", "--dtype", "fp64", "--data-root", "d",
              "--threads", "2", "--hvp", "forward", "--graph-memory", "0.5", "--top-k", "3", "--lanczos-iters", "7",
              "--lanczos-tol", "0.01", "--trace-probes", "9", "--trace-tol", "0.1", "--density",
              "--density-probes", "2", "--density-iters", "5", "--m", "4,8", "--rho", "0.1,0.2",
              "--ascent-steps", "3", "--points", "5", "--grid", "3", "--span", "0.5", "--interpolate",
              "--interp-points", "4", "--interp-range", "-1", "2")
    assert vars(a) == {
        "run_dirs": ["r1", "r2"], "runs": "root", "missing_only": True, "parts": "hessian", "subset": 64, "seed": 3,
        "batch_size": 8, "bn": "train", "weight_decay": "in", "dtype": "fp64", "data_root": "d", "threads": 2,
        "hvp": "forward", "graph_memory": 0.5, "top_k": 3, "lanczos_iters": 7, "lanczos_tol": 0.01,
        "trace_probes": 9, "trace_tol": 0.1, "density": True, "density_probes": 2, "density_iters": 5,
        "m": [4, 8], "rho": [0.1, 0.2], "ascent_steps": 3, "points": 5, "grid": 3, "span": 0.5,
        "interpolate": True, "interp_points": 4, "interp_range": [-1.0, 2.0]}
    assert all(type(v) is int for v in (a.subset, a.seed, a.batch_size, a.threads, a.top_k, a.points, a.grid))
    assert type(a.graph_memory) is float and type(a.span) is float and all(type(v) is float for v in a.interp_range)
    assert C._ints("4, 8,") == [4, 8] and C._floats("0.1,,2") == [0.1, 2.0]


@pytest.mark.parametrize("option", ["--bn", "--weight-decay", "--dtype", "--hvp"])
def test_choices_are_enforced(option: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(option, "bogus")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert C._parser()._option_string_actions[option].choices is not None


# -- argument checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, problem", [
    (["r"], None),
    (["r", "--subset", "1", "--batch-size", "1", "--m", "1", "--top-k", "1"], None),  # the smallest allowed
    (["r", "--parts", "hessian,bogus"], "--parts bogus: not a part; choose from hessian,msharpness,landscape"),
    (["r", "--parts", "a,hessian,b"], "--parts a,b: not a part; choose from hessian,msharpness,landscape"),
    (["r", "--subset", "0"], "--subset 0 and --batch-size 256 must be >= 1"),
    (["r", "--batch-size", "0"], "--subset 512 and --batch-size 0 must be >= 1"),
    (["r", "--m", "0"], "--m 0 does not divide --subset 512 (chunks of m examples must tile the subset)"),
    (["r", "--m", "16,100"], "--m 100 does not divide --subset 512 (chunks of m examples must tile the subset)"),
    (["r", "--m", "100", "--parts", "hessian"], None),  # m is checked only when measured
    (["r", "--ascent-steps", "0"], "--ascent-steps 0 must be >= 1 and every --rho > 0"),
    (["r", "--rho", "0.05,0"], "--ascent-steps 1 must be >= 1 and every --rho > 0"),
    (["r", "--rho", "-0.1", "--parts", "landscape"], None),
    (["r", "--top-k", "0"], "--top-k 0 must be >= 1"),
    (["r", "--top-k", "0", "--parts", "msharpness"], None),
    (["r", "--graph-memory", "-0.5"], "--graph-memory -0.5 must be >= 0 (GiB; 0 keeps no graph)"),
    (["r", "--graph-memory", "0"], None),
    (["r", "--interpolate"], "--interpolate needs exactly two RUN_DIRs, got 1"),
    (["r", "s", "--interpolate"], None),
    ([], "give RUN_DIRs or --runs ROOT (one of the two)"),
    (["r", "--runs", "root"], "give RUN_DIRs or --runs ROOT (one of the two)"),
    (["--runs", "root"], None),
])
def test_check_args(args: list[str], problem: str | None) -> None:
    a = parse(*args)
    assert C._check_args(a, [p for p in a.parts.split(",") if p]) == problem


# -- each part's block, on a small network ----------------------------------------------------------

@pytest.fixture(scope="module")
def obj() -> Objective:
    model, x, y = net_problem(n=12)  # 39 parameters: every part in milliseconds
    return Objective.build(prepare_model(model, "eval", F64), x, y, batch_size=4)


def test_hessian_block_is_the_instruments_output_with_the_options(obj: Objective) -> None:
    a = parse("r", "--top-k", "5", "--lanczos-iters", "12", "--lanczos-tol", "1e-6", "--trace-probes", "6",
              "--trace-tol", "0", "--seed", "2")
    block = C._hessian(obj, a)
    mv = obj.flat_hvp("reverse")
    top = hessian.top_eigenvalues(mv, obj.dim, 5, 12, 1e-6, 2, F64, "cpu")
    trace = hessian.hutchinson_trace(mv, obj.dim, 6, 0.0, 2, dtype=F64, device="cpu")
    assert block["top_eigenvalues"]["values"] == pytest.approx(top.values, rel=1e-9)
    assert block["top_eigenvalues"]["residuals"] == pytest.approx(top.residuals, rel=1e-6, abs=1e-9)
    assert block["lambda_max"] == block["top_eigenvalues"]["values"][0]
    assert block["lambda_max_over_lambda_5"] == pytest.approx(top.values[0] / top.values[4], rel=1e-9)
    assert block["trace"]["samples"] == pytest.approx(trace.samples, rel=1e-9) and block["trace"]["probes"] == 6
    assert block["density"] is None
    assert block["hvp"] == {"mode": "reverse", "batches": 3, "graphs_kept": 3, "graph_bytes": block["hvp"]["graph_bytes"]}
    assert block["hvp"]["graph_bytes"] > 0


def test_hessian_block_in_float32_and_a_graph_budget_in_gib(obj: Objective) -> None:
    model, x, y = net_problem(n=12)
    obj32 = Objective.build(prepare_model(model, "eval", torch.float32), x, y, batch_size=4)
    a = parse("r", "--top-k", "2", "--lanczos-iters", "10", "--trace-probes", "3", "--density", "--density-probes", "1",
              "--density-iters", "3")
    b32, b64 = C._hessian(obj32, a), C._hessian(obj, a)
    assert b32["lambda_max"] == pytest.approx(b64["lambda_max"], rel=1e-4)
    assert b32["trace"]["samples"] == pytest.approx(b64["trace"]["samples"], rel=1e-4)
    per_batch = b64["hvp"]["graph_bytes"] / 3  # three batches of 4 examples, the same shapes
    budget = parse("r", "--top-k", "1", "--lanczos-iters", "1", "--trace-probes", "1",
                   "--graph-memory", repr(1.5 * per_batch / 2 ** 30))
    assert C._hessian(obj, budget)["hvp"]["graphs_kept"] == 1  # 1.5 batches' worth of GiB keeps one


def test_hessian_block_with_fewer_than_5_values_a_density_and_no_graphs(obj: Objective) -> None:
    a = parse("r", "--top-k", "3", "--lanczos-iters", "4", "--trace-probes", "2", "--density",
              "--density-probes", "2", "--density-iters", "3", "--graph-memory", "0")
    block = C._hessian(obj, a)
    assert len(block["top_eigenvalues"]["values"]) == 3 and block["lambda_max_over_lambda_5"] is None
    density = hessian.slq_density(obj.flat_hvp("reverse"), obj.dim, 2, 3, 0, dtype=F64)
    assert block["density"]["probes"] == 2 and block["density"]["iterations"] == 3
    assert sum(block["density"]["nodes"], []) == pytest.approx(sum(density.nodes, []), rel=1e-9)
    assert block["hvp"]["mode"] == "reverse" and block["hvp"]["graphs_kept"] == 0  # a budget of 0 GiB
    forward = C._hessian(obj, parse("r", "--hvp", "forward", "--top-k", "1", "--lanczos-iters", "1",
                                    "--trace-probes", "1"))
    assert forward["hvp"]["mode"] == "forward" and forward["top_eigenvalues"]["iterations"] == 1


def test_hessian_block_of_a_model_with_a_single_parameter_tensor() -> None:
    """A softmax regression without bias (one weight tensor) is measured like any other model."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3, bias=False))
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    one = Objective.build(prepare_model(model, "eval", F64), x, y, batch_size=4)
    assert len(one.params) == 1
    block = C._hessian(one, parse("r", "--top-k", "2", "--lanczos-iters", "6", "--trace-probes", "2", "--density",
                                  "--density-probes", "1", "--density-iters", "3"))
    top = hessian.top_eigenvalues(one.flat_hvp("reverse"), one.dim, 2, 6, 1e-3, 0, F64, "cpu")
    assert block["top_eigenvalues"]["values"] == pytest.approx(top.values, rel=1e-9)
    assert block["trace"]["probes"] == 2 and block["density"]["probes"] == 1


def test_msharpness_forwards_at_most_batch_size_examples(obj: Objective, monkeypatch) -> None:
    """--batch-size bounds the examples of every m-sharpness forward too (memory), not only the Hessian's."""
    sizes = []
    real = msharpness._group_sharpness

    def spy(o, xs, ys, rho, steps):
        sizes.append(xs.shape[0] * xs.shape[1])
        return real(o, xs, ys, rho, steps)

    monkeypatch.setattr(msharpness, "_group_sharpness", spy)
    C._msharpness(obj, parse("r", "--m", "3", "--batch-size", "6"))
    assert sizes == [6, 6]  # 12 examples: two groups of two chunks of 3


def test_msharpness_block_is_the_grid_with_the_options(obj: Objective) -> None:
    a = parse("r", "--m", "3,6", "--rho", "0.1", "--ascent-steps", "2", "--batch-size", "6")
    block = C._msharpness(obj, a)
    cells = msharpness.m_sharpness_grid(obj, [3, 6], [0.1], 2, max_batch=6)
    assert [(c["m"], c["rho"], c["steps"]) for c in block["cells"]] == [(c.m, c.rho, c.steps) for c in cells]
    assert [c["value"] for c in block["cells"]] == pytest.approx([c.value for c in cells], rel=1e-12)
    assert block["steps"] == 2 and block["ascent"] == (
        "2 steps of projected normalized ascent (step 0.5 rho), max over iterates")
    assert block["definition"] == "mean over chunks of m examples of max_{||e||_2<=rho} L_chunk(w+e) - L_chunk(w)"
    one = C._msharpness(obj, parse("r", "--m", "12"))
    assert one["ascent"] == "one step (SAM's e = rho g/||g||)" and one["steps"] == 1


def test_landscape_block_is_the_two_slices_with_the_options(obj: Objective) -> None:
    a = parse("r", "--points", "3", "--grid", "2", "--span", "0.5", "--seed", "4")
    block = C._landscape(obj, a)
    assert block["d1"]["loss"] == pytest.approx(landscape.slice_1d(obj, 0.5, 3, 4).loss, rel=1e-12)
    assert sum(block["d2"]["loss"], []) == pytest.approx(sum(landscape.slice_2d(obj, 0.5, 2, 5).loss, []), rel=1e-12)
    assert block["span"] == 0.5 and block["d1"]["seed"] == 4 and block["d2"]["seed"] == 5
    assert block["directions"] == "gaussian, filter-normalized (Li et al. 2018); BN weights and biases not moved"
    assert C._landscape(obj, parse("r", "--points", "3", "--grid", "0"))["d2"] is None
    one = C._landscape(obj, parse("r", "--points", "3", "--grid", "1"))["d2"]  # a 1 x 1 grid is still a grid
    assert one["alpha"] == one["beta"] == [-1.0] and len(one["loss"]) == 1 and len(one["loss"][0]) == 1


# -- setup, objective, document ----------------------------------------------------------------------

def run_like(path: Path, label_smoothing: float = 0.0, wd: float = 5e-4, wd_on_bn: bool = True) -> SimpleNamespace:
    cfg = OmegaConf.create({"optim": {"label_smoothing": label_smoothing, "weight_decay": wd, "wd_on_bn": wd_on_bn}})
    summary = {"config": {"dataset": "cifar10", "model": "m", "optimizer": "sam", "rho": 0.05, "epochs": 2,
                          "seed": 1, "extra": "not copied"}, "epochs_done": 2, "final": {"test_err": 12.5}}
    return SimpleNamespace(path=path, cfg=cfg, summary=summary)


def test_setup_says_everything_that_changes_the_numbers(tmp_path: Path) -> None:
    a = parse("r", "--subset", "64", "--seed", "3", "--bn", "train", "--dtype", "fp64", "--batch-size", "8",
              "--hvp", "forward", "--weight-decay", "in")
    assert C._setup(run_like(tmp_path, 0.1, 1e-3, False), a) == {
        "split": "train", "subset": 64, "seed": 3, "preprocessing": "normalized as at evaluation, no augmentation",
        "bn_mode": "train", "dtype": "fp64", "batch_size": 8, "hvp": "forward",
        "loss": "mean cross-entropy (label smoothing 0.1)",
        "weight_decay": {"in_loss": True, "value": 1e-3, "on_bn_and_bias": False}}
    plain = C._setup(run_like(tmp_path), parse("r"))
    assert plain["loss"] == "mean cross-entropy" and plain["weight_decay"] == {
        "in_loss": False, "value": 5e-4, "on_bn_and_bias": True}
    assert type(plain["weight_decay"]["value"]) is float and type(plain["weight_decay"]["on_bn_and_bias"]) is bool


def test_document_merges_parts_measured_the_same_way(tmp_path: Path) -> None:
    run = run_like(tmp_path)
    setup = {"subset": 16}
    doc = C._document(run, setup, {"hessian": {"lambda_max": 3.0}}, 1.25)
    assert doc["schema"] == 1 and doc["setup"] == setup and doc["hessian"] == {"lambda_max": 3.0}
    assert doc["run"] == {"dataset": "cifar10", "model": "m", "optimizer": "sam", "rho": 0.05, "epochs": 2,
                          "seed": 1, "epochs_done": 2, "final_test_err": 12.5}
    assert doc["env"] == {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()}
    assert doc["wall_s"] == 1.25 and doc["measured_at"].endswith("+00:00")
    (tmp_path / "sharpness.json").write_text(json.dumps(doc))
    merged = C._document(run, setup, {"landscape": {"span": 1.0}}, 2.0)
    assert merged["hessian"] == {"lambda_max": 3.0} and merged["landscape"] == {"span": 1.0}
    assert merged["wall_s"] == 3.25  # the time of the earlier parts is kept
    other = C._document(run, {"subset": 32}, {"landscape": {"span": 1.0}}, 2.0)
    assert "hessian" not in other and other["wall_s"] == 2.0  # measured otherwise: a fresh file
    (tmp_path / "sharpness.json").write_text(json.dumps({**doc, "schema": 2}))
    assert "hessian" not in C._document(run, setup, {}, 0.0)
    for junk in ("[1, 2]", "{not json", ""):
        (tmp_path / "sharpness.json").write_text(junk)
        assert C._existing(tmp_path) == {}
    (tmp_path / "sharpness.json").unlink()
    assert C._existing(tmp_path) == {}
    run.summary = {}  # a summary without config, final or epochs: nulls, never a crash
    bare = C._document(run, setup, {}, 1.23456)
    assert bare["run"]["final_test_err"] is None and bare["run"]["epochs_done"] is None
    assert bare["run"]["optimizer"] is None and bare["wall_s"] == 1.235
    import re

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", bare["measured_at"])  # whole seconds, UTC


def test_existing_file_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """A sharpness.json with non-ASCII text (a note added by hand) still merges under a C locale."""
    import locale

    run, setup = run_like(tmp_path), {"subset": 16}
    doc = {**C._document(run, setup, {"hessian": {"lambda_max": 3.0}}, 1.0), "note": "\u03bb_max mesur\u00e9"}
    (tmp_path / "sharpness.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    before = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        merged = C._document(run, setup, {"landscape": {"span": 1.0}}, 2.0)
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert merged["hessian"] == {"lambda_max": 3.0} and merged["note"] == "\u03bb_max mesur\u00e9"


def test_measure_times_each_part_and_the_whole(tmp_path: Path, monkeypatch, capsys) -> None:
    """On a clock that ticks 0.1234 s per reading: each part's time is its own two readings apart,
    rounded to ms, and the file's wall time spans the objective and every part."""
    ticks = iter(range(10, 1000))  # a clock that does not start at 0: durations are differences
    monkeypatch.setattr(C.time, "perf_counter", lambda: 0.1234 * next(ticks))
    monkeypatch.setattr(C, "_objective", lambda run, a: "obj")
    monkeypatch.setattr(C, "PARTS", {"one": lambda obj, a: {"x": obj}, "two": lambda obj, a: {"y": 2}})
    run = run_like(tmp_path)
    obj, doc = C.measure(run, parse("r"), ["one", "two"])
    assert obj == "obj" and doc["one"] == {"x": "obj", "time_s": 0.123} and doc["two"] == {"y": 2, "time_s": 0.123}
    assert doc["wall_s"] == round(0.1234 * 5, 3)  # readings 10 (start) and 15 (after the last part)
    assert capsys.readouterr().out == "  one: 0.1 s\n  two: 0.1 s\n"
    assert json.loads((tmp_path / "sharpness.json").read_text()) == doc


def test_json_safe_turns_non_finite_floats_into_null_everywhere() -> None:
    doc = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2.0, math.nan), "e": "nan", "f": 3}
    assert C.json_safe(doc) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.0, None], "e": "nan", "f": 3}


# -- discovery and main ------------------------------------------------------------------------------

def metrics(path: Path, status: str = "completed", checkpoint: bool = True, sharpness: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"schema": 1, "status": status, "epochs_done": 1}))
    if checkpoint:
        (path / "checkpoint.pt").write_bytes(b"x")
    if sharpness:
        (path / "sharpness.json").write_text("{}")
    return path


def test_discover_lists_what_cannot_be_measured_and_why(tmp_path: Path, capsys) -> None:
    done = metrics(tmp_path / "a", sharpness=True)  # first in order: the rest is still looked at
    good = metrics(tmp_path / "b")
    metrics(tmp_path / "c", status="running")
    metrics(tmp_path / "d", checkpoint=False)
    assert C._discover(tmp_path, missing_only=False) == [done, good]
    out = capsys.readouterr().out
    assert f"  skipped {tmp_path / 'c'}: {tmp_path / 'c'} is still running" in out
    assert f"  skipped {tmp_path / 'd'}: {tmp_path / 'd'} has no checkpoint.pt (committed runs keep only" in out
    assert C._discover(tmp_path, missing_only=True) == [good]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a directory"),
    (lambda p: metrics(p / "r", status="running"), "is still running"),
    (lambda p: metrics(p / "r", checkpoint=False), "has no checkpoint.pt (committed runs keep only their logs"),
])
def test_main_refuses_a_bad_run_directory_before_measuring(tmp_path: Path, capsys, make, message: str) -> None:
    run = make(tmp_path)
    assert C.main([str(run), "--parts", "landscape"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sam-sharpness: error: ") and message in err[0]


def test_main_bad_arguments_exit_2_with_one_line(capsys) -> None:
    assert C.main(["r", "--subset", "0"]) == 2
    assert capsys.readouterr().err == "sam-sharpness: error: --subset 0 and --batch-size 256 must be >= 1\n"


def test_main_checks_every_run_directory_before_measuring_any(tmp_path: Path, two_runs, capsys) -> None:
    sgd, _ = two_runs
    (sgd / "sharpness.json").unlink(missing_ok=True)
    bad = metrics(tmp_path / "bad", checkpoint=False)
    assert C.main([str(sgd), str(bad), "--subset", "16", "--parts", "landscape", "--points", "3", "--grid", "0"]) == 2
    assert not (sgd / "sharpness.json").exists()  # the first was not measured: the second's error came first
    assert "has no checkpoint.pt" in capsys.readouterr().err


def test_main_passes_the_data_root_on(two_runs, monkeypatch, capsys) -> None:
    seen = []
    real = C.load_run
    monkeypatch.setattr(C, "load_run", lambda path, data_root=None: seen.append(data_root) or real(path, data_root))
    assert C.main([str(two_runs[0]), "--data-root", "/moved", "--subset", "16", "--parts", "landscape",
                   "--points", "3", "--grid", "0"]) == 0
    assert seen == ["/moved"]


def test_console_script_exits_with_mains_status(monkeypatch, capsys) -> None:
    monkeypatch.setattr(C.sys, "argv", ["sam-sharpness", "--subset", "0", "r"])
    with pytest.raises(SystemExit) as e:
        C.console_main()
    assert e.value.code == 2
    assert capsys.readouterr().err == "sam-sharpness: error: --subset 0 and --batch-size 256 must be >= 1\n"


def test_main_with_nothing_to_measure(tmp_path: Path, capsys) -> None:
    metrics(tmp_path / "a", sharpness=True)
    threads = torch.get_num_threads()
    try:
        assert C.main(["--runs", str(tmp_path), "--missing-only", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.endswith("sam-sharpness: measured 0 run(s)\n")


def test_main_skips_a_measured_run_given_by_name_with_missing_only(tmp_path: Path, two_runs, capsys) -> None:
    run = metrics(tmp_path / "a", sharpness=True)
    sgd, _ = two_runs
    (sgd / "sharpness.json").unlink(missing_ok=True)
    assert C.main([str(run), str(sgd), "--missing-only", "--subset", "16", "--parts", "landscape", "--points", "3",
                   "--grid", "0"]) == 0
    out = capsys.readouterr().out
    assert f"  {run}: has sharpness.json, skipped" in out and "measured 1 run(s)" in out
    assert (sgd / "sharpness.json").exists()  # the one after the skipped one is measured


# -- on real run directories (cheap parts only) ------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from tests.sharpness.sharpness_helpers import make_run_dir

    root = tmp_path_factory.mktemp("runs")
    return (make_run_dir(root / "sgd", ["optim=sgd"], seed=0),
            make_run_dir(root / "sam", ["optim=sam", "optim.wd_on_bn=false", "optim.label_smoothing=0.1"], seed=1))


def test_objective_is_the_runs_loss_on_its_subset(two_runs) -> None:
    from sam_repro.sharpness.rundir import load_run, train_subset

    run = load_run(two_runs[1])
    a = parse("r", "--subset", "16", "--seed", "2", "--batch-size", "8", "--dtype", "fp64", "--weight-decay", "in",
              "--bn", "train")
    obj = C._objective(run, a)
    x, y = train_subset(run.bundle, 16, 2)
    assert torch.equal(obj.x, x.double()) and torch.equal(obj.y, y) and obj.batch_size == 8
    assert obj.l2 == float(run.cfg.optim.weight_decay) > 0 and obj.params[0].dtype == F64 and obj.model.training
    assert obj.l2_mask == tuple(p.ndim > 1 for p in obj.params) and not all(obj.l2_mask)  # wd_on_bn=false
    assert obj.label_smoothing == 0.1
    out = C._objective(run, parse("r", "--subset", "16"))
    assert out.l2 == 0.0 and out.params[0].dtype == torch.float32 and not out.model.training
    assert run.model.training is False and run.model.fc.weight.dtype == torch.float32  # the run's model untouched
    sgd = load_run(two_runs[0])  # optim.wd_on_bn=true (the default): the L2 term on every parameter
    assert sgd.cfg.optim.wd_on_bn is True
    decayed = C._objective(sgd, parse("r", "--subset", "16", "--weight-decay", "in"))
    assert decayed.l2_mask == (True,) * len(decayed.params) and decayed.l2 == float(sgd.cfg.optim.weight_decay)


def test_measure_writes_each_part_with_its_time_and_the_interpolation_into_both(two_runs, capsys) -> None:
    sgd, sam = two_runs
    for run in two_runs:
        (run / "sharpness.json").unlink(missing_ok=True)
    args = ["--subset", "16", "--parts", "landscape", "--points", "3", "--grid", "0", "--interpolate",
            "--interp-points", "3", "--interp-range", "0", "1"]
    assert C.main([str(sgd), str(sam), *args]) == 0
    out = capsys.readouterr().out
    assert f"sam-sharpness: {sgd} (sgd seed=0)" in out and "  landscape: " in out and "measured 2 run(s)" in out
    assert "  interpolation sgd seed=0 -> sam seed=0: " in out and "  interpolation sam seed=0 -> sgd seed=0: " in out
    docs = [json.loads((run / "sharpness.json").read_text()) for run in two_runs]
    for doc, other in zip(docs, ("sam", "sgd")):
        assert set(doc) >= {"schema", "run", "setup", "env", "measured_at", "landscape", "interpolation", "wall_s"}
        assert doc["landscape"]["time_s"] >= 0 and doc["landscape"]["d2"] is None
        interp = doc["interpolation"]
        assert interp["t"] == [0.0, 0.5, 1.0] and interp["other"]["optimizer"] == other
        assert interp["direction"] == "t=0: this run, t=1: the other"
        assert interp["loss"][0] == pytest.approx(doc["landscape"]["d1"]["loss"][1], rel=1e-6)  # t = 0: this run
    assert docs[0]["interpolation"]["other"]["run_dir"] == "../sam" and docs[1]["interpolation"]["other"]["seed"] == 0
    assert docs[0]["interpolation"]["other"]["rho"] == 0.05 and docs[1]["interpolation"]["other"]["rho"] is None
    assert docs[0]["run"]["optimizer"] == "sgd" and docs[1]["run"]["rho"] == 0.05
    assert not [p for run in two_runs for p in run.iterdir() if p.name.endswith(".tmp")]


def test_runs_root_measures_what_is_missing(two_runs, capsys) -> None:
    sgd, sam = two_runs
    (sam / "sharpness.json").unlink(missing_ok=True)
    (sgd / "sharpness.json").write_text("{}")
    assert C.main(["--runs", str(sgd.parent), "--missing-only", "--subset", "16", "--parts", "landscape",
                   "--points", "3", "--grid", "0"]) == 0
    out = capsys.readouterr().out
    assert "measured 1 run(s)" in out and "skipped" not in out  # below a root, measured runs are passed over quietly
    assert (sgd / "sharpness.json").read_text() == "{}" and "landscape" in json.loads((sam / "sharpness.json").read_text())


class FlushLog(io.StringIO):
    """stdout as a pipe sees it: what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_progress_lines_are_flushed_as_they_are_printed(two_runs, monkeypatch) -> None:
    """Each progress line reaches a pipe (a log file, tee) when it is printed, not at exit."""
    for run in two_runs:
        (run / "sharpness.json").unlink(missing_ok=True)
    out = FlushLog()
    monkeypatch.setattr(C.sys, "stdout", out)
    assert C.main([str(two_runs[0]), str(two_runs[1]), "--subset", "16", "--parts", "landscape", "--points", "3",
                   "--grid", "0", "--interpolate", "--interp-points", "2"]) == 0
    lines = out.getvalue().splitlines()
    progress = [ln for ln in lines if ln.startswith(("sam-sharpness: " + str(two_runs[0]), "sam-sharpness: " + str(
        two_runs[1]), "  landscape: ", "  interpolation "))]
    assert len(progress) == 6, lines
    for line in progress:
        assert any(f.endswith(line + "\n") for f in out.flushed), line


def test_the_run_directory_is_locked_for_sam_sharpness_while_measured(two_runs, monkeypatch) -> None:
    """While a run is measured (and while its interpolation is written), a trainer that tries to write
    into it is told that sam-sharpness holds it."""
    from sam_repro.rundir import RunDirBusy, RunDirLock

    told = []

    def try_to_train(path: Path) -> None:
        with pytest.raises(RunDirBusy) as e:
            RunDirLock(path, purpose="training").acquire()
        told.append(str(e.value))

    monkeypatch.setattr(C, "measure", lambda run, a, parts: try_to_train(run.path) or ("obj", {}))
    monkeypatch.setattr(C, "_interpolate", lambda ra, rb, oa, a: try_to_train(ra.path))
    assert C.main([str(two_runs[0]), str(two_runs[1]), "--subset", "16", "--parts", "landscape",
                   "--interpolate"]) == 0
    assert len(told) == 3 and all(" (sam-sharpness since " in t for t in told), told


def test_interpolation_of_a_run_whose_summary_has_no_config(two_runs) -> None:
    """The other run's metrics.json without its config block: nulls in the interpolation block, no crash."""
    from sam_repro.sharpness.rundir import load_run

    sgd, sam = (load_run(d) for d in two_runs)
    for run in (sgd, sam):
        (run.path / "sharpness.json").unlink(missing_ok=True)
    sgd.summary, sam.summary = {"status": "completed"}, {"status": "completed"}
    a = parse("r", "s", "--subset", "16", "--interp-points", "2")
    C._interpolate(sgd, sam, C._objective(sgd, a), a)
    for run, other in ((sgd, "../sam"), (sam, "../sgd")):
        block = json.loads((run.path / "sharpness.json").read_text())["interpolation"]
        assert block["other"] == {"optimizer": None, "rho": None, "seed": None, "run_dir": other}
        assert len(block["loss"]) == 2
