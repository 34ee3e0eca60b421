"""Config loading: bundled configs, overrides, validation messages."""
import pytest

from fastmice.config import ConfigError, bundled_configs, load_config, parse_overrides


def test_bundled_configs_load_and_carry_the_papers_settings():
    assert {"digits", "cifar10", "cifar100_20", "stl10", "imagenet_dog"} <= set(bundled_configs())
    c10 = load_config("cifar10")
    assert (c10.backbone.arch, c10.method.num_clusters, c10.method.queue_size) == ("resnet34", 10, 16384)
    assert (c10.optim.batch_size, c10.optim.lr, c10.optim.momentum, c10.optim.weight_decay) == (256, 1.0, 0.9, 1e-4)
    assert (c10.optim.epochs, c10.optim.lr_steps) == (1000, [480, 640, 800])
    assert (c10.method.tau, c10.method.kappa, c10.method.ema_momentum) == (1.0, 1.0, 0.999)
    assert c10.augment.crop_scale == (0.2, 1.0) and c10.augment.jitter == (0.4, 0.4, 0.4, 0.4)
    assert c10.augment.grayscale_p == 0.2 and c10.augment.flip_p == 0.5
    c100 = load_config("cifar100_20")
    assert c100.method.num_clusters == 20 and c100.data.source == "cifar100_20"
    stl = load_config("stl10")
    assert (stl.method.queue_size, stl.backbone.stem, stl.optim.epochs, stl.optim.lr_steps) == (
        12800, "imagenet", 6000, [3000, 4000, 5000])
    dog = load_config("imagenet_dog")
    assert (dog.method.num_clusters, dog.optim.epochs, dog.optim.lr_steps) == (15, 3000, [1500, 2000, 2500])


def test_overrides_are_typed():
    cfg = load_config("cifar10", ["--method.num_clusters=20", "--optim.lr=0.5", "--optim.lr_steps=[10, 20]",
                                  "--data.root=/x", "--train.max_steps=null", "--optim.weight_decay=1e-5", "--augment.crop_scale=[0.3, 1]"])
    assert cfg.method.num_clusters == 20 and cfg.optim.lr == 0.5 and cfg.optim.lr_steps == [10, 20]
    assert cfg.optim.weight_decay == 1e-5
    assert cfg.data.root == "/x" and cfg.train.max_steps is None and cfg.augment.crop_scale == (0.3, 1.0)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_yaml_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model:\n  num_clusters: 7\noptim:\n  epochs: 3\n")
    cfg = load_config(p)
    assert cfg.name == "mine" and cfg.method.num_clusters == 7 and cfg.optim.epochs == 3
    assert cfg.backbone.arch == "resnet34"                      # untouched keys keep their defaults


@pytest.mark.parametrize("override,message", [
    ("--model.num_clusterz=3", "did you mean method.num_clusters"),
    ("--method.num_clusters=three", "method.num_clusters: expected an integer"),
    ("--method.num_clusters=200", "needs method.embed_dim >= K-1"),
    ("--optim.lr=-1", "optim.lr must be > 0"),
    ("--optim.batch_size=20000", "a batch must fit in the queue"),
    ("--backbone.arch=vgg", "backbone.arch='vgg' is not one of"),
    ("--train.amp=fp8", "train.amp must be"),
    ("--optim.lr_steps=[5, 2]", "increasing"),
    ("--data.source=mnist", "mnist"),
    ("--method.queue_dtype=int8", "queue_dtype"),
    ("--nosuchsection.x=1", "unknown section 'nosuchsection'"),
])
def test_bad_settings_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10", [override])


def test_missing_config_lists_bundled():
    with pytest.raises(ConfigError, match="bundled: .*cifar10"):
        load_config("nonexistent")
    with pytest.raises(ConfigError, match="must look like"):
        load_config("cifar10", ["model.k"])


def test_the_method_section_is_typed_by_the_methods_own_config():
    from fastmice.methods.mice import MiCEConfig
    from fastmice.methods.mixem import MixEMConfig
    assert type(load_config("digits").method) is MiCEConfig
    mixem = load_config("mixem_cifar10")
    assert type(mixem.method) is MixEMConfig and mixem.method.temperature == 0.5
    with pytest.raises(ConfigError, match="unknown setting method.queue_size.*valid: name, num_clusters"):
        load_config("mixem_cifar10", ["--method.queue_size=10"])   # SimCLR/MIX'EM have no queue


def test_the_earlier_layout_still_loads_with_a_notice(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("method: simclr\nmodel:\n  arch: resnet18\n  width: 8\n  num_clusters: 7\n  tau: 0.3\n"
                   "  queue_size: 99\nmixem:\n  entropy: 3.0\n")
    cfg = load_config(old)
    assert (cfg.method.name, cfg.method.num_clusters, cfg.method.temperature) == ("simclr", 7, 0.3)
    assert (cfg.backbone.arch, cfg.backbone.width) == ("resnet18", 8)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "earlier config layout" in err and "model.queue_size" in err
    new = load_config(None, ["--model.num_clusters=5", "--model.width=4"])      # old-style overrides map too
    assert new.method.num_clusters == 5 and new.backbone.width == 4
    with pytest.raises(ConfigError, match="unknown setting method.hidden_dim"):
        load_config(None, ["--model.hidden_dim=64"])                             # typed by the user: not dropped


def test_switching_the_method_drops_the_files_keys_it_does_not_have(capsys):
    cfg = load_config("digits", ["--method.name=simclr"])
    assert cfg.method.name == "simclr" and cfg.method.embed_dim == 64            # digits' D is kept
    assert "method.queue_size" in capsys.readouterr().err
