"""The one command for a lent GPU machine: everything that needs a GPU, ordered by value, in at most 9 minutes.

    python bench/device_checks.py [--out DIR] [--budget 540] [--parts a,b,c,d] [--cifar DIR] [--dry-run]

Parts, most valuable first, each a child process with its own time limit (killed, with its process group, when
it runs past it) so that a slow or hanging part cannot starve the rest; a part whose limit no longer fits in
what is left of --budget gets what is left, and is skipped under 20 s:

  a  kernel_tests  pytest -m gpu: the Triton kernels against the torch reference (tests/ops/test_kernels.py)
     gpu_tests     pytest -m gpu: the prefetch and the fast step
  b  kernels       bench/bench_kernels.py at the paper's shapes (B 256, K 10/15/20, V 16384, D 128; naive fp32,
                   torch bf16, Triton; forward, backward, both; time and peak memory)
  c  train_off     bench/bench_train.py naive against fast, train.compile=off (CIFAR-10 JPEGs if present,
                   synthetic CIFAR-shaped images otherwise)
     train_ro      the fast path under train.compile=reduce-overhead (model and end-to-end phases)
  d  tta           bench/time_to_accuracy.py, a two-minute budget, shortened to fit what the budget has left
                   (CIFAR-10 JPEGs if present, else the bundled digits written out as a folder)

Writes under --out (default $OUT, else /tmp/device_out): <part>.log for each part, the scripts' own JSON
reports, summary.json (machine, commit, and every part's status, seconds and figures) and summary.md (the
same as tables, for bench/RESULTS.md). Needs neither DALI nor FAISS-GPU. The CIFAR-10 JPEGs are looked for in
--cifar, /tmp/data/cifar10-jpeg (where ../shared/device/stage.sh puts them), ../shared/datasets/cifar10-jpeg.

--dry-run: the same parts on the CPU at tiny sizes (the GPU tests only collected, the kernel bench through
Triton's interpreter, compile off, a few seconds of training), so that the script is known to work before a
lease; CI runs it (tests/bench/test_device_checks.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/ops/test_kernels.py", "tests/views/test_prefetch.py", "tests/engine/test_fast_step.py"]
CIFAR_PLACES = [Path("/tmp/data/cifar10-jpeg"), REPO.parent / "shared" / "datasets" / "cifar10-jpeg"]
MIN_PART_S = 20
OPTIONAL_MODULES = ("yaml", "numpy", "scipy", "sklearn", "PIL", "tqdm", "matplotlib", "faiss", "nvidia.dali",
                    "torchvision", "pytest")
# bench_train and time_to_accuracy at tiny sizes for --dry-run (any CPU, a few seconds each)
TINY_TRAIN = ["--arch", "resnet10", "--width", "8", "--batch-size", "16", "--steps", "2", "--warmup", "1",
              "--workers", "0", "--num-images", "64", "--override", "method.queue_size=32",
              "--override", "method.embed_dim=16"]
TINY_TTA = ["--override", "backbone.width=4", "--override", "method.embed_dim=16", "--override",
            "method.queue_size=32", "--override", "optim.batch_size=32", "--override", "eval.kmeans_niter=5",
            "--override", "eval.pixel_baseline=false", "--warmup-steps", "1"]


def pytest_part(name: str, files: list[str], out: Path, dry: bool) -> list[str]:
    """pytest -m gpu on `files`; the dry run only collects them (checks the files and the marker: every GPU
    test would skip here). -v puts each result in the log as it comes, read if the part is cut short."""
    base = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-p", "no:cacheprovider"]
    return base + (["-q", "--co"] if dry else ["-v", "-rfE", f"--junitxml={out / (name + '.xml')}"])


def part_commands(args, out: Path, cifar: Path | None) -> list[dict]:
    """The parts in order: name, letter, time limit (s), argv, and the report it writes (if any). On the GPU
    the limits add up to about the 9-minute budget (the last part gets what is left: the time to accuracy
    shortens its own budget to fit); the dry run's allow a slow, shared CPU."""
    py = sys.executable
    dry = args.dry_run
    kernels = [py, "bench/bench_kernels.py", "--K", "10", "15", "20", "--json", str(out / "bench_kernels.json")]
    if dry:
        kernels = [py, "bench/bench_kernels.py", "--device", "cpu", "--B", "8", "--V", "40", "--D", "32",
                   "--K", "2", "--json", str(out / "bench_kernels.json")]
    data = ["--data", str(cifar / "train")] if cifar else []
    train = [py, "bench/bench_train.py", *(TINY_TRAIN + ["--device", "cpu"] if dry else
                                           ["--device", "cuda", "--steps", "50", "--warmup", "10", "--workers", "16"]),
             *data]
    train_off = train + ["--compile", "off", "--paths", "naive,fast", "--json", str(out / "bench_train_off.json")]
    # On the CPU reduce-overhead is Inductor without CUDA graphs, a minute or more of C++ compiling: the dry
    # run keeps the flags' path but not the compile
    train_ro = train + ["--compile", "off" if dry else "reduce-overhead", "--paths", "fast",
                        "--phases", "model,end_to_end", "--json", str(out / "bench_train_ro.json")]
    tta_data = (["--data", str(cifar), "--config", "cifar10"] if cifar else
                ["--data", str(out / "digits_folder"), "--config", "digits", "--splits", ""])
    tta = [py, "bench/time_to_accuracy.py", *tta_data, "--run-dir", str(out / "tta_run"),
           "--json", str(out / "tta.json")]
    tta += (["--minutes", "0.05", "--device", "cpu", "--compile", "off", *TINY_TTA] if dry else
            ["--minutes", "2", "--device", "cuda", "--compile", "reduce-overhead"])
    parts = [   # limit: (GPU, dry run)
        {"name": "kernel_tests", "part": "a", "limit": (110, 120), "report": out / "kernel_tests.xml",
         "argv": pytest_part("kernel_tests", GPU_TESTS[:1], out, dry)},
        {"name": "gpu_tests", "part": "a", "limit": (50, 120), "report": out / "gpu_tests.xml",
         "argv": pytest_part("gpu_tests", GPU_TESTS[1:], out, dry)},
        {"name": "kernels", "part": "b", "limit": (60, 90), "argv": kernels, "report": out / "bench_kernels.json",
         "env": {"TRITON_INTERPRET": "1"} if dry else {}},   # the dry run's Triton: the interpreter
        {"name": "train_off", "part": "c", "limit": (75, 150), "argv": train_off,
         "report": out / "bench_train_off.json"},
        {"name": "train_ro", "part": "c", "limit": (105, 120), "argv": train_ro,
         "report": out / "bench_train_ro.json"},
        {"name": "tta", "part": "d", "limit": (160, 120), "argv": tta, "report": out / "tta.json",
         "minutes_from_limit": not dry},   # load + compile + evaluation: about 40 s besides the budget
    ]
    for part in parts:
        part["limit"] = part["limit"][1 if dry else 0]
    return parts


