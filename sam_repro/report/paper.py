"""The paper's numbers and the exact setting behind each of its cells.

`paper_tables.csv` beside this file holds the SAM paper's Tables 1-5 as printed (arXiv
2010.01412v3), one row per cell: error in %, accuracy in % for Table 4, with the paper's 95 %
intervals and notes. The settings (rho, epochs, batch size) come from the paper's hyperparameters
(Appendix C, Tables 6 and 7), restated per table in docs/paper.md#hyperparameters-per-setting.

A run fills a paper cell only when every checked field equals the paper's (`Expected`); a field
the paper does not state is `None` there and is not checked (the table notes say which).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import pandas as pd

# Methods we run; the CSV's other rows (literature baselines, prior SOTA) are only shown as context.
OUR_METHODS = ("sam", "sgd")
# The CSV names the paper's plain PyramidNet `pyramidnet`; our registry calls it pyramidnet272.
MODEL_NAMES = {"pyramidnet": "pyramidnet272"}
# Epochs the paper leaves blank, set to what our presets (configs/experiment/) run. Table 1: 1800,
# as the PyramidNet+ShakeDrop row. Table 5: the 200-epoch CIFAR WRN recipe for both models. Our
# assumptions (docs/paper.md#what-the-presets-assume): the official code gives no epochs for them.
ASSUMED_EPOCHS = {
    (1, "shakeshake26_2x96d"): 1800,
    (1, "pyramidnet"): 1800,
    (5, "wrn28_10"): 200,
    (5, "shakeshake26_2x96d"): 200,
}
# rho for SAM, keyed by (dataset, CSV model): the paper's Appendix C (Tables 6-7), restated in
# docs/paper.md#hyperparameters-per-setting.
RHO = {
    ("cifar10", "wrn28_10"): 0.05, ("cifar100", "wrn28_10"): 0.1,
    ("cifar10", "shakeshake26_2x96d"): 0.02, ("cifar100", "shakeshake26_2x96d"): 0.05,
    ("cifar10", "pyramidnet"): 0.05, ("cifar100", "pyramidnet"): 0.2,
    ("cifar10", "pyramidnet272_shakedrop"): 0.05, ("cifar100", "pyramidnet272_shakedrop"): 0.05,
    ("svhn", "wrn28_10"): 0.01, ("svhn", "shakeshake26_2x96d"): 0.01,
    ("fashion_mnist", "wrn28_10"): 0.05, ("fashion_mnist", "shakeshake26_2x96d"): 0.02,
    ("imagenet", "resnet50"): 0.05, ("imagenet", "resnet101"): 0.05, ("imagenet", "resnet152"): 0.05,
    ("imagenet", "efficientnet_b7"): 0.05, ("imagenet", "efficientnet_l2"): 0.05,
}
# Table 1 preset names: t1_<dataset>_<setting>.
T1_SETTINGS = {
    ("wrn28_10", "200"): "wrn28_10_200ep", ("wrn28_10", "1800"): "wrn28_10_1800ep",
    ("shakeshake26_2x96d", ""): "shakeshake", ("pyramidnet", ""): "pyramidnet",
    ("pyramidnet272_shakedrop", "1800"): "pyramidnet_shakedrop",
}
SEEDS = "0,1,2,3,4"  # the paper: 5 seeds, 95% CI
TWO_X_NOTE = "baseline allowed 2x epochs"


@dataclass(frozen=True)
class Expected:
    """What a run must have logged to fill one paper cell. None: the paper does not say; not checked."""

    dataset: str
    model: str  # our registry name, compared after `normalize_model`
    augment: str | None  # the augment label our runs log
    label_noise: float
    optimizer: str  # sam | sgd
    rho: float | None
    epochs: tuple[int, ...] | None  # SGD may list E and 2E (the paper's 2x-epoch baseline)
    train_steps: int | None  # with counts_steps: the steps the paper gives (None: not stated, not checked)
    batch_size: int | None
    p: float | None = None  # 2 for SAM
    source: str = "torchvision"  # the official files
    val_fraction: float = 0.0  # the paper's final numbers train on the whole training set
    counts_steps: bool = False  # the recipe is a number of optimizer steps (finetuning), not epochs
    # The official CIFAR-sized runs: 8 devices x 32 examples, each normalizing its own BatchNorm
    # batch and (SAM) perturbing with its own gradient: device_batch and m 32 (Tables 1, 4, 5).
    device_batch: int | None = None
    m: int | None = None  # SAM only


@lru_cache(maxsize=1)
def paper_csv() -> pd.DataFrame:
    """Every row of paper_tables.csv, values kept as printed (strings) plus a float `paper_value`."""
    text = files("sam_repro.report").joinpath("paper_tables.csv").read_text(encoding="utf-8")
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    df["table"] = df["table"].astype(int)
    df["label_noise"] = df["label_noise"].astype(float)
    df["paper_value"] = df["value"].astype(float)
    return df


def normalize_model(name: str) -> str:
    """`timm/tf_efficientnet_b7.ra_in1k` -> `efficientnet_b7`; registry names pass unchanged."""
    name = name.removeprefix("timm/").split(".", 1)[0]
    return name.removeprefix("tf_")


def our_model(csv_model: str) -> str:
    """Our registry name for the CSV's model name."""
    return MODEL_NAMES.get(csv_model, csv_model)


