"""Folders streamed from disk (fastmice.data.stream) and the DALI training loader (data.loader: dali):
the on-demand images equal the in-memory reader's, epochs cover every row once on any number of processes,
a resumed epoch reads exactly the rows not yet seen, and a run trains, evaluates and resumes end to end
(DALI in its CPU mode)."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_folder, tiny_overrides
from fastmice.config import load_config
from fastmice.data.folder import load_image_folder
from fastmice.data.sources import DataError, DataSourceConfig, load_dataset
from fastmice.data.stream import FileImages, stream_folder, stream_image_folder
from fastmice.views.batches import DaliBatches, DeviceBatches


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "imgs")


# ---- FileImages ------------------------------------------------------------------------------------------
def test_file_images_decode_like_the_in_memory_reader(tmp_path):
    root = make_folder(tmp_path / "mixed", size=[(20, 20), (30, 24), (17, 40)])
    mem = load_image_folder(root, image_size=16, progress=False)
    lazy = stream_image_folder(root, image_size=16, progress=False)
    assert isinstance(lazy.images, FileImages) and lazy.images.shape == mem.images.shape
    assert lazy.paths == mem.paths and torch.equal(lazy.labels, mem.labels)
    assert lazy.class_names == mem.class_names
    assert torch.equal(lazy.images[5:17], mem.images[5:17])
    idx = torch.tensor([70, 0, 33, 33, -1])
    assert torch.equal(lazy.images[idx], mem.images[idx])
    sub = lazy.subset(torch.tensor([3, 40, 8]))
    assert isinstance(sub.images, FileImages) and sub.paths == [mem.paths[i] for i in (3, 40, 8)]
    assert torch.equal(sub.images[:], mem.images[[3, 40, 8]])
    with pytest.raises(IndexError, match="out of range"):
        lazy.images[torch.tensor([72])]
    assert torch.equal(lazy.images[7], mem.images[7]) and lazy.images[np.int64(7)].shape == (3, 16, 16)
    with pytest.raises(DataError, match="30x24 but .*sets the size.*data.image_size"):
        stream_image_folder(root, progress=False)   # native sizes differ: like load_image_folder, refused


def test_streamed_folder_skips_corrupt_files_and_needs_a_square_size(tmp_path, folder):
    (folder / "class1" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = stream_image_folder(folder, progress=False)
    assert len(ds) == 72 and ds.skipped[0][0].endswith("broken.jpg") and ds.images.size == 20
    with pytest.raises(DataError, match="broken.jpg"):
        stream_image_folder(folder, on_corrupt="error", progress=False)
    wide = make_folder(tmp_path / "wide", classes=1, size=(30, 20))
    with pytest.raises(DataError, match="30x20.*data.image_size"):
        stream_image_folder(wide, progress=False)
    assert stream_image_folder(wide, image_size=12, progress=False).images[0:2].shape == (2, 3, 12, 12)


def test_a_corrupt_body_names_the_file(tmp_path, folder):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "class0" / "000.jpg", quality=95)
    good = (folder / "class0" / "000.jpg").read_bytes()
    (folder / "class0" / "000.jpg").write_bytes(good[:len(good) // 2])   # the header survives, the rest is cut
    ds = stream_image_folder(folder, image_size=20, progress=False)
    assert not ds.skipped
    with pytest.raises(DataError, match="000.jpg"):
        ds.images[0:4]


def test_auto_streams_a_folder_only_above_the_memory_limit(folder):
    cfg = DataSourceConfig(source="folder", root=str(folder), loader="auto")
    assert not stream_folder(cfg)                       # 72 x 3 x 20 x 20 bytes
    cfg.memory_limit_gb = 72 * 3 * 20 * 20 / 1e9 * 0.99
    assert stream_folder(cfg) and isinstance(load_dataset(cfg, progress=False).images, FileImages)
    cfg.loader = "memory"
    assert isinstance(load_dataset(cfg, progress=False).images, torch.Tensor)
    cfg.loader, cfg.memory_limit_gb = "dali", 16.0
    assert stream_folder(cfg)
    assert not stream_folder(DataSourceConfig(source="digits", loader="dali"))   # in memory already
    with pytest.raises(DataError, match="data.loader"):
        DataSourceConfig(source="digits", loader="disk").validate()
    with pytest.raises(DataError, match="memory_limit_gb"):
        DataSourceConfig(source="digits", memory_limit_gb=0).validate()


# ---- DaliBatches: the order of the rows, without DALI -------------------------------------------------------
class RecordingLoader:
    """Stands in for a DALI loader: one 'view' per step holding this shard's rows of the global batch."""

    def __init__(self, rows, seed, rank, world, per_rank):
        self.rows, self.seed = rows, seed
        n = rows.numel()
        self.mine = rows[n * rank // world:n * (rank + 1) // world]
        self.per_rank = per_rank

    def __iter__(self):
        for i in range(self.mine.numel() // self.per_rank):
            yield type("Batch", (), {"views": [self.mine[i * self.per_rank:(i + 1) * self.per_rank]]})

    def close(self):
        pass


def batches_for(n, batch, rank=0, world=1, seed=3):
    made = []

    def make(rows, s):
        made.append((rows.clone(), s))
        return RecordingLoader(rows, s, rank, world, batch // world)
    return DaliBatches(n, batch, seed, make, world=world), made


def run_epoch(b, steps=None):
    seen = []
    while not b.epoch_done and (steps is None or len(seen) < steps):
        seen.append(b.next_views()[0])
        b.advance()
    return torch.cat(seen) if seen else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dali_epochs_cover_each_row_once_on_any_number_of_processes(world):
    n, batch = 103, 16
    ranks = [batches_for(n, batch, r, world)[0] for r in range(world)]
    for epoch in range(2):
        seen = []
        for b in ranks:
            b.start_epoch()
            seen.append(run_epoch(b))
        allrows = torch.cat(seen)
        assert allrows.numel() == (n // batch) * batch and allrows.unique().numel() == allrows.numel()
        assert ranks[0].steps_per_epoch == n // batch
        assert all(s.numel() == (n // batch) * (batch // world) for s in seen)
        if epoch == 0:
            first = set(allrows.tolist())
    assert set(allrows.tolist()) != first or n % batch == 0   # each epoch drops a different tail


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 4), (4, 4)])
def test_dali_resume_reads_exactly_the_rows_not_yet_seen(before, after):
    """Step k of all processes together reads rows[k*B:(k+1)*B], so a checkpoint at any step resumes on any
    number of processes with exactly the rest of the epoch."""
    n, batch = 100, 8
    first = [batches_for(n, batch, r, before) for r in range(before)]
    for b, _ in first:
        b.start_epoch()
        run_epoch(b)
        b.start_epoch()
    heads = [run_epoch(b, steps=5) for b, _ in first]
    rows = first[0][0].epoch_rows(1)
    for k in range(5):                        # each step's global batch is the next B rows of the permutation
        step = torch.cat([h[k * batch // before:(k + 1) * batch // before] for h in heads])
        assert torch.equal(step.sort().values, rows[k * batch:(k + 1) * batch].sort().values)
    state = first[0][0].state_dict()
    rest = []
    for r in range(after):
        c, made = batches_for(n, batch, r, after)
        c.load_state_dict(state)
        assert (c.epoch, c.pos) == (1, 5) and not c.epoch_done
        rest.append(run_epoch(c))
    seen = torch.cat(heads + rest)
    assert torch.equal(seen.sort().values, rows.sort().values)
    assert made[0][1] != first[0][1][1][1]     # the rest of the epoch draws fresh augmentations


def test_loader_kinds_read_each_others_state(digits_small):
    gen = torch.Generator().manual_seed(0)
    mem = DeviceBatches(digits_small.images, 32, gen)
    mem.start_epoch()
    mem.advance()
    dali, _ = batches_for(len(digits_small), 32)
    dali.load_state_dict(mem.state_dict())
    assert dali.started and dali.pos == 1
    mem2 = DeviceBatches(digits_small.images, 32, torch.Generator().manual_seed(0))
    mem2.load_state_dict(dali.state_dict())
    assert mem2.started and mem2.pos == 1 and mem2.perm.numel() == len(digits_small)


# ---- the trainer with DALI (CPU pipelines) ------------------------------------------------------------------
dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


def dali_cfg(tmp_path, folder, name, **extra):
    o = {"data.source": "folder", "data.root": str(folder), "data.loader": "dali", "data.image_size": 16,
         "method.num_clusters": 3, "train.run_name": name, "data.num_workers": 2, **extra}
    return load_config("digits", tiny_overrides(tmp_path, **o))


def test_dali_views_have_the_torch_path_format(tmp_path, folder):
    from fastmice.engine.trainer import Trainer
    t = Trainer(dali_cfg(tmp_path, folder, "fmt"), tmp_path / "fmt")
    mem = Trainer(dali_cfg(tmp_path, folder, "mem", **{"data.loader": "memory"}), tmp_path / "mem")
    assert t.loader == "dali" and isinstance(t.dataset.images, FileImages)
    assert mem.loader == "memory" and isinstance(mem.feed.batches, DeviceBatches)
    t.feed.start_epoch()
    views, _ = t.feed.next_views()
    ref = mem.feed.views(mem.dataset.images[:32])
    assert len(views) == len(ref) == 3
    for v, r in zip(views, ref):
        assert v.shape == r.shape and v.dtype == r.dtype and v.device == r.device
        assert v.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(memory_format=torch.channels_last)
        assert abs(float(v.mean()) - float(r.mean())) < 0.5 and 0.5 < float(v.std()) < 2.0   # normalised
    t.feed.close()


def test_dali_run_trains_evaluates_and_resumes(tmp_path, folder):
    from fastmice.eval.evaluate import evaluate_model
    from fastmice.engine.trainer import Trainer
    cfg = dali_cfg(tmp_path, folder, "run", **{"train.max_steps": 3})
    t = Trainer(cfg, tmp_path / "run")
    assert t.feed.steps_per_epoch == 72 // 32
    s = t.fit()
    assert s["status"] == "max_steps" and (t.epoch, t.global_step, t.feed.pos) == (1, 3, 1)
    r = Trainer.resume(tmp_path / "run", {"train": {"max_steps": None}, "optim": {"epochs": 3}})
    assert (r.epoch, r.global_step, r.feed.pos, r.loader) == (1, 3, 1, "dali")
    s = r.fit()
    assert s["status"] == "finished" and r.global_step == 6 and np.isfinite(s["loss"])
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in steps if e["type"] == "epoch"] == [1, 2, 3]
    result = evaluate_model(r.method, r.dataset, r.cfg, r.device, r.run_dir, r.crop_size)
    post = result["readouts"]["posterior"]
    assert sum(post["cluster_sizes"]) == 72 and 0.0 <= post["acc"] <= 1.0
    assert "pixel_kmeans" not in result


def test_dali_loader_refusals(tmp_path, folder, monkeypatch):
    from fastmice.engine.trainer import Trainer
    with pytest.raises(ValueError, match="RandAugment"):
        Trainer(dali_cfg(tmp_path, folder, "ra", **{"augment.randaugment_ops": 2}), tmp_path / "ra")
    monkeypatch.setattr("fastmice.engine.data.dali_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install nvidia-dali"):
        Trainer(dali_cfg(tmp_path, folder, "nodali"), tmp_path / "nodali")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(dali_cfg(tmp_path, folder, "m", **{"data.loader": "memory"}), tmp_path / "m").loader == "memory"


def test_dali_loader_on_an_in_memory_source(tmp_path, digits_small):
    from fastmice.engine.trainer import Trainer
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"data.loader": "dali", "train.run_name": "dm",
                                                             "train.max_steps": 4}))
    t = Trainer(cfg, tmp_path / "dm", digits_small)
    assert t.loader == "dali" and isinstance(t.dataset.images, torch.Tensor)
    assert t.fit()["global_step"] == 4


def test_dali_shards_split_the_global_batch(tmp_path, folder, monkeypatch):
    """Two processes' DALI loaders (real ones, CPU mode): each reads its half of every global batch."""
    from fastmice.core import distributed
    from fastmice.engine.trainer import Trainer
    t = Trainer(dali_cfg(tmp_path, folder, "sh"), tmp_path / "sh")
    monkeypatch.setattr(distributed, "world", lambda: 2)
    rank_of = {p: i for i, p in enumerate(t.dataset.paths)}
    steps = {0: [], 1: []}

    def recording(rank):
        def make(rows, seed):   # the trainer's loader, noting the dataset rows of each batch it yields
            loader = t.feed.batches.make_loader(rows, seed)
            assert loader.batch_size == 16

            class Recorder:
                def __iter__(self):
                    for batch in loader:
                        steps[rank].append(sorted(rank_of[loader.files[i]] for i in batch.index.tolist()))
                        yield batch

                def close(self):
                    loader.close()
            return Recorder()
        return make

    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        b = DaliBatches(len(t.dataset), 32, 5, recording(rank), world=2)
        b.start_epoch()
        run_epoch(b)
    rows = b.epoch_rows(0).tolist()
    assert len(steps[0]) == len(steps[1]) == 2
    for k in range(2):   # global step k: rank 0's and rank 1's images together are rows[32k:32(k+1)]
        assert sorted(steps[0][k] + steps[1][k]) == sorted(rows[32 * k:32 * (k + 1)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_loader_on_the_gpu(tmp_path, folder):
    """On CUDA: nvJPEG decoding, views in the fast step's format (bf16, channels_last, on the GPU), a short fit."""
    from fastmice.engine.trainer import Trainer
    t = Trainer(dali_cfg(tmp_path, folder, "gpu", **{"train.device": "cuda", "train.max_steps": 3}), tmp_path / "gpu")
    t.feed.start_epoch()
    views, _ = t.feed.next_views()
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.is_contiguous(memory_format=torch.channels_last)
               for v in views)
    t.feed.close()
    t.feed.start_epoch()
    assert t.fit()["global_step"] == 3


def test_data_check_describes_a_streamed_folder(folder):
    from fastmice.data.prepare import channel_stats, describe_dataset
    lazy = stream_image_folder(folder, progress=False)
    text = describe_dataset(lazy)
    assert "72  (3 x 20 x 20 uint8" in text and "streams it with DALI" in text
    mem = load_image_folder(folder, progress=False)
    assert np.allclose(channel_stats(lazy), channel_stats(mem))


def test_dali_device_id(monkeypatch):
    from fastmice.views.dali import dali_device_id
    assert dali_device_id(torch.device("cpu")) is None
    assert dali_device_id(torch.device("cuda", 2)) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dali_device_id(torch.device("cuda")) == 3     # "cuda" alone: the current GPU, not a CPU pipeline


def test_memory_loader_refuses_a_streamed_dataset(tmp_path, folder):
    from fastmice.engine.trainer import Trainer
    cfg = dali_cfg(tmp_path, folder, "ms", **{"data.loader": "memory"})
    with pytest.raises(ValueError, match="data.loader=memory.*FileImages"):
        Trainer(cfg, tmp_path / "ms", stream_image_folder(folder, image_size=16, progress=False))


def test_switching_loader_on_resume_keeps_the_epoch(tmp_path, folder):
    """A run started with data.loader=memory resumes with dali (and back): steps and epochs go on."""
    from fastmice.engine.trainer import Trainer
    t = Trainer(dali_cfg(tmp_path, folder, "sw", **{"data.loader": "memory", "train.max_steps": 3}), tmp_path / "sw")
    t.fit()                                            # 2 steps an epoch: stops at epoch 1, pos 1
    r = Trainer.resume(tmp_path / "sw", {"data": {"loader": "dali"}, "train": {"max_steps": 5}, "optim": {"epochs": 3}})
    assert r.loader == "dali" and (r.epoch, r.global_step, r.feed.pos, r.feed.batches.epoch) == (1, 3, 1, 1)
    assert r.fit()["global_step"] == 5 and r.feed.batches.epoch == r.epoch == 2
    back = Trainer.resume(tmp_path / "sw", {"data": {"loader": "memory"}, "train": {"max_steps": 6}})
    assert back.loader == "memory" and back.fit()["global_step"] == 6


def test_a_file_dali_cannot_decode_is_named(tmp_path, folder):
    """A file damaged after the folder was listed (during a long run): training stops with an error that names
    it, instead of DALI's, which names only the operator."""
    from fastmice.engine.trainer import Trainer
    t = Trainer(dali_cfg(tmp_path, folder, "bad", **{"optim.batch_size": 8}), tmp_path / "bad")
    (folder / "class2" / "007.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(DataError, match=r"DALI could not read a batch.*class2/007\.jpg.*then resume"):
        t.fit()

