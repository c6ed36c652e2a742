"""Reading a run directory back for measurement (sam_repro/sharpness/rundir.py): every problem a
user can cause is one UserError line (RunDirError, CheckpointError); a good directory gives the run's own model with its trained
weights and the run's own data; the measured subset is a seeded draw normalized as at evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sam_repro.data import normalize_coeffs
from sam_repro.errors import UserError
from sam_repro.sharpness.rundir import finished_summary, load_run, read_config, train_subset
from tests.sharpness.sharpness_helpers import make_run_dir


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("good") / "run", seed=3)


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_finished_summary_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    missing = f"{tmp_path} is not a run directory (no readable metrics.json)"
    assert error_of(finished_summary, tmp_path) == missing
    f = tmp_path / "metrics.json"
    for unreadable in (b"{not json", b"\xff\xfe", b"[1]"):  # not JSON, not text, not an object
        f.write_bytes(unreadable)
        assert error_of(finished_summary, tmp_path) == missing
    f.write_text(json.dumps({"status": "running", "epochs_done": 4}))
    assert error_of(finished_summary, tmp_path).startswith(f"{tmp_path} is still running (metrics.json status running, 4 epochs")
    f.write_text(json.dumps({"status": "interrupted", "epochs_done": 3}))
    assert error_of(finished_summary, tmp_path) == (f"{tmp_path} was interrupted after 3 epochs (metrics.json status "
                                                    f"interrupted): re-run its command to finish it, then measure it")
    for status in ("completed", "diverged", "failed"):
        f.write_text(json.dumps({"status": status}))
        assert finished_summary(tmp_path) == {"status": status}


def test_read_config_merges_the_schema_and_never_reads_pretrained_weights(good: Path, tmp_path: Path) -> None:
    cfg = read_config(good)
    assert cfg.model.name == "resnet20" and cfg.dataset.image_size == 8 and cfg.batch_size == 32
    assert cfg.model.pretrained is False and cfg.model.checkpoint is None
    assert read_config(good, "/elsewhere").dataset.root == "/elsewhere"
    assert read_config(good).dataset.root != "/elsewhere"
    doc = yaml.safe_load((good / "config.yaml").read_text())
    doc["model"]["pretrained"], doc["model"]["checkpoint"] = True, "/w.pt"
    del doc["optim"]["rho"]  # a key added since the run: the schema's default
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    cfg = read_config(tmp_path)
    assert (cfg.model.pretrained, cfg.model.checkpoint, cfg.optim.rho) == (False, None, 0.05)
    assert error_of(read_config, tmp_path / "none") == f"{tmp_path / 'none'} has no config.yaml"
    (tmp_path / "config.yaml").write_text("optim:\n  rho: [not, a, float]\n")
    assert error_of(read_config, tmp_path).startswith(f"{tmp_path / 'config.yaml'} does not fit the config schema (")


def test_load_run_gives_the_trained_weights_and_the_runs_data(good: Path) -> None:
    run = load_run(good)
    saved = torch.load(good / "checkpoint.pt", weights_only=False)["model"]
    state = run.model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not run.model.training and all(p.dtype == torch.float32 for p in run.model.parameters())
    assert run.path == good and run.summary["status"] == "completed" and run.cfg.model.name == "resnet20"
    assert run.bundle.info["fingerprint"] == torch.load(good / "checkpoint.pt", weights_only=False)["data_fingerprint"]
    assert run.label == "sam seed=0" and len(run.bundle.train) == 64
    assert load_run(str(good)).path == good


@pytest.mark.parametrize("breakage, message", [
    ("not a directory", "is not a directory"),
    ("no checkpoint", "has no checkpoint.pt (committed runs keep only their logs: measure a run before its checkpoint"),
    ("corrupt checkpoint", "checkpoint.pt is damaged (UnpicklingError"),
    ("other data", "was trained on other data (fingerprint sha256:other, found sha256:"),
    ("other architecture", "checkpoint.pt holds another architecture than model=resnet20 ("),
    ("no model state", "checkpoint.pt holds another architecture than model=resnet20 ("),
])
def test_load_run_refuses_in_one_line(tmp_path: Path, breakage: str, message: str) -> None:
    run = make_run_dir(tmp_path / "run", model_overrides=["model=wrn16_4"] if breakage == "other architecture" else None)
    ckpt = run / "checkpoint.pt"
    if breakage == "not a directory":
        run = run / "config.yaml"
    elif breakage == "no checkpoint":
        ckpt.unlink()
    elif breakage == "corrupt checkpoint":
        ckpt.write_bytes(b"not a checkpoint")
    elif breakage in ("other data", "no model state"):
        state = torch.load(ckpt, weights_only=False)
        if breakage == "other data":
            state["data_fingerprint"] = "sha256:other"
        else:
            del state["model"]
        torch.save(state, ckpt)
    msg = error_of(load_run, run)
    assert message in msg, msg
    if breakage == "other architecture":
        assert "Unexpected key(s)" in msg or "size mismatch" in msg or "Missing key(s)" in msg


def test_a_checkpoint_without_a_fingerprint_is_measured(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    del state["data_fingerprint"]
    torch.save(state, run / "checkpoint.pt")
    assert load_run(run).model is not None


def test_train_subset_is_a_seeded_draw_normalized_as_at_evaluation(good: Path) -> None:
    run = load_run(good)
    x, y = train_subset(run.bundle, 10, seed=5)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:10]
    scale, shift = normalize_coeffs(run.bundle.mean, run.bundle.std, "cpu")
    images = run.bundle.train.images[idx].float()
    assert x.shape == (10, 3, 8, 8) and torch.allclose(x, images * scale + shift, rtol=1e-6, atol=1e-6)
    assert torch.equal(y, run.bundle.train.labels[idx]) and y.data_ptr() != run.bundle.train.labels.data_ptr()
    assert torch.equal(train_subset(run.bundle, 64, seed=5)[1].sort().values, run.bundle.train.labels.sort().values)
    for size in (0, 65):
        assert error_of(train_subset, run.bundle, size, 0) == f"--subset {size} must be between 1 and the training set size 64"


def test_load_run_moves_the_data_root(good: Path) -> None:
    """--data-root reaches the config the data is loaded from."""
    assert load_run(good, "/moved/data").cfg.dataset.root == "/moved/data"


def test_a_checkpoint_written_on_a_gpu_is_measured_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """sam-train on a GPU saves CUDA tensors: they are mapped to the CPU, never restored to their device."""
    run = make_run_dir(tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, run / "checkpoint.pt")
    monkeypatch.undo()
    loaded = load_run(run)
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state["model"].items())


def test_a_one_channel_run_is_loaded_with_its_input_channels(tmp_path: Path) -> None:
    run = load_run(make_run_dir(tmp_path / "run", ["dataset.channels=1"]))
    assert run.bundle.in_chans == 1 and next(p for p in run.model.parameters() if p.ndim == 4).shape[1] == 1
    assert train_subset(run.bundle, 4, 0)[0].shape == (4, 1, 8, 8)


def test_dataset_input_size_resizes_the_measured_subset_with_the_bundles_interpolation(tmp_path: Path) -> None:
    """dataset.input_size (the side the model saw in training) is the side measured: the stored 8 px
    arrays are resized to 16 px, with the bundle's interpolation (bilinear here; a pretrained model's own)."""
    import dataclasses

    from sam_repro.data.augment import resize

    run = load_run(make_run_dir(tmp_path / "run", ["dataset.input_size=16"]))
    assert run.bundle.image_size == 16 and run.bundle.interpolation == "bilinear"
    x, _ = train_subset(run.bundle, 4, 0)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:4]
    scale, shift = normalize_coeffs(run.bundle.mean, run.bundle.std, "cpu")
    small = run.bundle.train.images[idx].float() * scale + shift
    assert x.shape == (4, 3, 16, 16) and torch.allclose(x, resize(small, 16, "bilinear"), atol=1e-5)
    for mode in ("bicubic", "nearest"):
        xm, _ = train_subset(dataclasses.replace(run.bundle, interpolation=mode), 4, 0)
        assert torch.allclose(xm, resize(small, 16, mode), atol=1e-5) and not torch.allclose(xm, x, atol=1e-3), mode


def test_another_architecture_is_named_by_the_first_problem_torch_reports(tmp_path: Path) -> None:
    """The detail in parentheses is torch's first problem line (the one after its header), or the
    missing key itself."""
    run = make_run_dir(tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["model"]["fc.bias"]
    torch.save(state, ckpt)
    assert error_of(load_run, run) == (f"{ckpt} holds another architecture than model=resnet20 "
                                       f"(Missing key(s) in state_dict: \"fc.bias\".)")
    del state["model"]
    torch.save(state, ckpt)
    assert error_of(load_run, run) == f"{ckpt} holds another architecture than model=resnet20 ('model')"


def test_train_subset_takes_one_example_or_the_whole_split(good: Path) -> None:
    run = load_run(good)
    x, y = train_subset(run.bundle, 1, seed=5)
    assert x.shape == (1, 3, 8, 8) and y.shape == (1,)
    assert train_subset(run.bundle, 64, seed=5)[0].shape[0] == 64


@pytest.mark.parametrize("finetuned_from", ["pretrained", "checkpoint"])
def test_a_finetuned_run_is_measured_on_the_input_its_pretrained_model_saw(tmp_path: Path, finetuned_from: str) -> None:
    """A run finetuned from pretrained weights (timm's, or a `model.checkpoint` of them) trained on the
    pretrained config's input (timm's test_efficientnet: 160 px, bicubic, ImageNet mean and std), not the
    dataset's 8 px: so is it measured, although no pretrained weight is read (the checkpoint holds them all)."""
    tiny = ["model=timm", "model.name=timm/test_efficientnet"]
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"")  # never read: the run's own checkpoint holds every weight
    source = ["model.pretrained=true"] if finetuned_from == "pretrained" else ["model.pretrained=false", f"model.checkpoint={backbone}"]
    run = load_run(make_run_dir(tmp_path / "run", [*tiny, *source],
                                model_overrides=[*tiny, "model.pretrained=false"]))
    assert run.cfg.model.pretrained is False and run.cfg.model.checkpoint is None
    b = run.bundle
    assert (b.image_size, b.mean, b.std, b.interpolation) == (160, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    assert train_subset(b, 2, 0)[0].shape == (2, 3, 160, 160)
