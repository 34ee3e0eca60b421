"""A fifth method defined here, outside the package, trains, resumes and evaluates through the trainer and the
command line without a change to any package file (docs/adding-a-method.md walks through it).

`BankKMeans`: a BYOL-style student/teacher pair with a memory bank of every sample's teacher embedding,
written by sample index after each step (what SCAN's neighbour lookup needs), and spherical k-means of the bank
at the end of each epoch, whose centres become the clusters it predicts (what k-means-based methods need).
"""
import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmice.cli import main
from fastmice.config import ConfigError, load_config
from fastmice.core.errors import ConfigError as CoreConfigError
from fastmice.engine.trainer import Trainer
from fastmice.methods import METHODS, Method, MethodConfig, StepOutput, register_method
from fastmice.ops.kmeans import spherical_kmeans
from tests.helpers import tiny_overrides


@dataclass
class BankKMeansConfig(MethodConfig):
    name: str = "bank_kmeans"
    ema_momentum: float = 0.9
    bank_size: int = 320            # rows of the memory bank: the dataset's size

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.ema_momentum < 1:
            raise CoreConfigError(f"method.ema_momentum must be in [0, 1), got {self.ema_momentum}")


class BankKMeans(Method):
    Config = BankKMeansConfig
    num_views = 2

    def __init__(self, cfg: BankKMeansConfig, backbone):
        super().__init__(cfg)
        self.student = nn.Sequential(backbone, nn.Linear(backbone.out_dim, cfg.embed_dim))
        self.predictor = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("bank", F.normalize(torch.randn(cfg.bank_size, cfg.embed_dim), dim=1))
        self.register_buffer("centres", F.normalize(torch.randn(cfg.num_clusters, cfg.embed_dim), dim=1))
        self.register_buffer("seen", torch.zeros(cfg.bank_size))

    @classmethod
    def check_config(cls, cfg):
        if cfg.method.num_clusters > cfg.method.bank_size:
            raise CoreConfigError("method.num_clusters must not exceed method.bank_size")

    def check_data(self, num_images):
        super().check_data(num_images)
        if num_images != self.cfg.bank_size:
            raise ValueError(f"method.bank_size={self.cfg.bank_size} must equal the dataset size ({num_images})")

    def backbones(self):
        return [self.student[0], self.teacher[0]]

    def forward(self, views, index=None):
        x1, x2 = views
        p = F.normalize(self.predictor(self.student(x1)).float(), dim=1)
        with torch.no_grad():
            t = F.normalize(self.teacher(x2).float(), dim=1)
        loss = (2 - 2 * (p * t).sum(1)).mean()
        out = StepOutput(loss, None)
        out.keys, out.index = t, index        # what after_step writes into the bank
        return out

    @torch.no_grad()
    def after_step(self, out):
        torch._foreach_lerp_(list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()],
                             1 - self.cfg.ema_momentum)
        self.bank.index_copy_(0, out.index, out.keys)
        self.seen.index_fill_(0, out.index, 1.0)

    def end_epoch(self, data=None):
        assert data is not None and data.images is not None and data.images.shape[0] == self.cfg.bank_size
        labels, centres = spherical_kmeans(self.bank, self.num_clusters, niter=5, seed=data.seed)
        with torch.no_grad():
            self.centres.copy_(torch.as_tensor(centres, device=self.centres.device, dtype=torch.float32))
        return {"bank_rows_seen": int(self.seen.sum()), "cluster_sizes": np.bincount(
            np.asarray(labels), minlength=self.num_clusters).tolist()}

    @torch.no_grad()
    def infer(self, x):
        h = self.student[0](x)
        z = F.normalize(self.teacher(x).float(), dim=1)
        return {"features": h.float(), "embedding": z, "probs": torch.softmax(z @ self.centres.t() / 0.1, dim=1)}

    def readouts(self, out, eval_cfg, seed):
        return {"centres": out["probs"].argmax(1).cpu().numpy(), **super().readouts(out, eval_cfg, seed)}


@pytest.fixture
def registered():
    register_method("bank_kmeans", BankKMeans)
    yield
    METHODS.pop("bank_kmeans")


def overrides(tmp_path, **extra):
    return tiny_overrides(tmp_path, **{"method.name": "bank_kmeans", "method.embed_dim": 16, "optim.epochs": 2,
                                       **extra})


def test_a_method_defined_outside_the_package_trains_resumes_and_evaluates(tmp_path, digits_small, registered,
                                                                           capsys):
    cfg = load_config("digits", overrides(tmp_path, **{"train.run_name": "full"}))
    assert type(cfg.method) is BankKMeansConfig and cfg.method.ema_momentum == 0.95   # digits.yaml sets it
    full = Trainer(cfg, tmp_path / "full", digits_small)
    full.fit()
    part = Trainer(load_config("digits", overrides(tmp_path, **{"train.max_steps": 13})), tmp_path / "part",
                   digits_small)
    assert part.fit()["status"] == "max_steps"
    resumed = Trainer.resume(tmp_path / "part", {"train": {"max_steps": None}}, digits_small)
    resumed.fit()
    for (name, a), b in zip(full.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), name                    # the bank written by index, the centres of epoch 2
    assert int(full.method.seen.sum()) == 320             # every index reached the method (10 steps x 32)
    epochs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["type"] == "epoch"]
    assert [r["bank_rows_seen"] for r in epochs] == [320, 320] and len(epochs[-1]["cluster_sizes"]) == 10

    from fastmice.eval.evaluate import evaluate_model
    result = evaluate_model(full.method, digits_small, full.cfg, full.device, tmp_path / "full", full.crop_size)
    assert result["primary"] == "centres" and set(result["readouts"]) == {"centres", "kmeans"}
    assert 0 <= result["readouts"]["centres"]["acc"] <= 1


def test_the_cli_trains_and_evaluates_with_the_registered_method(tmp_path, registered, capsys):
    run = tmp_path / "cli"
    cfg_file = tmp_path / "bank.yaml"
    cfg_file.write_text("method:\n  name: bank_kmeans\n  num_clusters: 10\n  embed_dim: 16\n  bank_size: 1797\n"
                        "data:\n  source: digits\n  image_size: 8\n  mean: [0.3, 0.3, 0.3]\n  std: [0.37, 0.37, 0.37]\n"
                        "backbone:\n  arch: resnet10\n  width: 4\n"
                        "optim:\n  batch_size: 128\n  epochs: 1\n  lr: 0.1\n  lr_steps: []\n"
                        "train:\n  progress: false\n  log_every: 5\neval:\n  kmeans_niter: 5\n  pixel_baseline: false\n")
    assert main(["train", str(cfg_file), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "centres" in out and (run / "eval.json").is_file()
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["primary"] == "centres"


def test_a_registered_methods_config_checks_run_when_the_config_is_read(tmp_path, registered):
    with pytest.raises(ConfigError, match="must not exceed method.bank_size"):
        load_config("digits", overrides(tmp_path, **{"method.bank_size": 5}))
    with pytest.raises(ConfigError, match="unknown setting method.queue_size"):
        load_config("digits", overrides(tmp_path) + ["--method.queue_size=4"])
    with pytest.raises(TypeError, match="subclass of fastmice.methods.Method"):
        register_method("nope", object)
