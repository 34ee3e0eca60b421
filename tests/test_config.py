"""Config loading: bundled configs, overrides, validation messages."""
import pytest

from fastmice.config import ConfigError, bundled_configs, load_config, parse_overrides


def test_bundled_configs_load_and_carry_the_papers_settings():
    assert {"digits", "cifar10", "cifar100_20", "stl10", "imagenet_dog"} <= set(bundled_configs())
    c10 = load_config("cifar10")
    assert (c10.model.arch, c10.model.num_clusters, c10.model.queue_size) == ("resnet34", 10, 16384)
    assert (c10.optim.batch_size, c10.optim.lr, c10.optim.momentum, c10.optim.weight_decay) == (256, 1.0, 0.9, 1e-4)
    assert (c10.optim.epochs, c10.optim.lr_steps) == (1000, [480, 640, 800])
    assert (c10.model.tau, c10.model.kappa, c10.model.ema_momentum) == (1.0, 1.0, 0.999)
    assert c10.augment.crop_scale == (0.2, 1.0) and c10.augment.jitter == (0.4, 0.4, 0.4, 0.4)
    assert c10.augment.grayscale_p == 0.2 and c10.augment.flip_p == 0.5
    c100 = load_config("cifar100_20")
    assert c100.model.num_clusters == 20 and c100.data.source == "cifar100_20"
    stl = load_config("stl10")
    assert (stl.model.queue_size, stl.model.stem, stl.optim.epochs, stl.optim.lr_steps) == (
        12800, "imagenet", 6000, [3000, 4000, 5000])
    dog = load_config("imagenet_dog")
    assert (dog.model.num_clusters, dog.optim.epochs, dog.optim.lr_steps) == (15, 3000, [1500, 2000, 2500])


def test_overrides_are_typed():
    cfg = load_config("cifar10", ["--model.num_clusters=20", "--optim.lr=0.5", "--optim.lr_steps=[10, 20]",
                                  "--data.root=/x", "--train.max_steps=null", "--optim.weight_decay=1e-5", "--augment.crop_scale=[0.3, 1]"])
    assert cfg.model.num_clusters == 20 and cfg.optim.lr == 0.5 and cfg.optim.lr_steps == [10, 20]
    assert cfg.optim.weight_decay == 1e-5
    assert cfg.data.root == "/x" and cfg.train.max_steps is None and cfg.augment.crop_scale == (0.3, 1.0)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_yaml_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model:\n  num_clusters: 7\noptim:\n  epochs: 3\n")
    cfg = load_config(p)
    assert cfg.name == "mine" and cfg.model.num_clusters == 7 and cfg.optim.epochs == 3
    assert cfg.model.arch == "resnet34"                      # untouched keys keep their defaults


@pytest.mark.parametrize("override,message", [
    ("--model.num_clusterz=3", "did you mean model.num_clusters"),
    ("--model.num_clusters=three", "model.num_clusters: expected an integer"),
    ("--model.num_clusters=200", "needs model.embed_dim >= K-1"),
    ("--optim.lr=-1", "optim.lr must be > 0"),
    ("--optim.batch_size=20000", "a batch must fit in the queue"),
    ("--model.arch=vgg", "model.arch='vgg' is not one of"),
    ("--train.amp=fp8", "train.amp must be"),
    ("--optim.lr_steps=[5, 2]", "increasing"),
    ("--data.source=mnist", "mnist"),
    ("--model.queue_dtype=int8", "queue_dtype"),
    ("--nosuchsection.x=1", "unknown setting nosuchsection"),
])
def test_bad_settings_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10", [override])


def test_missing_config_lists_bundled():
    with pytest.raises(ConfigError, match="bundled: .*cifar10"):
        load_config("nonexistent")
    with pytest.raises(ConfigError, match="must look like"):
        load_config("cifar10", ["model.k"])
