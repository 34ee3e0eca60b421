"""nonfinite_tensors, read_checkpoint and load_model_state on hand-made states and files."""
from __future__ import annotations

import copy
import math
import traceback
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from fastmice.core.checkpoint import CheckpointError, nonfinite_message, nonfinite_tensors
from fastmice.core.checkpoint import load_checkpoint as read_checkpoint
from fastmice.core.state_match import CheckpointMismatch, explain_state_mismatch, load_model_state


# ---- nonfinite_tensors ------------------------------------------------------------------------------------

def trainer_like_state(device: str = "cpu") -> dict:
    """The shape of Trainer.state_dict(): model, optimizer (Adam-like), counters, RNG states, config."""
    d = torch.device(device)
    return {
        "config": {"name": "x", "optim": {"lr": 0.03}},
        "model": OrderedDict([("mu", torch.zeros(3, 4, device=d)), ("queue", torch.ones(3, 8, 4, device=d)),
                              ("queue_ptr", torch.tensor(5, device=d)), ("bn.num_batches_tracked", torch.tensor(2)),
                              ("half", torch.zeros(2, dtype=torch.float16, device=d))]),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3, 4, device=d)},
                                1: {"momentum_buffer": torch.zeros(5, device=d)}},
                      "param_groups": [{"lr": 0.1, "weight_decay": 5e-4, "params": [0, 1]}]},
        "epoch": 1, "global_step": 28,
        "batches": {"perm": torch.randperm(10), "pos": 3, "generator": torch.Generator().get_state()},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, (1, 2), None)},
        "flags": [True, torch.zeros(2, dtype=torch.bool)],
        "time": 1.7e9,
    }


def test_finite_state_has_no_names():
    assert nonfinite_tensors(trainer_like_state()) == []


def test_every_kind_of_nonfinite_leaf_is_named_in_walk_order():
    state = trainer_like_state()
    state["model"]["mu"][1, 2] = float("nan")
    state["model"]["half"][0] = float("inf")                       # fp16 overflow
    state["optimizer"]["state"][0]["exp_avg"][0, 0] = -float("inf")
    state["optimizer"]["param_groups"][0]["lr"] = float("nan")     # a Python float
    state["extra"] = [{"arr": np.array([1.0, np.nan])}, (torch.tensor([1.0, 2.0]), torch.tensor([math.inf]))]
    state["complex"] = torch.tensor([1 + 1j, complex(float("nan"), 0)])
    assert nonfinite_tensors(state) == ["model.mu", "model.half", "optimizer.state.0.exp_avg",
                                        "optimizer.param_groups.0.lr", "extra.0.arr", "extra.1.1", "complex"]


def test_empty_sparse_and_meta_tensors():
    state = {"empty": torch.zeros(0), "meta": torch.empty(3, device="meta"),
             "sparse": torch.sparse_coo_tensor([[0, 2]], [1.0, float("nan")], (4,),
                                               check_invariants=True)}
    assert nonfinite_tensors(state) == ["sparse"]
    assert nonfinite_tensors(torch.tensor([float("nan")])) == [""]   # a bare tensor: the empty name


def test_a_finite_tensor_whose_sum_overflows_is_not_reported():
    state = {"big": torch.tensor([3e38, 3e38]), "half": torch.full((10,), 60000.0, dtype=torch.float16),
             "bf16": torch.full((4,), 3e38, dtype=torch.bfloat16), "c": torch.tensor([3e38 + 3e38j] * 2),
             "bad_half": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}
    assert nonfinite_tensors(state) == ["bad_half"]


