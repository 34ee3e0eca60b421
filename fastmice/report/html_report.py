"""`fastmice report`: a static HTML page (RUN/report/index.html) showing what a run learned.

Training curves from metrics.jsonl, the cluster sizes, the confusion matrix (with labels), the evaluation
metrics (with labels) or size/confidence statistics (without), and for every cluster its most and least
confident images. The clusters are those of the evaluation (its primary readout, RUN/assignments.csv), so
the page agrees with eval.json for every method. Plain HTML with relative image paths: it opens from
file:// and can be zipped and shared.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmice.data.sources import ImageDataset, load_dataset
from fastmice.eval.plots import new_figure, save_figure, plot_cluster_sizes, plot_confusion
from fastmice.eval.run import LoadedRun, load_run

SHOW = 16          # images per grid (most confident / least confident) and cluster
COLS = 8           # grid columns
_MIN_THUMB = 48    # tiny images are enlarged (nearest neighbour) to at least this many pixels
_PAD = 2           # border around each thumbnail; red when its label is not the cluster's majority class
_EMPTY, _WHITE, _RED = (235, 235, 235), (255, 255, 255), (220, 30, 30)


# ---- training curves ----------------------------------------------------------------------------------
def read_epochs(metrics_path: Path, kind: str = "epoch") -> list[dict[str, Any]]:
    """Records of one type ("epoch", or "eval" from eval.probe_every) of metrics.jsonl, one per epoch
    (the last one wins after a resume), in epoch order."""
    if not metrics_path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and rec.get("type") == kind and "epoch" in rec:
            by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _figure(width: float, height: float):
    fig = new_figure(width, height)
    fig.set_layout_engine("constrained")  # keeps colour bars and labels of side-by-side panels apart
    return fig


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # a single epoch: one tick, 1


def plot_training(epochs: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> Path:
    """Loss and learning rate per epoch, side by side; and the linear probe's accuracy when training probed it
    (ACC/NMI/ARI per readout are fastmice.report.figures.plot_metric_curves)."""
    x = [r["epoch"] for r in epochs]
    probes = [r for r in evals if isinstance(r.get("linear_probe"), dict)]
    panels = 3 if probes else 2
    fig = _figure(5 * panels, 3.2)
    marker = "o" if len(x) <= 30 else None
    for i, key in enumerate(("loss", "lr")):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.plot(x, [r.get(key, np.nan) for r in epochs], marker=marker, markersize=3)
        ax.set_title("loss" if key == "loss" else "learning rate")
    if probes:
        ax = fig.add_subplot(1, panels, 3)
        ax.plot([r["epoch"] for r in probes], [100 * r["linear_probe"]["accuracy"] for r in probes],
                marker="o" if len(probes) <= 30 else None, markersize=3)
        ax.set_title("linear probe accuracy % (eval.probe_every)")
    for ax in fig.axes:
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_size_evolution(epochs: list[dict[str, Any]], path: Path) -> Path | None:
    """Cluster shares per epoch as a heatmap (clusters sorted by final size; readable for K=100 too)
    and the largest / median / smallest share against the uniform one."""
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in epochs if r.get("cluster_sizes")]
    if not rows:
        return None
    sizes = np.array([r["cluster_sizes"] for r in rows], dtype=np.float64)   # (E, K)
    share = sizes / np.maximum(sizes.sum(1, keepdims=True), 1)
    order = np.argsort(-share[-1], kind="stable")
    x = [r["epoch"] for r in rows]
    k = share.shape[1]
    fig = _figure(10, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(share[:, order].T, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(x[0] - 0.5, x[-1] + 0.5, k - 0.5, -0.5))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of images")
    _epoch_axis(ax)
    ax.set_ylabel("cluster rank (largest at the end first)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("cluster shares during training")
    ax = fig.add_subplot(1, 2, 2)
    for q, name in ((100, "largest"), (50, "median"), (0, "smallest")):
        ax.plot(x, np.percentile(share, q, axis=1), label=name)
    ax.axhline(1 / k, color="tab:red", linestyle="--", linewidth=1, label="uniform")
    _epoch_axis(ax)
    ax.set_title("cluster share (training views)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


# ---- image grids --------------------------------------------------------------------------------------
def thumb_grid(images: np.ndarray, borders: list[tuple[int, int, int]], cols: int = COLS,
               rows: int = SHOW // COLS) -> np.ndarray:
    """uint8 (n, 3, s, s) -> one (H, W, 3) picture: a rows x cols grid, nearest-neighbour enlarged."""
    s = images.shape[-1]
    scale = max(1, -(-_MIN_THUMB // s))
    cell = s * scale + 2 * _PAD
    canvas = np.full((rows * cell, cols * cell, 3), _EMPTY, dtype=np.uint8)
    for i, (img, colour) in enumerate(zip(images[:rows * cols], borders)):
        y, x = divmod(i, cols)
        y, x = y * cell, x * cell
        canvas[y:y + cell, x:x + cell] = colour
        big = img.transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[y + _PAD:y + cell - _PAD, x + _PAD:x + cell - _PAD] = big
    return canvas


def cluster_sheet(images: torch.Tensor, members: np.ndarray, score: np.ndarray,
                  wrong: np.ndarray | None, show: int = SHOW) -> np.ndarray:
    """The `show` members of highest score (left grid, highest first) | the `show` of lowest score (right
    grid, lowest first). `score` (e.g. confidence) and `wrong` (label is not the majority class) are per member."""
    order = np.argsort(-score, kind="stable")
    grids = []
    for pick in (order[:show], order[::-1][:show]):
        # Index only the shown images: a cluster of a big dataset can hold gigabytes of pixels.
        shown = images[torch.from_numpy(members[pick])].numpy()
        borders = [_RED if wrong is not None and wrong[i] else _WHITE for i in pick]
        grids.append(thumb_grid(shown, borders, rows=-(-show // COLS)))
    gap = np.full((grids[0].shape[0], 16, 3), 255, dtype=np.uint8)
    gap[:, 7:9] = 120  # a grey rule between the two grids
    return np.concatenate([grids[0], gap, grids[1]], axis=1)


def write_cluster_sheets(dataset: ImageDataset, clusters: np.ndarray, score: np.ndarray, k: int,
                         out_dir: Path) -> list[dict[str, Any]]:
    """One PNG per non-empty cluster under out_dir/clusters/; returns a summary row per cluster."""
    from PIL import Image

    folder = out_dir / "clusters"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("cluster_*.png"):  # K may have changed since an earlier report
        old.unlink()
    labels = dataset.labels.numpy() if dataset.labels is not None else None
    names = dataset.class_names
    rows = []
    for c in range(k):
        members = np.flatnonzero(clusters == c)
        row: dict[str, Any] = {"cluster": c, "size": int(members.size), "image": None}
        rows.append(row)
        if members.size == 0:
            continue
        row["mean_score"] = float(score[members].mean())
        wrong = None
        if labels is not None:
            counts = np.bincount(labels[members])
            majority = int(counts.argmax())
            wrong = labels[members] != majority
            row.update(majority=names[majority] if names else str(majority),
                       purity=float(counts[majority] / members.size))
        row["image"] = f"clusters/cluster_{c:03d}.png"
        Image.fromarray(cluster_sheet(dataset.images, members, score[members], wrong)).save(out_dir / row["image"])
    return rows


# ---- clusters, scores and statistics ------------------------------------------------------------------
def summary_stats(clusters: np.ndarray, score: np.ndarray, k: int, score_name: str) -> dict[str, float]:
    """Label-free health of a clustering: balance of the sizes and how sure the assignments are."""
    sizes = np.bincount(clusters, minlength=k)
    p = sizes[sizes > 0] / sizes.sum()
    return {"images": int(sizes.sum()), "clusters": k, "non-empty clusters": int((sizes > 0).sum()),
            "smallest cluster": int(sizes.min()), "largest cluster": int(sizes.max()),
            # exp(entropy) / K: 1 when all clusters are equally large, 1/K when one holds everything
            "size balance (perplexity / K)": float(np.exp(-(p * np.log(p)).sum()) / k),
            f"{score_name} mean": float(score.mean()), f"{score_name} median": float(np.median(score)),
            f"{score_name} 10th percentile": float(np.percentile(score, 10)),
            f"{score_name} 90th percentile": float(np.percentile(score, 90)),
            f"share with {score_name} > 0.5": float((score > 0.5).mean())}


def read_assignments(run_dir: Path, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(cluster, confidence) per image from RUN/assignments.csv; None if missing or not of this dataset."""
    path = run_dir / "assignments.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(dataset) or (dataset.paths and [r["path"] for r in rows] != dataset.paths):
        return None
    return (np.array([int(r["cluster"]) for r in rows], dtype=np.int64),
            np.array([float(r["confidence"]) for r in rows], dtype=np.float64))