def paper_epochs(table: int, model: str, csv_epochs: str, dataset: str) -> tuple[int | None, bool]:
    """(epochs the cell expects, whether that number is our assumption rather than the paper's)."""
    if csv_epochs:
        return int(csv_epochs), False
    if (table, model) in ASSUMED_EPOCHS:
        return ASSUMED_EPOCHS[(table, model)], True
    if table == 3 and dataset == "imagenet":
        return 10, False  # paper App. C: ImageNet finetuning runs 10 epochs (docs/paper.md#table-3-finetuning)
    return None, False


def augment_override(table: int, dataset: str, csv_augment: str) -> str:
    """The `augment=` config choice that runs the CSV's augment column: the label a run logs is
    the name of its configs/augment/ file."""
    return run_augment(table, dataset, csv_augment) or csv_augment


def run_augment(table: int, dataset: str, csv_augment: str) -> str | None:
    """The augment label a run logs for the CSV's augment column (None: not checked)."""
    if table == 5 and dataset == "fashion_mnist" and csv_augment == "autoaugment":
        return "cutout"  # the CSV: Fashion-MNIST's 'autoaugment' row is Cutout only
    if table == 5 and dataset == "svhn" and csv_augment == "autoaugment":
        return "autoaugment_svhn"  # the CSV: SVHN's 'autoaugment' row is the SVHN policy + Cutout
    if table == 2:
        return None  # Inception crop has no label among ours (none|basic|cutout|autoaugment)
    if table == 3:
        return "autoaugment" if dataset in ("cifar10", "cifar100") else "none"
    return csv_augment


PAPER_DEVICE_BATCH = 32  # examples per device in the official CIFAR/SVHN/Fashion-MNIST runs (256 / 8)


def expected(row: pd.Series) -> Expected:
    """The setting a run must have to fill the paper cell `row` (a paper_csv() row)."""
    table, dataset, model = int(row["table"]), row["dataset"], row["model"]
    epochs, _ = paper_epochs(table, model, row["epochs"], dataset)
    sam = row["method"] == "sam"
    if epochs is None:
        allowed = None
    elif not sam and TWO_X_NOTE in row["note"]:
        allowed = (epochs, 2 * epochs)
    else:
        allowed = (epochs,)
    if table == 4:
        rho = 0.05 if math.isclose(row["label_noise"], 0.8) else 0.1
    else:
        rho = RHO.get((dataset, model))
    if table in (1, 4, 5):
        batch = 256
    elif table == 2:
        batch = 4096
    else:
        batch = 1024 if model == "efficientnet_b7" else 512
    counts_steps = table == 3 and dataset != "imagenet"  # ImageNet finetuning: 10 epochs
    steps = 5000 if counts_steps and model == "efficientnet_b7" else None  # L2's step count is not stated
    return Expected(
        dataset=dataset, model=our_model(model), augment=run_augment(table, dataset, row["augment"]),
        label_noise=float(row["label_noise"]), optimizer=row["method"],
        rho=rho if sam else None, epochs=allowed, train_steps=steps, batch_size=batch,
        p=2.0 if sam else None, counts_steps=counts_steps,
        device_batch=PAPER_DEVICE_BATCH if table in (1, 4, 5) else None,
        m=PAPER_DEVICE_BATCH if table in (1, 4, 5) and sam else None,
        # Birdsnap has no torchvision dataset: the image-folder copy is its official form
        source="folder" if dataset == "birdsnap" else "torchvision",
    )


def fill_command(table: int, row: pd.Series, methods: list[str]) -> str:
    """The `sam-train` sweep that fills the paper cells of `row` for `methods` (e.g. ['sam', 'sgd'])."""
    dataset, model = row["dataset"], row["model"]
    optim = f"optim={','.join(methods)}"
    if table == 1:
        preset = f"t1_{dataset}_{T1_SETTINGS[(model, row['epochs'])]}"
        extra = f" augment={row['augment']}"
    elif table == 2:
        preset, extra = f"t2_imagenet_{model}_{row['epochs']}ep", ""
    elif table == 3:
        preset, extra = f"t3_{dataset}_{model}", ""
    elif table == 4:
        preset, extra = f"t4_cifar10_resnet32_noise{round(row['label_noise'] * 100)}", ""
    else:
        short = "shakeshake" if model.startswith("shakeshake") else model
        preset = f"t5_{dataset}_{short}"
        extra = f" augment={augment_override(5, dataset, row['augment'])}"
    return f"sam-train -m experiment={preset}{extra} {optim} seed={SEEDS}"


def sweep_script(table: int) -> str:
    """The script that runs every cell of one paper table."""
    return f"scripts/table{table}.sh"