@pytest.mark.parametrize("with_nan,reads", [(False, 1), (True, 2)])
def test_one_host_read_for_the_whole_state(monkeypatch, with_nan, reads):
    """All per-tensor flags are read back with a single tolist() (per device), plus one for the exact check of
    the suspects when there are any; no item() or bool() per tensor."""
    state = trainer_like_state()
    state["many"] = [torch.randn(4) for _ in range(200)]
    if with_nan:
        state["many"][150][2] = float("nan")
    calls = {"tolist": 0, "item": 0, "bool": 0}
    real_tolist, real_item, real_bool = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__

    def counted(name, real):
        def f(self, *a, **kw):
            calls[name] += 1
            return real(self, *a, **kw)
        return f
    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counted("bool", real_bool))
    assert nonfinite_tensors(state) == (["many.150"] if with_nan else [])
    assert calls == {"tolist": reads, "item": 0, "bool": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu_one_sync(monkeypatch):
    state = trainer_like_state("cuda")
    state["model"]["queue"][0, 0, 0] = float("nan")
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.device) or real(self))
    assert nonfinite_tensors(state) == ["model.queue"]
    assert sorted(d.type for d in calls) == ["cpu", "cuda", "cuda"]    # one per device, one for the suspect


def test_nonfinite_message_says_whether_a_checkpoint_is_kept(tmp_path):
    names = [f"model.t{i}" for i in range(7)]
    with_ckpt = nonfinite_message(names, tmp_path, 56, has_checkpoint=True)
    assert "step 56" in with_ckpt and "model.t0, model.t1" in with_ckpt and "and 2 more" in with_ckpt
    assert f"fastmice train --resume {tmp_path}" in with_ckpt and "not saved" in with_ckpt
    without = nonfinite_message(names[:1], tmp_path, 3, has_checkpoint=False)
    assert "no checkpoint was written yet" in without and "last good" not in without


# ---- read_checkpoint --------------------------------------------------------------------------------------

def good_checkpoint(path):
    torch.save({"config": {"name": "x"}, "model": {"w": torch.arange(1000.0)}, "epoch": 2}, path)


def assert_single_error(exc_info, path):
    err = exc_info.value
    assert str(path) in str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)   # from None
    text = "".join(traceback.format_exception(err))
    assert "During handling" not in text and "direct cause" not in text
    assert text.count("Traceback") == 1


def test_reads_a_good_checkpoint_by_file_or_folder(tmp_path):
    good_checkpoint(tmp_path / "checkpoint.pt")
    for where in (tmp_path, tmp_path / "checkpoint.pt"):
        state = read_checkpoint(where)
        assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.arange(1000.0))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        read_checkpoint(tmp_path)


def test_truncated_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        read_checkpoint(tmp_path)
    assert_single_error(info, path)
    assert "restore it from a copy" in str(info.value) and "without --resume" in str(info.value)
    assert info.value.cause is not None and info.value.path == path


def test_random_bytes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="not a PyTorch file, or corrupt") as info:
        read_checkpoint(path)
    assert_single_error(info, path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)") as info:
        read_checkpoint(path)
    assert_single_error(info, path)
    assert info.value.cause is None


@pytest.mark.parametrize("obj,expected", [
    (torch.zeros(3), "a bare tensor of shape (3,)"),
    ({"w": torch.zeros(2), "b": torch.zeros(1)}, "a bare state_dict of 2 tensors"),
    ({"model": {}, "epoch": 1}, "a dict with the keys 'model', 'epoch'"),
    ([1, 2], "a builtins.list"),
])
def test_foreign_torch_files(tmp_path, obj, expected):
    path = tmp_path / "checkpoint.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert f"{path} is not a fastmice checkpoint" in msg and expected in msg and "config, model" in msg
    assert_single_error(info, path)


# ---- load_model_state -------------------------------------------------------------------------------------

class TinyMiCE(nn.Module):
    """The tensors of MiCE that carry K, D and V: mu (K, D), queue (K, V, D), experts (K*D, F)."""

    def __init__(self, k=10, d=128, v=32, features=16):
        super().__init__()
        self.backbone = nn.Linear(3, features)
        self.experts = nn.Linear(features, k * d)
        self.mu = nn.Parameter(torch.randn(k, d))
        self.register_buffer("queue", torch.randn(k, v, d))


class TinyMoCo(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 16)
        self.head = nn.Linear(16, 128)


def cfg(k=10, d=128, v=32, method="mice", tau=1.0):
    return {"method": {"name": method, "num_clusters": k, "embed_dim": d, "queue_size": v, "tau": tau},
            "backbone": {"arch": "resnet34"}}


