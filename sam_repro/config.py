"""The config schema: typed dataclasses registered in Hydra's ConfigStore.

`configs/train.yaml` starts its defaults list with `train_schema`, so every YAML file and every
command-line override is merged into these dataclasses: a misspelt key or a value of the wrong
type fails at composition, before anything runs. Semantic checks (ranges, names that must exist
in a registry) live in `sam_repro.validate`, which runs right after composition.

Defaults follow the official SAM code (google-research/sam); each departure is a named switch.

Each key also declares, once and here, the roles it plays outside a single run (`keyed(...)`):
- MEMBER: may differ between the members of one pack (hydra/launcher=pack); every other key fixes
  tensor shapes, the data pipeline or the step, and must agree;
- RESUME_FREE: may change between a killed run and its resumption (where things are, how progress
  is shown); any other change makes `resume=auto` refuse the run directory;
- UNNAMED: not part of the run directory's name (`hydra.job.override_dirname`).
A node declared with a role gives it to every key below it. `keys_with(role)` lists them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

MEMBER, RESUME_FREE, UNNAMED = "member", "resume_free", "unnamed"
WHERE = (MEMBER, RESUME_FREE, UNNAMED)  # where a run lives or how it is shown, not what it computes
_NO_DEFAULT = object()


def keyed(default: Any = _NO_DEFAULT, *, roles: tuple[str, ...], factory: Any = None) -> Any:
    """A schema field that plays `roles` (MEMBER, RESUME_FREE, UNNAMED)."""
    metadata = {"roles": frozenset(roles)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DatasetConfig:
    name: str = "cifar10"  # a key of sam_repro.data.DATASETS
    source: str = "torchvision"  # torchvision | folder | synthetic (see sam_repro.data.sources)
    root: str = keyed("${data_root}/${.name}", roles=(RESUME_FREE, UNNAMED))  # torchvision files, or ROOT/{train,test}/<class>/* for folder
    download: bool = keyed(False, roles=(RESUME_FREE, UNNAMED))  # torchvision only; needs network
    val_fraction: float = 0.0  # hold out this fraction of the training set (the paper used 0.1 to pick rho)
    label_noise: float = keyed(0.0, roles=(MEMBER,))  # fraction of training labels corrupted, in [0, 1)
    noise_kind: str = keyed("symmetric", roles=(MEMBER,))  # symmetric | asymmetric
    noise_seed: int = keyed(0, roles=(MEMBER,))  # label noise is drawn independently of the training seed
    split_seed: int = 0  # seed of the validation split
    svhn_extra: bool = True  # SVHN: train on train+extra (604,388 images), as the paper
    decode_workers: int = keyed(0, roles=(RESUME_FREE, UNNAMED))  # folder source: processes decoding images (0 = one per core)
    cache_dir: Optional[str] = keyed(None, roles=(RESUME_FREE, UNNAMED))  # folder source: where decoded tensors are cached (default: beside root)
    # The side of the images the model sees. null: the dataset's (224 for ImageNet, 32 for CIFAR), or a
    # pretrained model's input size when finetuning (B7: 600, L2: 475). Arrays stored smaller are
    # upsampled after augmentation; file-backed data is cropped to it.
    input_size: Optional[int] = None
    # synthetic source only: a learnable generated problem, never a real result
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    train_size: int = 2048
    test_size: int = 512


@dataclass
class AugmentConfig:
    name: str = "basic"  # none | basic | cutout | autoaugment (a label; the fields below do the work)
    crop: bool = True  # random crop back to the input size after padding
    padding: int = 4
    pad_mode: str = "reflect"  # official code: reflect; torchvision's usual CIFAR recipe: constant (zeros)
    flip: bool = True  # random horizontal flip
    cutout: int = 0  # side of the Cutout square in pixels (16 in the paper); 0 = off
    cutout_per: str = "batch"  # official code: one location per batch; `sample` draws one per image
    autoaugment: Optional[str] = None  # AutoAugment policy applied before crop/flip: cifar10 | svhn
    # File-backed data (ImageNet) only: Inception-style RandomResizedCrop (8-100 % of the area) to the
    # input size instead of resize + center crop. The array loaders cannot do it (validate refuses it).
    random_resized_crop: bool = False


@dataclass
class ModelConfig:
    name: str = "wrn28_10"  # a registered model (sam_repro.models.list_models()), timm/<name>, or a timm name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the model's constructor
    # Finetuning (sam_repro.models.finetune): the backbone's weights come from timm (pretrained, needs
    # network or a filled Hugging Face cache) or from a local file (checkpoint; wins over pretrained);
    # the classifier head is always new, sized for the dataset. Input size and normalization then
    # follow the model's pretrained config.
    pretrained: bool = False  # timm models only; the name's tag picks the weights (tf_efficientnet_b7.ra_in1k)
    checkpoint: Optional[str] = keyed(None, roles=(RESUME_FREE, UNNAMED))  # a state_dict file (.pth/.pt/.bin/.safetensors), or a dict holding it under "model"/"state_dict"
    freeze_bn: bool = False  # finetuning: BatchNorm statistics frozen, as in the paper


@dataclass
class OptimConfig:
    name: str = "sam"  # sgd | sam | asam
    base: str = "sgd"  # base optimizer: sgd | adamw
    lr: float = keyed(0.1, roles=(MEMBER,))  # for the whole batch (batch_size)
    momentum: float = keyed(0.9, roles=(MEMBER,))
    nesterov: bool = keyed(True, roles=(MEMBER,))
    weight_decay: float = keyed(5e-4, roles=(MEMBER,))
    wd_mode: str = "loss"  # loss (L2 in the loss, enters e(w): official) | decoupled (in the base optimizer: popular port)
    wd_on_bn: bool = True  # official: decay every parameter, BatchNorm and biases included
    rho: float = keyed(0.05, roles=(MEMBER,))
    p: float = 2.0  # 2 or inf
    adaptive: bool = False  # ASAM
    eta: float = keyed(0.0, roles=(MEMBER,))  # ASAM: T = |w| + eta
    asam_scale: str = "weights"  # ASAM: T on parameters named *weight* (official ASAM code; biases T = 1) | all
    eps: float = 1e-12
    m: Optional[int] = None  # m-sharpness: examples per perturbation (divides device_batch); null = the device batch
    bn_stats: str = "first_pass"  # first_pass (official) | both
    true_gradient: bool = True  # first SAM pass: Shake-Shake/ShakeDrop use one coefficient both ways (official)
    shakedrop_mask: str = "fresh"  # SAM's perturbed pass: fresh ShakeDrop mask (official) | replay the first pass's
    grad_clip: Optional[float] = keyed(5.0, roles=(MEMBER,))  # global-norm clip of the applied (second-pass) gradient; official 5.0
    label_smoothing: float = 0.0
    sync_perturbation: bool = False  # multi-GPU: all-reduce the first-pass gradient before e(w)
    # The SAM family (optim=gsam, esam, ...; docs/methods.md): `rho` is each method's radius (GSAM's
    # rho_max), `eps` its norm's epsilon; configs/optim/<name>.yaml sets the authors' CIFAR values.
    gsam_alpha: float = keyed(0.4, roles=(MEMBER,))  # GSAM: weight of g0's component orthogonal to g1
    gsam_rho_min: Optional[float] = keyed(None, roles=(MEMBER,))  # GSAM: rho at the lr's minimum; null = optim.rho (constant)
    gsam_lr_min: float = keyed(0.0, roles=(MEMBER,))  # GSAM: the schedule's lowest lr (rho_min there, rho at optim.lr)
    gsam_adaptive: str = "pytorch"  # GSAM: none (paper, JAX default) | pytorch (T=|w| ASAM form) | jax (|w| g / ||g||)
    esam_beta: float = 0.6  # ESAM SWP: probability that a tensor is perturbed (1 = every tensor)
    esam_gamma: float = 0.5  # ESAM SDS: fraction of the batch the perturbed pass keeps (1 = all)
    esam_selection: str = "strict"  # ESAM SDS: strict (released: loss rise > the k-th largest) | topk (paper: exactly k)
    esam_swp_draw: str = "end_of_step"  # ESAM SWP: end_of_step (released: applies to the next step) | start_of_step (paper)
    esam_sharpness_bn: str = "update"  # ESAM's no-grad forward at w + e: update (released: moves BN stats) | frozen
    fsam_sigma: float = keyed(1.0, roles=(MEMBER,))  # F-SAM: d = g - sigma * m
    fsam_lambda: float = keyed(0.6, roles=(MEMBER,))  # F-SAM: m <- lambda * m + (1 - lambda) * g
    vasso_theta: float = keyed(0.9, roles=(MEMBER,))  # VaSSO: ema <- (1 - theta) * ema + theta * g
    samon_select: str = "type"  # SAM-ON / ASAM-ON: normalization parameters by module type | name (released: 'norm'/'bn')
    samon_normalize_bias: bool = True  # ASAM-ON: T = |w| + eta on the normalization biases too (the README's command)
    sam_interval: int = 10  # interval_sam: a SAM step every this many steps (1 = SAM)
    looksam_k: int = 5  # LookSAM: a SAM step every k steps, the stored component reused between
    looksam_alpha: float = keyed(0.7, roles=(MEMBER,))  # LookSAM: weight of the reused component
    looksam_projection: str = "model"  # LookSAM: model (one projection over all parameters) | tensor (per tensor)
    rwp_alpha: float = keyed(0.5, roles=(MEMBER,))  # RWP: applied = (1 - alpha) g_clean + alpha g_noisy
    rwp_gamma: float = keyed(0.01, roles=(MEMBER,))  # RWP: noise std per filter = gamma * ||filter||
    wsam_gamma: float = keyed(0.88, roles=(MEMBER,))  # WSAM: sharpness weight alpha = gamma / (1 - gamma)
    wsam_max_norm: Optional[float] = keyed(1.0, roles=(MEMBER,))  # WSAM's own clipping of both gradients; null = none
    wsam_decouple: bool = True  # WSAM: sharpness step outside the base optimizer (decoupled) | inside (coupled)


@dataclass
class SchedConfig:
    name: str = "cosine"  # cosine | step | constant, evaluated per optimizer step
    warmup_epochs: float = 0.0  # linear warm-up (the official CIFAR code uses none)
    milestones: List[float] = field(default_factory=list)  # step: epochs at which lr is multiplied by gamma
    gamma: float = 0.2
    final_lr_fraction: float = 0.0  # cosine ends at lr * this


@dataclass
class EngineConfig:
    device: str = keyed("auto", roles=(UNNAMED,))  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 (strict) | tf32 | bf16 | fp16 | fp64
    channels_last: Optional[bool] = None  # null = on for GPU
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = False  # torch.compile mode=reduce-overhead (CUDA graphs) for launch-bound models
    deterministic: bool = False  # deterministic kernels (tests, bit-exact resume)
    loader: str = "auto"  # auto | device (data resident on the device, augmented there) | workers (DataLoader)
    num_workers: int = keyed(8, roles=(RESUME_FREE, UNNAMED))  # loader=workers
    eval_batch_size: int = keyed(1024, roles=(RESUME_FREE, UNNAMED))
    eval_every: int = 1  # epochs between evaluations (each also logs a metrics.jsonl row and checkpoints)
    eval_every_steps: Optional[int] = None  # step-counted recipes: evaluate at the first epoch end after this many steps
    progress: bool = keyed(True, roles=(RESUME_FREE, UNNAMED))  # tqdm bars
    # hydra/launcher=pack: auto (time a packed step against its runs' solo steps when the pack starts;
    # train the runs one after another when packing is not faster) | pack | alone
    pack_execution: str = keyed("auto", roles=(RESUME_FREE, UNNAMED))
    ddp: bool = False  # re-launch under torchrun, one process per GPU (DistributedDataParallel)
    nproc: Optional[int] = None  # engine.ddp: processes to launch; null = every visible GPU (required on the CPU)


@dataclass
class TensorBoardConfig:
    dir: str = "tensorboard"  # event files, below the run directory (`tensorboard --logdir runs/` shows a sweep)


@dataclass
class WandbConfig:
    project: str = "sam-repro"
    entity: Optional[str] = None  # null: the account's default entity
    group: Optional[str] = None  # null: the experiment name (`name`), so a sweep's runs group together
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline (no network; `wandb sync` uploads later) | disabled; null: WANDB_MODE, else online


@dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # null: a local file store at <runs_root>/mlruns (`mlflow ui --backend-store-uri ...`)
    experiment: Optional[str] = None  # null: the experiment name (`name`)


@dataclass
class LoggerConfig:
    """Trackers the run also reports to (sam_repro.trackers): a node is null unless its option is
    chosen (`logger=tensorboard`, `logger=[tensorboard,wandb,mlflow]`); the run directory stays
    the source of truth, the trackers are views of it."""

    tensorboard: Optional[TensorBoardConfig] = None
    wandb: Optional[WandbConfig] = None
    mlflow: Optional[MlflowConfig] = None


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = keyed(roles=(MEMBER,), factory=SchedConfig)  # the whole schedule is per member
    engine: EngineConfig = field(default_factory=EngineConfig)
    logger: LoggerConfig = keyed(roles=WHERE, factory=LoggerConfig)
    name: str = keyed("default", roles=(MEMBER, UNNAMED))  # experiment name: the run directory's parent and metrics.json `experiment`
    seed: int = keyed(0, roles=(MEMBER,))
    epochs: int = 200
    batch_size: int = 256  # global batch (all devices together)
    # Examples per device, real or emulated: each device batch is normalized by BatchNorm on its own
    # (running statistics averaged over devices) and, for SAM, perturbed with its own gradient. The
    # paper's CIFAR runs: 32 (8 devices x 32). null = one device per process (the whole per-process
    # batch: faster on one GPU, not the paper's setting).
    device_batch: Optional[int] = None
    # SAM's / ASAM's rho for this setting; optim=sam reads method_rho.sam, optim=asam method_rho.asam
    # (a preset sets both, so switching the method keeps each method's own rho). optim.rho=... wins.
    method_rho: Dict[str, float] = keyed(roles=(MEMBER,), factory=lambda: {"sam": 0.05, "asam": 0.5})
    train_steps: Optional[int] = None  # finetuning recipes count optimizer steps; overrides epochs
    resume: str = keyed("auto", roles=WHERE)  # auto (continue a run found in the run dir) | never | must
    data_root: str = keyed("${oc.env:SAM_DATA,'~/data'}", roles=(RESUME_FREE, UNNAMED))  # '~' is expanded by the data layer
    runs_root: str = keyed("runs", roles=WHERE)
    # A run directory has one writer: a second process exits 2 naming the holder, or waits with this.
    wait_for_lock: bool = keyed(False, roles=WHERE)


def linear_lr(base_lr: float, base_batch: int, batch_size: int) -> float:
    """The linear scaling rule: a recipe's lr for `base_batch`, rescaled to the batch that fits.

    Presets write `lr: ${linear_lr:1.0,4096,${batch_size}}` (Table 2: lr 1.0 at batch 4096), so
    `batch_size=1024` trains at lr 0.25; an explicit `optim.lr=...` replaces the rule."""
    return float(base_lr) * int(batch_size) / int(base_batch)


def register_configs() -> None:
    """Register the schema so that `defaults: [train_schema, ...]` in train.yaml can use it, and the
    resolvers the configs use (`linear_lr`; `unnamed_keys`, which names the run directory)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("linear_lr", linear_lr, replace=True)
    OmegaConf.register_new_resolver("unnamed_keys", lambda *extra: [*extra, *keys_with(UNNAMED)], replace=True)


