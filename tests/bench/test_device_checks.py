"""bench/device_checks.py, the one command for a lent GPU machine: its dry run end to end on the CPU, so the
script cannot be broken on the day a lease comes, and its time limits."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.helpers import REPO, load_script


def test_dry_run_runs_every_part_and_writes_the_summaries(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/device_checks.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    logs = {p.name: p.read_text()[-1500:] for p in out.glob("*.log")}
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], logs)
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["kernel_tests", "gpu_tests", "kernels", "train_off", "train_ro", "tta"]
    assert [p["part"] for p in summary["parts"]] == ["a", "a", "b", "c", "c", "d"]
    assert all(p["status"] == "ok" and 0 < p["seconds"] <= p["limit"] for p in parts.values()), parts
    assert summary["dry_run"] is True and summary["machine"]["device"] == "cpu"
    assert isinstance(summary["machine"]["missing"], list)      # the dependency preflight ran
    assert parts["kernel_tests"]["result"]["collected"] > 100      # the GPU tests exist under -m gpu
    assert parts["gpu_tests"]["result"]["collected"] >= 2
    impls = {r["impl"] for r in parts["kernels"]["result"]["rows"]}
    assert impls == {"reference", "torch_bf16", "triton"}           # Triton through the interpreter
    assert all(r["err_loss"] < 1e-3 for r in parts["kernels"]["result"]["rows"] if r["impl"] == "triton")
    off = parts["train_off"]["result"]
    assert {r["path"] for r in off["results"]} == {"naive", "fast"} and set(off["ratios"]) >= {"end_to_end"}
    ro = parts["train_ro"]["result"]
    assert [(r["path"], r["phase"]) for r in ro["results"]] == [("fast", "model"), ("fast", "end_to_end")]
    tta = parts["tta"]["result"]
    assert tta["steps"] >= 1 and 0 <= tta["acc"] <= 1 and tta["config"] == "digits"
    md = (out / "summary.md").read_text()
    assert "| a kernel_tests | ok |" in md and "| d tta | ok |" in md and "fast / naive:" in md
    # about a minute on an idle 2-core machine (the goal: under 3); 5 minutes seen on one shared by 5 sessions
    assert seconds < summary["budget_s"], f"the dry run took {seconds:.0f} s"


def test_a_part_past_its_limit_is_killed_and_the_budget_skips_the_rest(tmp_path):
    dc = load_script("device_checks")
    t0 = time.perf_counter()
    status, rc, secs = dc.run_limited([sys.executable, "-c", "import time; time.sleep(60)"], 1.0,
                                      tmp_path / "slow.log", {})
    assert status == "timeout" and rc is not None and rc < 0 and time.perf_counter() - t0 < 15
    status, rc, _ = dc.run_limited([sys.executable, "-c", "raise SystemExit(3)"], 30, tmp_path / "bad.log", {})
    assert (status, rc) == ("failed", 3)
    # a budget under 20 s: every part is skipped, and the run says it did not check everything (rc 1)
    out = tmp_path / "budget"
    assert dc.main(["--dry-run", "--out", str(out), "--budget", "5", "--parts", "a,b"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["name"], p["status"]) for p in summary["parts"]] == [
        ("kernel_tests", "skipped (budget spent)"), ("gpu_tests", "skipped (budget spent)"),
        ("kernels", "skipped (budget spent)")]


def test_the_time_to_accuracy_fits_what_is_left_and_a_cut_test_run_is_read_from_its_log(tmp_path):
    dc = load_script("device_checks")
    argv = ["tta.py", "--minutes", "2", "--json", "x"]
    assert dc.fit_minutes(argv, 160) == ["tta.py", "--minutes", "2.00", "--json", "x"]   # 2 min + 40 s fit
    assert dc.fit_minutes(argv, 100) == ["tta.py", "--minutes", "1.00", "--json", "x"]
    assert dc.fit_minutes(argv, 30)[2] == "0.25"                                         # the floor
    log = tmp_path / "cut.log"
    log.write_text("tests/ops/test_kernels.py::test_a[x] PASSED [ 1%]\n"
                   "tests/ops/test_kernels.py::test_b[y] FAILED [ 2%]\n"
                   "tests/ops/test_kernels.py::test_c SKIPPED (needs a CUDA device) [ 3%]\n"
                   "tests/ops/test_kernels.py::test_d PASSED [ 4%]\n")
    assert dc.results_from_log(log) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1, "cut_short": True,
                                        "failures": ["tests/ops/test_kernels.py::test_b[y]"]}