def test_matching_state_is_loaded_exactly():
    torch.manual_seed(0)
    src, dst = TinyMiCE(), TinyMiCE()
    load_model_state(dst, src.state_dict(), cfg(), cfg(tau=0.5))      # tau does not shape the model
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k


def test_different_k_names_the_setting_and_leaves_the_model_untouched():
    saved = TinyMiCE(k=10).state_dict()
    model = TinyMiCE(k=5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointMismatch) as info:
        load_model_state(model, saved, cfg(k=10), cfg(k=5), where="runs/a/checkpoint.pt")
    msg = str(info.value)
    assert msg.startswith("runs/a/checkpoint.pt does not fit the model of this config: ")
    assert "the checkpoint has K=10 clusters (mu: (10, 128)) but the config asks for 5 (method.num_clusters)" in msg
    assert "resume keeps the run's model settings: drop --method.num_clusters from the command" in msg
    assert "size mismatch" not in msg and len(msg) < 600
    assert info.value.settings == [("method.num_clusters", 10, 5)]
    assert {s[0] for s in info.value.shapes} == {"mu", "queue", "experts.weight", "experts.bias"}
    assert info.value.__cause__ is None
    for k, v in model.state_dict().items():                           # backbone.* match: torch would copy them
        assert torch.equal(v, before[k]), k


def test_different_k_and_d_and_queue():
    saved = TinyMiCE(k=10, d=128, v=32).state_dict()
    with pytest.raises(CheckpointMismatch) as info:
        load_model_state(TinyMiCE(k=10, d=64, v=16), saved, cfg(), cfg(d=64, v=16))
    msg = str(info.value)
    assert "embeddings of D=128 (mu: (10, 128)) but the config asks for 64 (method.embed_dim)" in msg
    assert "a queue of V=32 keys (queue: (10, 32, 128)) but the config asks for 16 (method.queue_size)" in msg
    assert "drop --method.embed_dim and --method.queue_size" in msg


def test_without_the_new_config_the_dimension_is_read_from_the_shapes():
    mismatch = explain_state_mismatch(TinyMiCE(k=5).state_dict(), TinyMiCE(k=10).state_dict(), cfg(k=10))
    assert isinstance(mismatch, CheckpointMismatch)
    assert "the checkpoint has K=10 clusters (mu: (10, 128)) but the model asks for 5" in str(mismatch)
    assert explain_state_mismatch(TinyMiCE().state_dict(), TinyMiCE().state_dict(), cfg()) is None


def test_another_method():
    with pytest.raises(CheckpointMismatch) as info:
        load_model_state(TinyMiCE(), TinyMoCo().state_dict(), cfg(method="moco"), cfg(), purpose="load")
    msg = str(info.value)
    assert "the checkpoint is a moco model but the config builds mice" in msg
    assert "evaluated with its own model settings" in msg
    assert info.value.missing == ["mu", "queue", "experts.weight", "experts.bias"]
    assert info.value.unexpected == ["head.weight", "head.bias"]


def test_unexplained_mismatch_summarises_instead_of_listing_every_tensor():
    saved = {**TinyMiCE().state_dict(), "extra.weight": torch.zeros(2)}
    saved["backbone.weight"] = torch.zeros(16, 4)
    with pytest.raises(CheckpointMismatch) as info:
        load_model_state(TinyMiCE(), saved, None, None)
    msg = str(info.value)
    assert "1 tensor(s) differ in shape (e.g. backbone.weight: (16, 4) in the checkpoint, (16, 3) in the model)" in msg
    assert "1 in the checkpoint are not in the model (e.g. extra.weight)" in msg
    assert "different model" in msg


def test_init_from_advice_gives_the_runs_values():
    with pytest.raises(CheckpointMismatch) as info:
        load_model_state(TinyMiCE(k=5), TinyMiCE(k=10).state_dict(), cfg(k=10), cfg(k=5),
                         where="init_from runs/pre", purpose="init_from")
    msg = str(info.value)
    assert "(--method.num_clusters=10)" in msg and "--train.init_scope=backbone" in msg