def _declared(schema: type, prefix: str = "") -> list[tuple[str, frozenset, Optional[type]]]:
    """(dotted key, its roles, its node type if it is a config node) for every field of `schema`."""
    out = []
    for f in dataclasses.fields(schema):
        # `from __future__ import annotations`: the type is its name, maybe inside Optional[...]
        node = globals().get(str(f.type).removeprefix("Optional[").removesuffix("]"))
        node = node if isinstance(node, type) and dataclasses.is_dataclass(node) else None
        out.append((prefix + f.name, f.metadata.get("roles", frozenset()), node))
        if node is not None:
            out += [(key, roles | f.metadata.get("roles", frozenset()), sub) for key, roles, sub in _declared(node, prefix + f.name + ".")]
    return out


def flatten(config: dict[str, Any], whole: tuple[str, ...] = ("model.kwargs",), prefix: str = "") -> dict[str, Any]:
    """A resolved config (OmegaConf.to_container) as {"optim.lr": 0.1, ...}. The nodes named in `whole`
    stay one value (a model's `kwargs` are the model's keys, not the schema's)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in whole:
            out.update(flatten(value, whole, name + "."))
        else:
            out[name] = value
    return out


def keys_with(role: str) -> tuple[str, ...]:
    """The schema's keys that play `role`, as declared (a node covers every key below it)."""
    return tuple(key for key, roles, _ in _declared(TrainConfig) if role in roles)


def has_role(key: str, role: str) -> bool:
    """Whether a dotted key (or a key below a declared node, `sched.name`, `model.kwargs.depth`) plays `role`."""
    return any(key == k or key.startswith(k + ".") for k in keys_with(role))


def config_dir() -> Path:
    """The Hydra config tree: top-level configs/ in a checkout, sam_repro/conf in an installed wheel
    (pyproject maps the one onto the other)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    if (installed / "train.yaml").is_file():
        return installed
    return package.parent / "configs"
