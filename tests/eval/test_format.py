"""The end of `fastmice train` / `fastmice eval`: readouts beside the pixel baseline, the cluster sizes, and a
note when one cluster looks like two classes merged."""
from fastmice.eval.evaluate import cluster_size_lines, format_results


def _result(sizes, acc=0.9, pixel_acc=0.8):
    entry = {"acc": acc, "nmi": 0.85, "ari": 0.8, "cluster_sizes": sizes}
    return {"readouts": {"posterior": entry, "gating": dict(entry)}, "primary": "posterior",
            "num_classes": len(sizes), "num_clusters": len(sizes),
            "pixel_kmeans": {"acc": pixel_acc, "nmi": 0.75, "ari": 0.66}, "confidence": {"mean": 0.9}}


def test_even_sizes_are_listed_largest_first_without_a_note():
    lines = cluster_size_lines([180, 178, 182, 179, 181, 180, 177, 183, 178, 179], "posterior")
    # 1,797 / 10 = 179.7, printed as 180
    assert lines == ["cluster sizes (posterior), largest first: 183 182 181 180 180 179 179 178 178 177 "
                     "(an even split: 180 each)"]


def test_a_merged_pair_is_pointed_out():
    # Two digits in one cluster of 360, one cluster nearly empty: 360 * 10 / 1800 = 2.0x, 9 * 10 / 1800 = 0.05x.
    sizes = [360, 9, 180, 180, 180, 180, 180, 171, 180, 180]
    lines = cluster_size_lines(sizes, "posterior", labelled=True)
    assert lines[0].startswith("cluster sizes (posterior), largest first: 360 180 ")
    assert lines[0].endswith(" 171 9 (an even split: 180 each)")
    assert lines[1] == ("note: the largest cluster holds 2.0x an even share and the smallest 0.05x: two classes "
                        "may share one cluster (confusion.png shows which)")
    # Without labels there is no confusion matrix to point to.
    assert "confusion.png" not in cluster_size_lines(sizes, "posterior", labelled=False)[1]
    # Just under 1.6x an even share (1.6 * 180 = 288): no note.
    assert len(cluster_size_lines([287, 73] + [180] * 8, "posterior")) == 1


def test_format_results_sets_the_readout_beside_pixel_kmeans():
    text = format_results(_result([360, 9] + [179] * 8, acc=0.8135, pixel_acc=0.8047))
    lines = text.splitlines()
    assert lines[0].split() == ["readout", "ACC", "NMI", "ARI"]
    assert lines[1].split() == ["posterior", "81.35", "85.00", "80.00"]
    assert lines[3].split() == ["k-means", "on", "raw", "pixels", "80.47", "75.00", "66.00"]
    assert "posterior ACC 81.35 against 80.47 for k-means on raw pixels: +0.88 points" in lines
    assert any(line.startswith("cluster sizes (posterior), largest first: 360 179") for line in lines)
    assert any(line.startswith("note: the largest cluster holds 2.0x") for line in lines)
    assert lines[-1] == "mean confidence 0.900"


def test_format_results_without_labels_lists_the_sizes():
    result = {"readouts": {"posterior": {"cluster_sizes": [30, 10]}}, "primary": "posterior"}
    assert format_results(result).splitlines() == [
        "no labels: ACC/NMI/ARI need labels",
        "cluster sizes (posterior), largest first: 30 10 (an even split: 20 each)"]
