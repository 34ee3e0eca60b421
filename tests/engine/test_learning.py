"""MiCE learns: on the bundled digits it must beat k-means on the raw pixels of the same images.

The embedded default config as shipped, seed 0 (90-140 s on 2 idle cores). k-means on raw pixels is a
strong baseline on these well-aligned 8x8 digits (78.9 ACC with seed 0); issue 15 asks the default to beat it
by 8 ACC points and reach 90 on every seed (bench/RESULTS.md: seeds 0-9 at 94.7-95.6 on 2 threads,
90.2-95.7 on one).
"""
import pytest

from fastmice.config import load_config
from fastmice.data.sources import load_digits
from fastmice.eval.evaluate import evaluate_model
from fastmice.ops.kmeans import kmeans_raw_pixels
from fastmice.ops.metrics import cluster_metrics


@pytest.mark.slow
def test_mice_beats_pixel_kmeans_on_digits(tmp_path):
    from fastmice.engine.trainer import Trainer

    cfg = load_config("digits", [f"--train.out_dir={tmp_path}", "--train.progress=false",
                                 "--eval.pixel_baseline=false"])
    assert cfg.train.seed == 0
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.fit()
    assert summary["status"] == "finished"
    result = evaluate_model(trainer.method, trainer.dataset, cfg, trainer.device, trainer.run_dir, trainer.crop_size)

    digits = load_digits(8)
    baseline = cluster_metrics(digits.labels.numpy(), kmeans_raw_pixels(digits.images, 10, seed=0))
    mice = result["readouts"]["posterior"]
    print(f"MiCE ACC {mice['acc']:.3f} NMI {mice['nmi']:.3f} ARI {mice['ari']:.3f} sizes {mice['cluster_sizes']}; "
          f"pixel k-means ACC {baseline['acc']:.3f} NMI {baseline['nmi']:.3f} ARI {baseline['ari']:.3f}")
    # Issue 15's bar for one seed: ACC >= 90 and >= 8 points above pixel k-means, NMI and ARI above it too, and
    # every cluster in real use (the 10-seed screen's smallest clusters: 149-156, and 88 on its 90.15 seed).
    assert mice["acc"] >= max(0.90, baseline["acc"] + 0.08)
    assert mice["nmi"] > baseline["nmi"]
    assert mice["ari"] > baseline["ari"]
    assert min(mice["cluster_sizes"]) > 0.4 * 1797 / 10


# The digits config as it was when the figures below were measured (16 px, batch 64, a 2-epoch warm-up; MoCo's
# queue 1024 and EMA 0.99): MiCE's default recipe since (issue 15) is not theirs.
EARLIER_DIGITS = ["--data.image_size=16", "--optim.batch_size=64", "--optim.warmup_epochs=2"]
METHOD_SETTINGS = {
    "moco": ["--method.tau=0.2", "--method.queue_size=1024", "--method.ema_momentum=0.99"],
    "simclr": ["--optim.name=adam", "--optim.lr=1e-3", "--optim.schedule=cosine", "--method.temperature=0.5",
               "--method.embed_dim=32", "--method.hidden_dim=128"],
    "mixem": ["--optim.name=adam", "--optim.lr=1e-3", "--optim.schedule=cosine", "--method.temperature=0.5",
              "--method.embed_dim=32", "--method.hidden_dim=128"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_other_methods_learn_on_digits(method, tmp_path):
    """MoCo, SimCLR and MIX'EM on the digits (10 epochs): the loss falls and the clusters are far above chance.

    15-epoch runs reached k-means ACC 87.1 (MoCo), 84.3 (SimCLR) and 84.5 (MIX'EM, component-initialised);
    see bench/RESULTS.md.
    """
    import json

    from fastmice.engine.trainer import Trainer

    cfg = load_config("digits", [f"--train.out_dir={tmp_path}", "--train.progress=false", f"--method={method}",
                                 "--optim.epochs=10", "--optim.lr_steps=[8]", "--eval.pixel_baseline=false",
                                 "--eval.kmeans_restarts=2"] + EARLIER_DIGITS + METHOD_SETTINGS[method])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "epoch"]
    # Against the worst epoch, not the first steps: MoCo starts with a queue of random unit vectors (easy
    # negatives), so its loss first rises as real keys fill the queue (7 steps here), then falls.
    assert losses[-1] < max(losses) - 0.3
    result = evaluate_model(trainer.method, trainer.dataset, cfg, trainer.device, trainer.run_dir, trainer.crop_size)
    primary = result["readouts"][result["primary"]]
    print(method, result["primary"], primary)
    assert primary["acc"] > 0.6 and primary["nmi"] > 0.55
