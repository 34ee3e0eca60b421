"""Typed run configuration: dataclasses loaded from YAML, `--section.key=value` overrides, validation.

A config file names only what differs from the defaults below, which are the paper's CIFAR-10 settings
(Appendix D); the embedded default run is the bundled `digits` config.
Bundled configs (configs/*.yaml, shipped as fastmice.configs) can be named without a path: `cifar10`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastmice.augment import AugmentConfig
from fastmice.data.sources import DataSourceConfig
from fastmice.models.mixem import MixEMWeights

METHODS = ("mice", "moco", "mixem", "simclr")
# train.compile: torch.compile modes of the whole training forward (networks and loss; see fastmice.compile)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIM_IMPLS = ("auto", "fused", "foreach", "loop")


class ConfigError(ValueError):
    """A config value or override that cannot be used; the message says which and why."""


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


@dataclass
class ModelConfig:
    arch: str = "resnet34"          # resnet34 (paper) | resnet18 | resnet10
    stem: str = "cifar"             # cifar: 3x3 stride-1 conv, no max-pool; imagenet: 7x7/2 + max-pool (96 px)
    width: int = 64                 # channels of the first stage
    num_clusters: int = 10          # K
    embed_dim: int = 128            # D
    queue_size: int = 16384         # V; must not exceed the dataset size
    tau: float = 1.0                # expert temperature
    kappa: float = 1.0              # gating temperature
    ema_momentum: float = 0.999     # teacher m
    queue_dtype: str = "float32"    # float32 | bfloat16 | float16
    single_pass: bool = False       # x_f and x_g through the student backbone in one batch (faster; changes BN)
    # MiCE ablations (Table 3 of the paper); the defaults are the full model.
    prior: str = "gating"           # gating (the paper) | uniform: kappa -> inf, pi_k = 1/K (assumption A3)
    shared_head: bool = False       # one output layer shared by the K experts (assumption A4)
    class_term: bool = True         # mu in the expert logits; off: instance-level term only (assumption A5)
    mu_analytical: bool = True      # the end-of-epoch update of mu (Eq. 13); off: SGD only
    mu_grad: bool = True            # mu trained by SGD; off: the analytical update only
    omega_init: str = "mmd"         # mmd: Max-Mahalanobis centres (Algorithm 2) | uniform: random unit vectors
    omega_learned: bool = False     # train omega by gradient instead of keeping it fixed
    # Appendix E's alternative to Eq. 13: after each epoch, SGD on mu alone (networks fixed) for up to this many
    # passes over the data, stopping early once mu moves less than mu_sgd_tol (mean |delta mu|) in a pass.
    # The paper reaches Eq. 13's accuracy this way at >10x the training time; use with mu_analytical: false.
    mu_sgd_passes: int = 0
    mu_sgd_tol: float = 1e-4
    hidden_dim: int = 512           # MIX'EM / SimCLR: hidden width of the projection MLPs

    def validate(self) -> None:
        from fastmice.models.resnet import ARCHS
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch={self.arch!r} is not one of {sorted(ARCHS)}")
        if self.stem not in ("cifar", "imagenet"):
            raise ConfigError(f"model.stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        if self.num_clusters < 1:
            raise ConfigError(f"model.num_clusters must be >= 1, got {self.num_clusters}")
        if self.embed_dim < 1 or self.width < 1 or self.queue_size < 1:
            raise ConfigError("model.embed_dim, model.width and model.queue_size must be positive")
        if self.tau <= 0 or self.kappa <= 0:
            raise ConfigError(f"model.tau and model.kappa must be > 0, got {self.tau}, {self.kappa}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"model.ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.omega_init not in ("mmd", "uniform"):
            raise ConfigError(f"model.omega_init must be 'mmd' or 'uniform', got {self.omega_init!r}")
        if self.prior not in ("gating", "uniform"):
            raise ConfigError(f"model.prior must be 'gating' or 'uniform', got {self.prior!r}")
        if self.mu_sgd_passes < 0 or self.mu_sgd_tol < 0:
            raise ConfigError(f"model.mu_sgd_passes and model.mu_sgd_tol must be >= 0, got "
                              f"{self.mu_sgd_passes}, {self.mu_sgd_tol}")
        if self.queue_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.queue_dtype must be float32, bfloat16 or float16, got {self.queue_dtype!r}")


@dataclass
class OptimConfig:
    name: str = "sgd"                # sgd (MiCE, MoCo) | adam (MIX'EM, SimCLR)
    schedule: str = "step"           # step: x lr_gamma at lr_steps | cosine: to 0 over the epochs after warm-up
    batch_size: int = 256            # drop_last: every step sees a full batch
    epochs: int = 1000
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    mu_weight_decay: bool = True     # the public code decays mu too; the paper is silent
    lr_steps: list[int] = field(default_factory=lambda: [480, 640, 800])   # epochs where lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0       # linear warm-up from 0 (the official code: 10 epochs)
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
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"optim.schedule must be 'step' or 'cosine', got {self.schedule!r}")
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

    def validate(self) -> None:
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
    # Save the embeddings of a fixed subsample at epoch 1, every N epochs and at the end (RUN/embeddings/), for
    # the t-SNE of `fastmice report` across training (the paper's Fig. 2, 4, 5); 0: only the final model's.
    embed_every: int = 0
    embed_samples: int = 2000

    def validate(self) -> None:
        if self.embed_every < 0 or self.embed_samples < 1 or self.probe_every < 0:
            raise ConfigError("eval.embed_every and eval.probe_every must be >= 0 and eval.embed_samples >= 1")


@dataclass
class Config:
    method: str = "mice"
    name: str = "mice"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)   # MoCo v1
    model: ModelConfig = field(default_factory=ModelConfig)
    mixem: MixEMWeights = field(default_factory=MixEMWeights)   # MIX'EM's extra loss weights
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: available methods are {list(METHODS)}")
        if self.mixem.confidence_kind not in ("entropy", "max"):
            raise ConfigError(f"mixem.confidence_kind must be 'entropy' or 'max', got {self.mixem.confidence_kind!r}")
        for section in (self.data, self.augment, self.model, self.optim, self.train, self.eval):
            try:
                section.validate()
            except ConfigError:
                raise
            except ValueError as e:   # section validators from other modules raise plain ValueError
                raise ConfigError(str(e)) from e
        m = self.model
        if self.method == "mice" and m.omega_init == "mmd" and m.num_clusters > m.embed_dim + 1:
            raise ConfigError(f"model.num_clusters={m.num_clusters} needs model.embed_dim >= K-1 "
                              f"(the gating prototypes are K maximally separated unit vectors in R^D)")
        if m.mu_sgd_passes and (self.method != "mice" or not m.class_term):
            raise ConfigError("model.mu_sgd_passes (Appendix E) needs method: mice with model.class_term: true")
        if self.method in ("mice", "moco") and self.optim.batch_size > self.model.queue_size:
            raise ConfigError(f"optim.batch_size={self.optim.batch_size} exceeds model.queue_size="
                              f"{self.model.queue_size}: a batch must fit in the queue")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading -------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, bool):   # YAML 1.1 reads on/off/yes/no as booleans: `--train.amp=off`, `compile: off`
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown setting {where + '.' if where else ''}{key}{hint}; "
                              f"valid: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['--model.num_clusters=20', 'optim.lr=0.5'] -> {'model': {'num_clusters': 20}, 'optim': {'lr': 0.5}}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {e}") from e
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(str(path))
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        values = _merge(values, loaded)
        values.setdefault("name", p.stem)
    values = _merge(values, parse_overrides(overrides or []))
    # Sections given in the file replace only the keys they name: merge over the defaults' dict form.
    merged = _merge(Config().to_dict(), values)
    try:
        return _build(Config, merged, "").validate()
    except TypeError as e:  # a dataclass rejected its arguments
        raise ConfigError(str(e)) from e


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved in a run folder or checkpoint."""
    return _build(Config, _merge(Config().to_dict(), values), "").validate()
