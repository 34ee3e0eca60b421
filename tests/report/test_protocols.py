"""The paper-reproduction protocols: seeds and their summary (Table 1), Appendix E's SGD on mu, the figures'
inputs (posterior histograms, embedding snapshots), overclustering, and MiCE-from-MiCE fine-tuning (Table 4)."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import tiny_overrides
from fastmice.cli import main
from fastmice.config import ConfigError, load_config
from fastmice.report.seeds import PAPER, find_runs, parse_seeds, summarize
from fastmice.engine.trainer import Trainer


def make_trainer(tmp_path, dataset, name, **extra):
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.run_name": name, **extra}))
    return Trainer(cfg, tmp_path / name, dataset)


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# ---- Table 1: seeds and summary -------------------------------------------------------------------------
def test_parse_seeds():
    assert parse_seeds("0,1,2,3,4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-1, 7") == [0, 1, 7]
    for bad in ("", "a,b", "1,1", "0-"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def fake_run(folder, name, seed, acc, nmi, ari, seconds):
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"primary": "posterior", "readouts": {
        "posterior": {"acc": acc, "nmi": nmi, "ari": ari, "cluster_sizes": [1, 2]},
        "gating": {"acc": acc / 2, "nmi": nmi / 2, "ari": ari / 2, "cluster_sizes": [2, 1]}}}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": name, "method": "mice", "train": {"seed": seed},
                                                        "optim": {"epochs": 1000}}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"type": "epoch", "epoch": e + 1, "epoch_seconds": seconds / 2}) + "\n" for e in range(2)))


def test_summary_is_mean_and_sample_std_beside_the_paper(tmp_path):
    for seed, acc in enumerate((0.80, 0.84, 0.88)):
        fake_run(tmp_path / f"seed{seed}", "cifar10", seed, acc, 0.7, 0.6, 3600.0)
    s = summarize(find_runs([tmp_path]), tmp_path)
    acc = s["readouts"]["posterior"]["acc"]
    assert acc["mean"] == pytest.approx(84.0) and acc["std"] == pytest.approx(4.0)     # sample std of 80, 84, 88
    assert s["readouts"]["gating"]["acc"]["mean"] == pytest.approx(42.0)
    assert s["seeds"] == [0, 1, 2] and s["train_seconds"]["total"] == pytest.approx(3 * 3600)
    assert s["paper"] == PAPER["cifar10"]
    md = (tmp_path / "summary.md").read_text()
    assert "| posterior (primary) | 84.0 ± 4.0 | 70.0 ± 0.0 | 60.0 ± 0.0 |" in md
    assert "| published (MiCE, Table 1) | 83.4 | 73.5 | 69.5 |" in md
    assert "1.00 h per run" in md and "30 h" in md
    assert json.loads((tmp_path / "summary.json").read_text())["readouts"]["posterior"]["acc"]["mean"] == 84.0
    with pytest.raises(FileNotFoundError):
        summarize([tmp_path / "nothing"])


def test_summary_command_on_a_folder_of_runs(tmp_path, capsys):
    fake_run(tmp_path / "g" / "a", "moco_cifar10", 0, 0.7, 0.6, 0.5, 10.0)
    assert main(["summary", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "70.0 ± 0.0" in out and "74.7" in out and (tmp_path / "g" / "summary.md").is_file()


@pytest.mark.slow
def test_seeds_protocol_end_to_end_and_rerun_continues(tmp_path, capsys):
    group = tmp_path / "group"
    args = ["train", "digits", "--seeds", "0,1", "--parallel", "2", "--run-dir", str(group),
            "--data.image_size=8", "--backbone.width=4", "--method.embed_dim=16", "--method.queue_size=64",
            "--optim.batch_size=32", "--train.max_steps=3", "--eval.pixel_baseline=false", "--eval.kmeans_niter=5"]
    assert main(args) == 0
    for seed in (0, 1):
        cfg = yaml.safe_load((group / f"seed{seed}" / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed and (group / f"seed{seed}" / "eval.json").is_file()
    summary = json.loads((group / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and "posterior" in summary["readouts"]
    assert summary["readouts"]["posterior"]["per_run"][0] != summary["readouts"]["posterior"]["per_run"][1]
    # An interrupted group: seed 1 lost its evaluation; the same command resumes it and skips seed 0.
    (group / "seed1" / "eval.json").unlink()
    before = (group / "seed0" / "eval.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "1 seed(s) already evaluated" in capsys.readouterr().out
    assert (group / "seed1" / "eval.json").is_file()
    assert (group / "seed0" / "eval.json").stat().st_mtime_ns == before


def test_seeds_refuses_a_bad_config_before_training(tmp_path, capsys):
    assert main(["train", "digits", "--seeds", "0,1", "--run-dir", str(tmp_path / "g"), "--model.nope=1"]) == 2
    assert "unknown setting method.nope" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


# ---- Appendix E: extra end-of-epoch SGD on mu alone ---------------------------------------------------------
def test_mu_only_loss_trains_mu_and_nothing_else():
    from fastmice.methods import build_method

    torch.manual_seed(0)
    cfg = load_config("cifar10", ["--backbone.arch=resnet10", "--backbone.width=4", "--method.embed_dim=16",
                                  "--method.queue_size=32", "--optim.batch_size=8"])
    model = build_method(cfg).train()
    views = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    loss = model.mu_only_loss(list(views))
    loss.backward()
    assert model.mu.grad is not None and model.mu.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n != "mu")
    opt = torch.optim.SGD([model.mu], lr=0.5)
    first = float(loss.detach())
    for _ in range(5):
        opt.zero_grad()
        loss = model.mu_only_loss(list(views))
        loss.backward()
        opt.step()
    assert float(model.mu_only_loss(list(views)).detach()) < first


def test_appendix_e_refines_mu_at_epoch_end(tmp_path, digits_small):
    frozen = make_trainer(tmp_path, digits_small, "frozen", **{"method.mu_grad": "false", "method.mu_analytical": "false",
                                                               "optim.epochs": 1})
    mu0 = frozen.method.mu.detach().clone()
    frozen.fit()
    assert torch.equal(frozen.method.mu, mu0)            # neither SGD nor Eq. 13: mu never moves
    sgd = make_trainer(tmp_path, digits_small, "sgd", **{"method.mu_grad": "false", "method.mu_analytical": "false",
                                                         "method.mu_sgd_passes": 2, "optim.epochs": 1})
    assert torch.equal(sgd.method.mu, mu0)
    sgd.fit()
    assert not torch.equal(sgd.method.mu, mu0) and not sgd.method.mu.requires_grad
    epoch = records(tmp_path / "sgd", "epoch")[0]
    assert epoch["mu_sgd_passes"] == 2 and epoch["mu_sgd_change"] > 0
    # the same training stream: the networks' weights after the epoch equal the frozen run's
    for (n, a), b in zip(frozen.method.student.named_parameters(), sgd.method.student.parameters()):
        assert torch.equal(a, b), n


def test_appendix_e_needs_mice_with_the_class_term():
    with pytest.raises(ConfigError, match="Appendix E"):
        load_config("digits", ["--method.mu_sgd_passes=1", "--method.class_term=false"])
    with pytest.raises(ConfigError, match="unknown setting method.mu_sgd_passes"):   # MoCo has no mu
        load_config("moco_cifar10", ["--method.mu_sgd_passes=1"])


# ---- figure inputs: posterior histograms, embedding snapshots, report figures ----------------------------
def test_posterior_histogram_counts_every_posterior_value(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "hist")
    t.fit()
    epochs = records(tmp_path / "hist", "epoch")
    steps_per_epoch, batch, k = 10, 32, 10
    for r in epochs:
        assert len(r["posterior_hist"]) == 10 and sum(r["posterior_hist"]) == steps_per_epoch * batch * k
    assert int(t.method.posterior_hist.sum()) == 0       # reset at the end of each epoch


@pytest.mark.slow
def test_snapshots_and_the_papers_figures_in_the_report(tmp_path, digits_small):
    from fastmice.report.html_report import make_report

    t = make_trainer(tmp_path, digits_small, "figs", **{"eval.embed_every": 1, "eval.embed_samples": 100,
                                                        "eval.probe_every": 1})
    t.fit()
    snaps = sorted((tmp_path / "figs" / "embeddings").glob("epoch_*.npz"))
    assert [p.name for p in snaps] == ["epoch_0001.npz", "epoch_0002.npz"]
    with np.load(snaps[0]) as z, np.load(snaps[1]) as z2:
        assert z["embedding"].shape == (100, 16) and np.array_equal(z["index"], z2["index"])
        assert np.allclose(np.linalg.norm(z["embedding"], axis=1), 1, atol=1e-4)
        assert np.array_equal(z["label"], digits_small.labels.numpy()[z["index"]])
        assert not np.allclose(z["embedding"], z2["embedding"])
    evals = records(tmp_path / "figs", "eval")
    assert [r["epoch"] for r in evals] == [1, 2] and all(0 <= r["posterior"]["nmi"] <= 1 for r in evals)

    index = make_report(tmp_path / "figs", device="cpu", tsne_samples=60)
    html = index.read_text()
    for name in ("metrics_per_epoch.png", "posterior_histogram.png", "tsne.png"):
        assert (index.parent / name).stat().st_size > 1000 and f'src="{name}"' in html


def test_tsne_caps_the_perplexity_for_small_samples():
    from fastmice.report.figures import tsne

    x = np.random.default_rng(0).normal(size=(40, 8))
    xy = tsne(x)                         # perplexity 200 > n / 3: capped, not an error
    assert xy.shape == (40, 2) and np.isfinite(xy).all()


# ---- overclustering (Appendix F) ------------------------------------------------------------------------------
def test_overclustering_reports_many_to_one_beside_hungarian(tmp_path, digits_small):
    from fastmice.eval.evaluate import evaluate_model, format_results

    t = make_trainer(tmp_path, digits_small, "over", **{"method.num_clusters": 20, "method.embed_dim": 32,
                                                         "optim.epochs": 1})
    t.fit()
    result = evaluate_model(t.method, t.dataset, t.cfg, t.device, t.run_dir, t.crop_size)
    post = result["readouts"]["posterior"]
    assert len(post["cluster_sizes"]) == 20
    assert 0 < post["acc"] <= post["acc_many_to_one"] <= 1 and math.isfinite(post["nmi"])
    assert "M2O ACC" in format_results(result)


# ---- Table 4: MiCE pre-training + MiCE --------------------------------------------------------------------------
def test_finetune_copies_the_whole_model_and_needs_init_from(tmp_path, digits_small):
    pre = make_trainer(tmp_path, digits_small, "pre", **{"optim.epochs": 1})
    pre.fit()
    tuned = make_trainer(tmp_path, digits_small, "tuned", **{"train.init_from": tmp_path / "pre",
                                                             "train.init_scope": "model", "optim.lr": 0.1})
    for key, value in pre.method.state_dict().items():
        assert torch.equal(tuned.method.state_dict()[key], value), key
    with pytest.raises(ValueError, match="--init-from"):
        make_trainer(tmp_path, digits_small, "none", **{"train.init_scope": "model"})
    with pytest.raises(ValueError, match="checkpoint has K=10 clusters .* asks for 5 .method.num_clusters."):
        make_trainer(tmp_path, digits_small, "k5", **{"train.init_from": tmp_path / "pre",
                                                      "train.init_scope": "model", "method.num_clusters": 5})
    cfg = load_config("mice_finetune_cifar10")
    assert cfg.optim.lr == 0.1 and cfg.train.init_scope == "model"


def test_augment_recipe_switch_trains_with_randaugment(tmp_path):
    args = ["train", "digits", "--augment-recipe", "randaugment", "--run-dir", str(tmp_path / "ra"),
            "--augment.randaugment_magnitude=5"] + tiny_overrides(tmp_path, **{"train.max_steps": 2,
                                                                              "eval.at_end": "false"})
    assert main(args) == 0
    aug = yaml.safe_load((tmp_path / "ra" / "config.yaml").read_text())["augment"]
    assert aug["randaugment_ops"] == 2 and aug["randaugment_magnitude"] == 5     # explicit overrides win
    assert aug["jitter_p"] == 0 and aug["grayscale_p"] == 0
