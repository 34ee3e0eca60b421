"""bench/bench_kmeans.py runs on this machine's backends and its backends agree on easy clusters."""
import importlib.util

from tests.helpers import REPO


def test_kmeans_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kmeans", REPO / "bench" / "bench_kmeans.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--sizes", "3000x16x5", "--niter", "5", "--json", str(tmp_path / "k.json")])
    names = {r["backend"] for r in rows}
    assert {"faiss-cpu", "torch-cpu"} <= names
    assert all(r["seconds"] > 0 and 0.5 < r["objective"] <= 1.0 for r in rows)
    # same data, same seeded kmeans++ start: both backends find the same (well separated) optimum
    objs = [r["objective"] for r in rows]
    assert max(objs) - min(objs) < 1e-3
    assert (tmp_path / "k.json").is_file()