def fit_minutes(argv: list[str], limit: float) -> list[str]:
    """time_to_accuracy's --minutes cut so that it ends within `limit` (40 s kept for the rest of the run)."""
    i = argv.index("--minutes")
    minutes = max(0.25, min(float(argv[i + 1]), (limit - 40) / 60))
    return argv[:i + 1] + [f"{minutes:.2f}"] + argv[i + 2:]


def results_from_log(log: Path) -> dict:
    """Counts of a pytest -v run cut short (no JUnit XML): its PASSED / FAILED / ERROR / SKIPPED lines."""
    text = log.read_text().splitlines()
    counts = {k: sum(f" {word}" in line and "::" in line for line in text)
              for k, word in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))}
    counts["failures"] = [line.split(" ")[0] for line in text if " FAILED" in line and "::" in line]
    counts["cut_short"] = True
    return counts


def run_limited(argv: list[str], limit: float, log: Path, env: dict) -> tuple[str, int | None, float]:
    """Run argv in its own process group with output to `log`; ('ok'|'failed'|'timeout', rc, seconds).
    Past `limit` the whole group gets SIGTERM, then SIGKILL 10 s later."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return "timeout", proc.returncode, time.perf_counter() - t0
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - t0


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the ids of the failing tests, from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def collected(log: Path) -> int:
    """How many tests `pytest --co -q` listed (its lines 'path::test')."""
    return sum("::" in line for line in log.read_text().splitlines())


def write_digits_folder(root: Path, n: int | None = None) -> Path:
    """The bundled digits as PNGs in class folders (the time-to-accuracy data when no JPEGs were sent)."""
    if (root / "done").exists():
        return root
    sys.path.insert(0, str(REPO))
    from PIL import Image
    from fastmice.data.sources import load_digits
    ds = load_digits(8)
    for i in range(len(ds) if n is None else n):
        folder = root / str(int(ds.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    (root / "done").write_text("")
    return root


def machine_info(env: dict) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "host": platform.node()}
    # which of fastmice's dependencies and optional pieces this machine lacks (a bare GPU machine may lack some;
    # the parts that need them fail, and this says why at a glance)
    probe = ("import importlib.util, torch, triton; print(torch.__version__); print(triton.__version__); "
             "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'); "
             f"print(','.join(m for m in {OPTIONAL_MODULES!r} if importlib.util.find_spec(m.split('.')[0]) is None))")
    try:
        lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env,
                               cwd=REPO).stdout.split("\n")
        info.update(torch=lines[0], triton=lines[1], device=lines[2], missing=[m for m in lines[3].split(",") if m])
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["probe_error"] = repr(e)
    try:
        info["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout (a copied tree)
        info["commit"] = "unknown"
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    return info


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"# Device checks{' (dry run, CPU)' if summary['dry_run'] else ''}", "",
             f"{m.get('device')} ({m.get('nvidia_smi', '-')}); torch {m.get('torch')}, triton {m.get('triton')}, "
             f"Python {m.get('python')}; commit {m.get('commit')}; {m.get('date')}; data: {summary['data']}; "
             f"modules missing: {', '.join(m.get('missing') or []) or 'none'}", "",
             "| part | status | seconds | limit |", "|---|---|---|---|"]
    for p in summary["parts"]:
        lines.append(f"| {p['part']} {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['limit']:.0f} |")
    for p in summary["parts"]:
        r = p.get("result")
        if not r:
            continue
        lines += ["", f"## {p['part']} {p['name']}", "", f"`{p['command']}`", ""]
        if p["name"].endswith("_tests"):
            lines.append(", ".join(f"{k} {v}" for k, v in r.items() if k != "failures"))
            lines += [f"- FAILED {x}" for x in r.get("failures", [])]
        elif p["name"] == "kernels":
            lines += [f"B {r['B']}, V {r['V']}, D {r['D']}, queue {r['queue_dtype']} (ms; peak MiB above the inputs)",
                      "", "| K | impl | fwd | bwd | fwd+bwd | peak MiB | err loss | err grad |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in r["rows"]:
                peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
                lines.append(f"| {row['K']} | {row['impl']} | {row['fwd_ms']:.3f} | {row['bwd_ms']:.3f} | "
                             f"{row['fwd_bwd_ms']:.3f} | {peak} | {row['err_loss']:.1e} | {row['err_grad']:.1e} |")
        elif p["name"].startswith("train"):
            lines += ["| path | phase | samples/s | step ms |", "|---|---|---|---|"]
            lines += [f"| {x['path']} | {x['phase']} | {x['samples_per_s']:,.1f} | {x['step_ms']:.2f} |"
                      for x in r["results"]]
            if r.get("ratios"):
                lines += ["", "fast / naive: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())]
            if r.get("compile"):
                lines += ["", f"compile: {r['compile']}"]
        elif p["name"] == "tta":
            lines.append(f"{r['train_s']:.0f} s of training ({r['status']}), {r['steps']} steps, "
                         f"{r['samples_seen']:,} samples, {r['epochs']:.2f} epochs: {r['primary']} ACC {r['acc']} "
                         f"NMI {r['nmi']} ARI {r['ari']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/device_out"))
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all the parts together (default 540)")
    p.add_argument("--parts", default="a,b,c,d", help="which parts, by letter or name (default all)")
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG folder with train/ and test/")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes (see above)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    paths = [str(REPO)] + (["/tmp/site"] if Path("/tmp/site").is_dir() else [])   # DALI, when it was sent
    env["PYTHONPATH"] = os.pathsep.join(paths + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cifar = next((c for c in ([args.cifar] if args.cifar else CIFAR_PLACES) if (c / "train").is_dir()), None)
    if args.dry_run:
        cifar = None
    wanted = set(args.parts.split(","))
    if cifar is None and wanted & {"d", "tta"}:
        write_digits_folder(out / "digits_folder", 160 if args.dry_run else None)
    summary = {"dry_run": args.dry_run, "data": str(cifar) if cifar else "synthetic CIFAR-shaped / digits",
               "machine": machine_info(env), "budget_s": args.budget, "parts": []}
    for part in part_commands(args, out, cifar):
        if part["part"] not in wanted and part["name"] not in wanted:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        limit = min(part["limit"], left)
        if part.get("minutes_from_limit"):
            part["argv"] = fit_minutes(part["argv"], limit)
        entry = {"name": part["name"], "part": part["part"], "limit": limit, "command": " ".join(part["argv"]),
                 "log": str(out / f"{part['name']}.log")}
        if limit < MIN_PART_S:
            entry.update(status="skipped (budget spent)", seconds=0.0)
        else:
            print(f"== {part['part']} {part['name']} (limit {limit:.0f} s): {entry['command']}", flush=True)
            Path(part["report"]).unlink(missing_ok=True)   # a reused --out: never read an earlier run's report
            status, rc, secs = run_limited(part["argv"], limit, out / f"{part['name']}.log",
                                           {**env, **part.get("env", {})})
            entry.update(status=status, rc=rc, seconds=secs)
            report = part["report"]
            log = out / f"{part['name']}.log"
            try:
                if str(report).endswith(".xml") and args.dry_run:
                    entry["result"] = {"collected": collected(log)}
                elif str(report).endswith(".xml") and not Path(report).exists():
                    entry["result"] = results_from_log(log)
                elif Path(report).exists():
                    entry["result"] = (junit_counts(report) if str(report).endswith(".xml")
                                       else json.loads(Path(report).read_text()))
            except (ValueError, OSError, ET.ParseError) as e:
                entry["report_error"] = repr(e)
            print(f"   {status} (rc {rc}) in {secs:.0f} s", flush=True)
        summary["parts"].append(entry)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))   # after every part
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'} ({summary['seconds']:.0f} s)")
    return 0 if all(x["status"] == "ok" for x in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
