"""Every switch the README documents, end to end through the command line: each method with each switch trains
12 steps (across the end of its first epoch of 10) and evaluates; one case per method and those whose readouts
or data path differ then run `fastmice eval`, assign new images (MiCE and MIX'EM: the methods with cluster
probabilities; MoCo and SimCLR are refused with the README's reason) and write their report. The combinations
that cannot work are refused when the config is read, before anything is built.
"""
import json

import pytest

from fastmice.cli import main
from fastmice.config import ConfigError, load_config
from tests.helpers import tiny_overrides, write_digit_folder

# name -> (extra overrides, extra command-line arguments); "{run:NAME}" is replaced by that case's run folder.
CASES = {
    "mice": ({}, []),
    "mice-A3-uniform-prior": ({"method.prior": "uniform"}, []),
    "mice-A4-shared-head": ({"method.shared_head": "true"}, []),
    "mice-A3+A4": ({"method.prior": "uniform", "method.shared_head": "true"}, []),
    "mice-A5-no-class-term": ({"method.class_term": "false"}, []),
    "mice-no-eq13": ({"method.mu_analytical": "false"}, []),
    "mice-no-mu-grad": ({"method.mu_grad": "false"}, []),
    "mice-omega-uniform": ({"method.omega_init": "uniform"}, []),
    "mice-omega-learned": ({"method.omega_learned": "true"}, []),
    "mice-appendix-E": ({"method.mu_analytical": "false", "method.mu_sgd_passes": 2}, []),
    "mice-A3+appendix-E": ({"method.prior": "uniform", "method.mu_analytical": "false",
                            "method.mu_sgd_passes": 2}, []),
    "mice-overclustering": ({"method.num_clusters": 20, "method.embed_dim": 32}, []),
    "mice-single-pass": ({"method.single_pass": "true"}, []),
    "mice-A3+single-pass": ({"method.prior": "uniform", "method.single_pass": "true"}, []),
    "mice-no-prefetch": ({"train.prefetch": "false"}, []),
    "mice-dali": ({"data.loader": "dali"}, []),
    "mice-recipe-simclr": ({}, ["--augment-recipe", "simclr"]),
    "mice-recipe-randaugment": ({}, ["--augment-recipe", "randaugment"]),
    "mice-init-from": ({"optim.lr": 0.1}, ["--init-from", "{run:mice}"]),
    "moco": ({"method.name": "moco"}, []),
    "moco-no-shuffle-bn": ({"method.name": "moco", "train.shuffle_bn": "false"}, []),
    "simclr": ({"method.name": "simclr"}, []),
    "mixem": ({"method.name": "mixem"}, []),
    "mixem-paper-recipe": ({"method.name": "mixem", "method.recipe": "paper"}, []),
    "mixem-paper-items-mixed": ({"method.name": "mixem", "method.confidence_kind": "entropy", "method.bn": "joint"}, []),
    "mixem-official-schedule": ({"method.name": "mixem", "optim.name": "adam", "optim.lr": 1e-3,
                                 "optim.schedule": "mixem_official", "optim.warmup_epochs": 1}, []),
    "mixem-unnormalised-eval": ({"method.name": "mixem", "eval.normalize": "false"}, []),
    "simclr-paper-recipe": ({"method.name": "simclr", "method.recipe": "paper"}, []),
    "mice-official-schedule": ({"optim.schedule": "mice_official", "optim.warmup_epochs": 1}, []),
    "mice-tensorboard": ({"train.loggers": "tensorboard"}, []),
    "mixem-from-simclr": ({"method.name": "mixem"}, ["--init-from", "{run:simclr}"]),
}


# Cases that also run `fastmice eval`, `predict` and `report` (the others train and evaluate at the end of
# training): one per method, and those whose readouts or data path differ (no gating readout, K = 20, DALI,
# the paper's MIX'EM readout). The report and predict code is the same for the other switches; CI time is not.
DOWNSTREAM = {"mice", "mice-A3-uniform-prior", "mice-A3+A4", "mice-overclustering", "mice-dali",
              "mice-appendix-E", "moco", "simclr", "mixem", "mixem-paper-recipe"}


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    base = tmp_path_factory.mktemp("switches")
    images = write_digit_folder(base / "new-images", 12, labelled=False)
    data = write_digit_folder(base / "digits-320", 320, labelled=True)     # 10 steps of 32 an epoch
    return base, images, data


@pytest.mark.parametrize("name", list(CASES))
def test_switch_trains_evaluates_predicts_and_reports(name, battery, capsys):
    base, images, data = battery
    extra, args = CASES[name][0], list(CASES[name][1])
    for i, a in enumerate(args):
        if a.startswith("{run:"):                     # another case's run: trained first when run alone (-k)
            source = a[len("{run:"):-1]
            if not (base / source / "eval.json").is_file():
                test_switch_trains_evaluates_predicts_and_reports(source, battery, capsys)
            args[i] = str(base / source / "checkpoint.pt")
    run = base / name
    if not (run / "eval.json").is_file():
        overrides = tiny_overrides(base, **{"data.source": "folder", "data.root": str(data), "train.max_steps": 12,
                                            "eval.kmeans_restarts": 1, **extra})
        assert main(["train", "--run-dir", str(run)] + args + overrides) == 0, capsys.readouterr().err
    result = json.loads((run / "eval.json").read_text())
    assert result["readouts"] and all("acc" in r for r in result["readouts"].values())
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["type"] == "epoch"] == [10]       # across the first epoch's end
    assert max(r["step"] for r in logged if r["type"] == "step") == 12
    if name not in DOWNSTREAM:
        return
    assert main(["eval", str(run)]) == 0
    out = run / "predictions.csv"
    if name.startswith(("moco", "simclr")):     # the README: predict needs cluster probabilities (MiCE, MIX'EM)
        capsys.readouterr()
        assert main(["predict", str(run), str(images), "--out", str(out)]) == 2
        assert "no cluster probabilities" in capsys.readouterr().err
    else:
        assert main(["predict", str(run), str(images), "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 1 + 12
    assert main(["report", str(run), "--tsne-samples", "0"]) == 0
    assert (run / "report" / "index.html").is_file()


@pytest.mark.parametrize("overrides,message", [
    ({"data.loader": "dali", "augment.randaugment_ops": 2}, "RandAugment"),
    ({"data.loader": "dali", "method.mu_analytical": "false", "method.mu_sgd_passes": 2}, "mu_sgd_passes"),
    ({"method.class_term": "false", "method.mu_analytical": "false", "method.mu_sgd_passes": 2}, "class_term"),
    ({"method.num_clusters": 20}, "embed_dim"),              # K > D + 1 with the tiny embed_dim of 16
    ({"method.queue_size": 16}, "queue_size"),               # smaller than a batch
])
def test_impossible_combinations_are_refused_when_the_config_is_read(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", tiny_overrides(tmp_path, **overrides))
