"""The run configuration: one typed schema, read from YAML with `--section.key=value` overrides.

Sections: `data` (the source and its normalisation), `augment` (the batched augmentation), `backbone` (the
ResNet), `method` (typed by the method's own dataclass: `method: {name: mice, ...}`, see fastmice.methods),
`optim`, `train` and `eval`. A config file names only what differs from the defaults below (the paper's
CIFAR-10 settings, Appendix D); the embedded default run is the bundled `digits` config. Bundled configs
(fastmice/configs/*.yaml) can be named without a path: `cifar10`.

Files and run folders of the earlier layout (`method: mice` as a string, a `model:` section, a `mixem:`
section) still load: their keys are mapped to `method.*` and `backbone.*` with a one-line notice.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastmice.core.errors import ConfigError
from fastmice.core.schema import build_dataclass, merge, parse_overrides
from fastmice.data.sources import DataSourceConfig
from fastmice.methods import METHODS, MethodConfig, method_class
from fastmice.methods.mice import MiCEConfig
from fastmice.models.resnet import BackboneConfig
from fastmice.views.augment import AugmentConfig

__all__ = ["Config", "ConfigError", "bundled_configs", "config_from_dict", "load_config", "parse_overrides",
           "resolve_config_path"]

# train.compile: torch.compile modes of the whole training step (see fastmice.engine.compile)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIM_IMPLS = ("auto", "fused", "foreach", "loop")
LOGGER_NAMES = ("jsonl", "tensorboard", "wandb")   # train.loggers (fastmice.engine.loggers)
SECTIONS = ("data", "augment", "backbone", "method", "optim", "train", "eval")


@dataclass
class DataConfig(DataSourceConfig):
    # Per-channel normalisation as fractions of 255 (`fastmice data check` computes them for a dataset).
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)   # CIFAR-10's
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    crop_size: int | None = None   # side of the augmented views; None: the dataset's image size

    def validate(self) -> None:
        super().validate()
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("data.mean and data.std need 3 values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std must be positive, got {self.std}")


SCHEDULES = ("step", "cosine", "mice_official", "mixem_official")


@dataclass
class OptimConfig:
    name: str = "sgd"                # sgd (MiCE, MoCo) | adam (MIX'EM, SimCLR)
    # step: x lr_gamma at lr_steps | cosine: to 0 over the epochs after warm-up (both per step, after an
    # optional linear per-step warm-up) | mice_official: MiCE's public code, one value per epoch: e/W for
    # e = 0..W, then x lr_gamma for each lr_step the epoch exceeds | mixem_official: MIX'EM's public code,
    # held for W epochs, then CosineAnnealingLR(T_max=epochs) stepped once per epoch (never 0). W =
    # warmup_epochs; engine/optim.py learning_rate() states each rule exactly.
    schedule: str = "step"
    batch_size: int = 256            # drop_last: every step sees a full batch
    epochs: int = 1000
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    mu_weight_decay: bool = True     # the public code decays mu too; the paper is silent
    lr_steps: list[int] = field(default_factory=lambda: [480, 640, 800])   # epochs where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0       # step/cosine: linear per-step warm-up from 0; the official schedules: W
                                     # above (10 in both public codes)
    # How the optimizer updates the parameters; the same arithmetic, different speed. auto: fused (one kernel
    # for all parameters) on CUDA, foreach (one op per step over all tensors) elsewhere, which on the CPU
    # gives bit for bit the results of the per-parameter loop (exact resume is tested that way).
    # fused | foreach | loop force one (loop: torch's per-parameter for-loop, what the naive reference uses).
    impl: str = "auto"

    def validate(self) -> None:
        if self.impl not in OPTIM_IMPLS:
            raise ConfigError(f"optim.impl must be one of {', '.join(OPTIM_IMPLS)}, got {self.impl!r}")
        if self.name not in ("sgd", "adam"):
            raise ConfigError(f"optim.name must be 'sgd' or 'adam', got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError(f"optim.batch_size and optim.epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("optim.lr must be > 0, optim.weight_decay >= 0, optim.momentum in [0, 1)")
        if sorted(self.lr_steps) != list(self.lr_steps):
            raise ConfigError(f"optim.lr_steps must be increasing, got {self.lr_steps}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"
    run_name: str | None = None      # default: <config name>-<date>-<time>
    checkpoint_every: int = 10       # epochs; a checkpoint is also written at the end and on Ctrl-C
    log_every: int = 20              # steps between progress-bar refreshes (each one syncs with the device)
    max_steps: int | None = None     # stop after this many optimizer steps (short runs, smoke tests)
    amp: str = "auto"                # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: str = "auto"      # auto (on for CUDA) | on | off
    progress: bool = True
    init_from: str | None = None     # start the backbone from another run's checkpoint (e.g. SimCLR -> MIX'EM)
    init_scope: str = "backbone"     # backbone | model: the whole model of a run of the same method (Table 4)
    # Several processes (torchrun) only; no effect in one process. BatchNorm then sees each rank's share of the batch.
    sync_bn: bool = False            # SyncBatchNorm: statistics over the global batch (CUDA only; one all-reduce
                                     # per BN layer per pass, hence off by default, as in MoCo's multi-GPU code)
    shuffle_bn: bool = True          # MiCE/MoCo: MoCo's shuffle-BN for the teacher, so a key never shares BN
                                     # statistics with its query (costs two small all_gathers); unused with sync_bn
    # torch.compile of the whole training forward (student, teacher and loss as one graph; the backward comes
    # with it), built on the first step, whose wall time is recorded in metrics.jsonl as {"type": "compile"}.
    # off | default | reduce-overhead (CUDA graphs, the step's launches replayed at once) | max-autotune |
    # max-autotune-no-cudagraphs. Off until this trainer's step is measured: compiling costs about a minute up
    # front, and earlier H100 figures for a similar step favour reduce-overhead but are not this code's; the
    # GPU session that runs bench/bench_train.py with each mode picks the default. Under torchrun the step
    # runs eagerly (the teacher's gathers and shuffle-BN would split the graph).
    compile: str = "off"
    # Memory loader: augment the next batch (on a side CUDA stream) while the step runs. The same random draws in
    # the same order, so training is identical with it on or off; off only to measure what it saves.
    prefetch: bool = True
    # Dashboards beside metrics.jsonl (always written: the report and summaries read it): jsonl | tensorboard
    # (RUN/tensorboard; pip install "fastmice[tensorboard]") | wandb (Weights & Biases, files in RUN/wandb;
    # pip install "fastmice[wandb]"), several at once: --train.loggers=[tensorboard,wandb] or tensorboard,wandb.
    # They get the records of metrics.jsonl at their steps (fastmice.engine.loggers).
    loggers: list[str] | str = field(default_factory=lambda: ["jsonl"])
    # W&B only; null: the environment's WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_MODE (tags: added
    # to WANDB_TAGS), else project "fastmice", the run folder's name, a --seeds sweep's folder as the group.
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: str | None = None    # online | offline (upload later: wandb sync RUN/wandb/offline-run-*) | disabled

    def validate(self) -> None:
        if isinstance(self.loggers, str):   # --train.loggers=tensorboard,wandb
            self.loggers = [n.strip() for n in self.loggers.split(",") if n.strip()]
        unknown = [n for n in self.loggers if n not in LOGGER_NAMES]
        if unknown or not self.loggers:
            raise ConfigError(f"train.loggers: {', '.join(map(repr, unknown)) or 'empty'}; choose from "
                              f"{', '.join(LOGGER_NAMES)} (several at once: [jsonl,tensorboard,wandb])")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"train.wandb_mode must be online, offline, disabled or null, got {self.wandb_mode!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"train.amp must be auto, bf16 or off, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"train.channels_last must be auto, on or off, got {self.channels_last!r}")
        if self.init_scope not in ("backbone", "model"):
            raise ConfigError(f"train.init_scope must be backbone or model, got {self.init_scope!r}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("train.checkpoint_every and train.log_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class EvalConfig:
    at_end: bool = True              # evaluate after training
    batch_size: int = 512
    kmeans_niter: int = 50
    kmeans_restarts: int = 5         # random-init k-means readouts keep the best of this many runs
    linear_probe: bool = False       # logistic regression on frozen features (labels needed)
    probe_every: int = 0             # also probe every N epochs during training (0: only at evaluation)
    pixel_baseline: bool = True      # also report k-means on raw pixels (a sanity baseline)
    # false: infer on unnormalised images in [0, 1], as MIX'EM's public cluster_eval.py does although it trains
    # on normalised ones (for STL-10, whose official normalisation is none, the two agree); docs/recipes.md
    normalize: bool = True
    # Save the embeddings of a fixed subsample at epoch 1, every N epochs and at the end (RUN/embeddings/), for
    # the t-SNE of `fastmice report` across training (the paper's Fig. 2, 4, 5); 0: only the final model's.
    embed_every: int = 0
    embed_samples: int = 2000

    def validate(self) -> None:
        if self.embed_every < 0 or self.embed_samples < 1 or self.probe_every < 0:
            raise ConfigError("eval.embed_every and eval.probe_every must be >= 0 and eval.embed_samples >= 1")


@dataclass
class Config:
    name: str = "mice"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)   # MoCo v1
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MiCEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Every section's own checks, then the method's checks across sections; raises ConfigError."""
        for section in (self.data, self.augment, self.backbone, self.method, self.optim, self.train, self.eval):
            try:
                section.validate()
            except ConfigError:
                raise
            except ValueError as e:   # section validators of lower layers raise plain ValueError
                raise ConfigError(str(e)) from e
        if self.data.loader == "dali" and self.augment.randaugment_ops:
            raise ConfigError("data.loader=dali with RandAugment (augment.randaugment_ops): RandAugment is not in the "
                              "DALI pipeline; use data.loader=memory (or auto) for this recipe")
        method_class(self.method.name).check_config(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the earlier layout ---------------------------------------------------------------------------------
BACKBONE_KEYS = ("arch", "stem", "width")
RENAMED = {("simclr", "tau"): "temperature", ("mixem", "tau"): "temperature"}


def _method_name(layers: list[dict[str, Any]]) -> tuple[str, int]:
    """(the method the layers end up naming, the index of the layer that names it; -1 for the default)."""
    name, where = "mice", -1
    for i, values in enumerate(layers):
        m = values.get("method")
        if isinstance(m, str):
            name, where = m, i
        elif isinstance(m, dict) and "name" in m:
            name, where = m["name"], i
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name={name!r}: available methods are {', '.join(sorted(METHODS))}")
    return name, where


def _drop_foreign_keys(values: dict[str, Any], method: str, where: str) -> dict[str, Any]:
    """A layer written for another method (a file, before an override switched the method): its `method:` keys
    that `method` does not have are dropped, with a notice."""
    section = values.get("method")
    if not isinstance(section, dict):
        return values
    fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
    dropped = sorted(k for k in section if k not in fields)
    if not dropped:
        return values
    print(f"note: {where} sets method.{', method.'.join(dropped)}, which method {method} does not have: ignored",
          file=sys.stderr)
    return {**values, "method": {k: v for k, v in section.items() if k in fields}}


def upgrade_layout(values: dict[str, Any], method: str, where: str, strict: bool = False) -> dict[str, Any]:
    """`values` in the current layout: `method: NAME`, `model:` and `mixem:` become `method:` and `backbone:`.
    Keys of the old `model:` section that the method has no use for (every old file listed them all) are
    dropped, unless `strict` (overrides typed by the user), where they stay and fail as unknown settings.
    Prints one notice when anything was mapped."""
    old_method = isinstance(values.get("method"), str)
    if not (old_method or "model" in values or "mixem" in values):
        return values
    out = {k: v for k, v in values.items() if k not in ("model", "mixem")}
    new_method = {} if old_method else dict(values.get("method") or {})
    if old_method:
        new_method["name"] = values["method"]
    backbone = dict(values.get("backbone") or {})
    fields = {f.name for f in dataclasses.fields(method_class(method).Config)}
    dropped = []
    for section in ("model", "mixem"):
        for key, value in (values.get(section) or {}).items():
            if section == "model" and key in BACKBONE_KEYS:
                backbone.setdefault(key, value)
                continue
            target = RENAMED.get((method, key), key)
            if target in fields or strict:
                new_method.setdefault(target, value)
            else:
                dropped.append(f"{section}.{key}")
    out["method"] = new_method
    if backbone:
        out["backbone"] = backbone
    print(f"note: {where} uses the earlier config layout: read `model:`/`mixem:` as `method:` + `backbone:`"
          + (f" (no effect for method {method}, dropped: {', '.join(dropped)})" if dropped else "")
          + "; see docs/adding-a-method.md", file=sys.stderr)
    return out


# ---- loading --------------------------------------------------------------------------------------------
OVERRIDES = "the overrides"


def _build(layers: list[tuple[dict[str, Any], str]]) -> Config:
    """Defaults, then each (values, where) layer over them; validated."""
    name, named_at = _method_name([v for v, _ in layers])
    merged = dataclasses.asdict(Config(method=method_class(name).Config()))
    for i, (values, where) in enumerate(layers):
        values = upgrade_layout(values, name, where, strict=where == OVERRIDES and i >= named_at)
        if i < named_at:
            values = _drop_foreign_keys(values, name, where)
        merged = merge(merged, values)
    merged["method"]["name"] = name
    for key in merged:
        if key not in SECTIONS and key != "name":
            raise ConfigError(f"unknown section {key!r}; the sections are {', '.join(SECTIONS)}")
    method_cfg = build_dataclass(method_class(name).Config, merged.pop("method"), "method")
    try:
        cfg = build_dataclass(Config, merged, "")
    except TypeError as e:  # a dataclass rejected its arguments
        raise ConfigError(str(e)) from e
    cfg.method = method_cfg
    return cfg.validate()


def bundled_configs() -> list[str]:
    return sorted(r.name[:-5] for r in resources.files("fastmice.configs").iterdir() if r.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config (`cifar10` -> configs/cifar10.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:
        bundled = resources.files("fastmice.configs") / f"{name_or_path}.yaml"
        if bundled.is_file():
            return Path(str(bundled))
    raise ConfigError(f"config {name_or_path!r}: no such file, and no bundled config of that name "
                      f"(bundled: {', '.join(bundled_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides; validated."""
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        p = resolve_config_path(str(path))
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        loaded.setdefault("name", p.stem)
        layers.append((loaded, str(p)))
    if overrides:   # --method=NAME (the earlier spelling) is --method.name=NAME
        overrides = [("--method.name=" + o.split("=", 1)[1]) if o.split("=", 1)[0].lstrip("-") == "method" else o
                     for o in overrides]
        layers.append((parse_overrides(overrides), OVERRIDES))
    return _build(layers)


def config_from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None,
                     where: str = "the saved config") -> Config:
    """Rebuild a config saved in a run folder or checkpoint, with `overrides` ({section: {key: value}}) on top.

    A saved config is complete (every key), so a SimCLR or MIX'EM run saved without `method.recipe` predates
    the recipes and was trained by the paper's wording: it is rebuilt with recipe paper (the default of new
    runs is official), so that resuming or evaluating it keeps what it was trained with."""
    method = values.get("method")
    if isinstance(method, dict) and method.get("name") in ("simclr", "mixem") and "recipe" not in method:
        values = {**values, "method": {**method, "recipe": "paper"}}
    return _build([(values, where)] + ([(overrides, OVERRIDES)] if overrides else []))