def ensure_eval(run: LoadedRun, dataset: ImageDataset) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """eval.json and the assignments, evaluating first when they are missing, older than the checkpoint
    or of other images."""
    from fastmice.core.checkpoint import CHECKPOINT_NAME
    from fastmice.eval.evaluate import evaluate_model

    path, ckpt = run.run_dir / "eval.json", run.run_dir / CHECKPOINT_NAME
    fresh = path.is_file() and (not ckpt.is_file() or path.stat().st_mtime >= ckpt.stat().st_mtime)
    assigned = read_assignments(run.run_dir, dataset) if fresh else None
    if assigned is not None:
        return json.loads(path.read_text()), *assigned
    result = evaluate_model(run.model, dataset, run.cfg, run.device, run.run_dir, run.crop_size, run.autocast,
                            run.channels_last)
    assigned = read_assignments(run.run_dir, dataset)
    if assigned is None:  # e.g. a non-main process of a distributed job, which does not evaluate
        raise RuntimeError(f"evaluation wrote no assignments.csv for this dataset in {run.run_dir}")
    return result, *assigned


def centre_similarity(run: LoadedRun, dataset: ImageDataset, clusters: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity of each embedding to its cluster's mean direction: the ranking score for methods
    whose clusters are hard k-means assignments (no probabilities)."""
    emb = torch.nn.functional.normalize(run.infer(dataset.images)["embedding"].float().cpu(), dim=1)
    idx = torch.from_numpy(clusters)
    centres = torch.zeros(k, emb.shape[1]).index_add_(0, idx, emb)
    return (emb * torch.nn.functional.normalize(centres, dim=1)[idx]).sum(1).numpy()


# ---- HTML ---------------------------------------------------------------------------------------------
_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}img.sheet{image-rendering:pixelated}
.note{color:#666;font-size:0.9em}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th{' class=l' if i == 0 else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{_e(_fmt(v))}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_html(result: dict[str, Any]) -> str:
    """ACC/NMI/ARI per readout (in %) when labels exist; per-readout cluster usage otherwise."""
    readouts = result.get("readouts", {})
    if readouts and "acc" in next(iter(readouts.values())):
        probe = result.get("linear_probe")
        probe = f"<p>linear probe accuracy: {100 * probe['accuracy']:.2f} %</p>" if probe else ""
        keys = [k for k in ("acc", "nmi", "ari", "acc_many_to_one") if k in next(iter(readouts.values()))]
        rows = [[name] + [f"{100 * e[k]:.2f}" for k in keys] for name, e in readouts.items()]
        if "pixel_kmeans" in result:
            base = result["pixel_kmeans"]
            rows.append(["k-means on raw pixels"] + [f"{100 * base[k]:.2f}" if k in base else "-" for k in keys])
        names = {"acc": "ACC %", "nmi": "NMI %", "ari": "ARI %", "acc_many_to_one": "many-to-one ACC %"}
        return _table(["readout"] + [names[k] for k in keys], rows) + probe
    rows = []
    for name, e in readouts.items():
        s = np.asarray(e["cluster_sizes"])
        rows.append([name, int((s > 0).sum()), int(s.max()), f"{100 * s.max() / max(s.sum(), 1):.1f}"])
    return ("<p class=note>No labels: cluster usage per readout instead of accuracy.</p>"
            + _table(["readout", "non-empty clusters", "largest cluster", "largest %"], rows))


def _clusters_html(rows: list[dict[str, Any]], labelled: bool, score_name: str) -> str:
    head = ["cluster", "images", f"mean {score_name}"] + (["majority class", "purity"] if labelled else [])
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
           + f"<th class=l>the {SHOW} of highest {_e(score_name)} (left, highest first) | the {SHOW} of lowest "
             f"(right, lowest first){'; red border: not the majority class' if labelled else ''}</th></tr>"]
    for r in rows:
        cells = [r["cluster"], r["size"], _fmt(r["mean_score"]) if r["size"] else "-"]
        if labelled:
            cells += [r.get("majority", "-"), f"{100 * r['purity']:.1f}%" if r["size"] else "-"]
        img = (f"<img class=sheet src=\"{_e(r['image'])}\" alt=\"cluster {r['cluster']}\">" if r["image"]
               else "empty")
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + f"<td class=l>{img}</td></tr>")
    return "".join(out) + "</table>"


def _img(src: str | None, alt: str) -> str:
    return f"<p><img src=\"{_e(src)}\" alt=\"{_e(alt)}\"></p>" if src else ""


def write_html(path: Path, run: LoadedRun, dataset: ImageDataset, result: dict[str, Any], score_name: str,
               stats: dict[str, Any], pictures: dict[str, str | None], rows: list[dict[str, Any]]) -> Path:
    labelled = dataset.labels is not None
    primary = result.get("primary", "posterior")
    title = f"fastmice report: {run.cfg.name} ({run.run_dir.name})"
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
             f"<p class=note>run folder {_e(run.run_dir.resolve())}; checkpoint at epoch {run.epoch}, step "
             f"{run.global_step}; data {_e(dataset.name)}: {len(dataset)} images of {run.image_size}px"
             f"{', labelled' if labelled else ', no labels'}; method {_e(run.cfg.method.name)}, K = "
             f"{run.cfg.method.num_clusters}, clusters from the {_e(primary)} readout; "
             f"report written {datetime.now():%Y-%m-%d %H:%M}.</p>",
             "<h2>Evaluation</h2>" + _metrics_html(result),
             f"<h3>Clusters and {_e(score_name)}</h3>"
             + _table(["statistic", "value"], [[k, v] for k, v in stats.items()]),
             "<h2>Training</h2>"]
    if pictures["training"]:
        parts.append(_img(pictures["training"], "loss and learning rate per epoch")
                     + _img(pictures["evolution"], "cluster sizes during training"))
    else:
        parts.append("<p class=note>No epoch records in metrics.jsonl.</p>")
    if pictures.get("curves"):
        parts.append(_img(pictures["curves"], "ACC, NMI and ARI per epoch"))
    if pictures.get("posterior"):
        parts.append(_img(pictures["posterior"], "posterior histograms of the first and last epochs"))
    if pictures.get("tsne"):
        parts.append("<h2>Embeddings (t-SNE)</h2>" + _img(pictures["tsne"], "t-SNE of the embeddings"))
    parts.append("<h2>Cluster sizes</h2>" + _img(pictures["sizes"], "cluster sizes"))
    if pictures.get("confusion"):
        parts.append("<h2>Confusion matrix</h2>" + _img(pictures["confusion"], "classes x clusters"))
    parts.append("<h2>Clusters</h2>" + _clusters_html(rows, labelled, score_name) + "</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---- the report ---------------------------------------------------------------------------------------
def paper_figures(run: LoadedRun, dataset: ImageDataset, clusters: np.ndarray, epochs: list[dict[str, Any]],
                  evals: list[dict[str, Any]], out_dir: Path, tsne_samples: int) -> dict[str, str | None]:
    """The MiCE paper's figures for this run (fastmice.report.figures): ACC/NMI/ARI per epoch, the posterior
    histograms of the first and last epochs, and t-SNE of the embeddings saved during training
    (eval.embed_every) plus the final model's, on the same fixed subsample."""
    from fastmice.report.figures import plot_metric_curves, plot_posterior_histograms, plot_tsne, read_snapshots, subsample

    pics: dict[str, str | None] = {"curves": None, "posterior": None, "tsne": None}
    curves = plot_metric_curves(evals, out_dir / "metrics_per_epoch.png")
    pics["curves"] = curves.name if curves else None
    hist = plot_posterior_histograms(epochs, out_dir / "posterior_histogram.png")
    pics["posterior"] = hist.name if hist else None
    if tsne_samples > 0 and len(dataset) >= 5:
        snaps = [s for s in read_snapshots(run.run_dir) if s["epoch"] != run.epoch][-2:]
        idx = subsample(len(dataset), tsne_samples, run.cfg.train.seed)
        emb = run.infer(dataset.images[torch.from_numpy(idx)])["embedding"].float().cpu().numpy()
        final = {"embedding": emb, "cluster": clusters[idx], "epoch": run.epoch}
        if dataset.labels is not None:
            final["label"] = dataset.labels.numpy()[idx]
        pics["tsne"] = plot_tsne(snaps + [final], out_dir / "tsne.png", seed=run.cfg.train.seed).name
    return pics


def make_report(run_dir: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None,
                progress: bool = False, tsne_samples: int = 2000) -> Path:
    """Write RUN/report/ (index.html and its PNGs) and return the path of index.html."""
    from fastmice.ops.metrics import confusion_matrix

    run = load_run(run_dir, device, overrides)
    dataset = load_dataset(run.cfg.data, progress=progress)
    if dataset.images.shape[-1] != run.image_size:
        raise ValueError(f"the dataset now has {dataset.images.shape[-1]}px images but the run was trained "
                         f"on {run.image_size}px; check data.root / data.image_size")
    out_dir = run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    result, clusters, score = ensure_eval(run, dataset)
    k = run.cfg.method.num_clusters
    primary = result.get("primary", "posterior")
    score_name = "confidence"
    if np.all(score == 1.0):  # hard k-means assignments: rank by closeness to the cluster centre instead
        score, score_name = centre_similarity(run, dataset, clusters, k), "similarity to centre"

    metrics = run.run_dir / "metrics.jsonl"
    epochs, evals = read_epochs(metrics), read_epochs(metrics, "eval")
    pictures: dict[str, str | None] = {"training": None, "evolution": None, "confusion": None}
    if epochs:
        pictures["training"] = plot_training(epochs, evals, out_dir / "training.png").name
        evo = plot_size_evolution(epochs, out_dir / "cluster_evolution.png")
        pictures["evolution"] = evo.name if evo else None
    pictures["sizes"] = plot_cluster_sizes(np.bincount(clusters, minlength=k), out_dir / "cluster_sizes.png",
                                           title=f"{run.cfg.name}: cluster sizes ({primary})").name
    if dataset.labels is not None:
        conf = confusion_matrix(dataset.labels.numpy(), clusters, num_classes=dataset.num_classes,
                                num_clusters=k)
        pictures["confusion"] = plot_confusion(conf, out_dir / "confusion.png", class_names=dataset.class_names,
                                               title=f"{run.cfg.name}: classes x clusters ({primary})").name
    pictures.update(paper_figures(run, dataset, clusters, epochs, evals, out_dir, tsne_samples))
    rows = write_cluster_sheets(dataset, clusters, score, k, out_dir)
    stats = summary_stats(clusters, score, k, score_name)
    return write_html(out_dir / "index.html", run, dataset, result, score_name, stats, pictures, rows)


def add_report_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fastmice report RUN [--device]`."""
    p = subparsers.add_parser(
        "report", help="write an HTML report of a run (curves, sizes, per-cluster images)",
        description="Write RUN/report/index.html with its pictures: loss, learning rate and cluster sizes "
                    "per epoch, the cluster-size chart, the confusion matrix and metrics (when the data has "
                    "labels) or size and confidence statistics (when not), and for every cluster its most "
                    "and least confident images; the paper's figures (ACC/NMI/ARI per epoch with "
                    "eval.probe_every, posterior histograms, t-SNE of the embeddings across training with "
                    "eval.embed_every). Evaluates the run first if eval.json is missing or older "
                    "than the checkpoint. The page is static HTML: open it from the file system. Overrides "
                    "such as --data.root=PATH point it at moved data.")
    p.add_argument("run", metavar="RUN", help="run folder holding checkpoint.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--tsne-samples", type=int, default=2000, metavar="N",
                   help="t-SNE (perplexity 200, as the paper) of N images' embeddings; 0 skips it (default 2000)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.config import parse_overrides

    index = make_report(args.run, args.device, parse_overrides(overrides), progress=True,
                        tsne_samples=args.tsne_samples)
    print(f"report written: {index}")
    return 0
