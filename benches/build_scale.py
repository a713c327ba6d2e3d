"""Build driver at scale (issue 9): driver memory and time of listing + planning, and the cost of
an incremental build, against URL lists of N rows.

Q1: `pippo data build --dry-run` (lists the sources and plans every partition, processes
    nothing) on lists of 10^5, 10^6 (and with --big 10^7) URL rows: driver peak RSS growth per
    input row (goal <= 50 B) and wall time per input (goal: flat or falling).
Q2: incremental +1 % on parents of 10^5 and 10^6 inputs: driver wall and CPU time of the child
    build / the fresh parent build (goal <= 0.1), and bytes the driver reads from the parent /
    the parent's ledger bytes (goal <= 1 %).

Q3 (issue 17): a flat directory of N tiny files (60 k and more): driver peak RSS growth per input
    of a fresh build (--dry-run: listing and planning) and of an incremental build over it
    (+1 % new files, after a real parent build), goal <= 50 B/input; `--code DIR` runs another
    checkout's build (the numbers before a change).

Inputs are relative paths to files that do not exist (each is listed, partitioned, tried once and
rejected as `fetch: file not found`), so the work measured is the build's bookkeeping, not image
decoding. Each measurement runs in a fresh process (its own local Ray) so RSS is that driver's.
Run: .venv/bin/python benches/build_scale.py [--big] [--flat [--code DIR]]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault("RAY_ADDRESS", "")
from dataprep.build.job import run_build
from dataprep.build_config import BuildConfig, InputPolicy, Source
args = json.loads(sys.argv[1])
opened = []
if args.get("audit"):
    parent_dir = args["audit"]
    def hook(event, a):
        if event == "open" and isinstance(a[0], str) and a[0].startswith(parent_dir) and isinstance(a[1], str) and "r" in a[1]:
            try:
                opened.append((a[0], os.path.getsize(a[0])))
            except OSError:
                pass
    sys.addaudithook(hook)
cfg = BuildConfig(dataset=args["dataset"], sources=[Source("urls", u) for u in args["lists"]]
                  + [Source("images", d) for d in args.get("dirs", [])],
                  partitions=args["partitions"], max_attempts=1, preview_samples=0,
                  inputs=InputPolicy(max_bytes=2**31))
import ray
ray.init(address="local", include_dashboard=False, logging_level="ERROR")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# ru_maxrss is the process peak, which Ray's start-up may set: the build's own peak is sampled
import threading
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
before, peak, done = rss_now(), [0], threading.Event()
def sample():
    while not done.wait(0.01):
        peak[0] = max(peak[0], rss_now())
threading.Thread(target=sample, daemon=True).start()
t0, c0 = time.time(), time.process_time()
out = run_build(cfg, {{}}, dry_run=args["dry_run"])
wall, cpu = time.time() - t0, time.process_time() - c0
done.set()
print(json.dumps({{"wall": wall, "cpu": cpu, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "rss0_kb": rss0, "build_rss_before_kb": before, "build_rss_peak_kb": max(peak[0], rss_now()),
                  "out": out, "opened": opened}}))
'''


CODE = ROOT


def drive(**args) -> dict:
    script = DRIVER.format(root=str(CODE))
    for _ in range(3):    # a loaded machine can miss Ray's fixed 30 s raylet start-up wait: try again
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                              timeout=7200, cwd=str(CODE),
                              # Ray's workers import the same checkout as the driver (Ray gives
                              # them the driver's sys.path, its cwd included)
                              env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(CODE)})
        if "timed out during startup" not in proc.stderr:
            break
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def url_list(path: Path, n: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(f"missing/{i:09d}.jpg\n")
    return path


def q1(sizes, tmp: Path) -> list[dict]:
    rows = []
    for n in sizes:
        lst = url_list(tmp / f"q1_{n}" / "urls.txt", n)
        r = drive(dataset=str(tmp / f"q1_{n}" / "ds"), lists=[str(lst)], partitions=64, dry_run=True)
        rows.append({"n": n, "wall_s": r["wall"], "us_per_input": 1e6 * r["wall"] / n,
                     "rss_mb": r["rss_kb"] / 1024, "planned": r["out"]["new_inputs"]})
        print(f"  dry-run {n:>9,} rows: {r['wall']:7.1f} s ({1e6 * r['wall'] / n:6.1f} us/input), "
              f"driver peak RSS {r['rss_kb'] / 1024:7.1f} MB", flush=True)
    for a, b in zip(rows, rows[1:]):
        growth = (b["rss_mb"] - a["rss_mb"]) * 2**20 / (b["n"] - a["n"])
        print(f"  RSS growth {a['n']:,} -> {b['n']:,}: {growth:.1f} B/input (goal <= 50)")
        b["rss_growth_b_per_input"] = growth
    return rows


def q2(sizes, tmp: Path) -> list[dict]:
    rows = []
    for n in sizes:
        d = tmp / f"q2_{n}"
        parent = drive(dataset=str(d / "ds"), lists=[str(url_list(d / "urls.txt", n))], partitions=64, dry_run=False)
        ledger = sum(p.stat().st_size for p in (d / "ds" / "parts").rglob("*.ledger.parquet"))
        extra = url_list(d / "urls_new.txt", n // 100, start=n)
        child = drive(dataset=str(d / "ds"), lists=[str(d / "urls.txt"), str(extra)], partitions=64,
                      dry_run=False, audit=str(d / "ds"))
        parent_vid = parent["out"]
        read = sum(size for path, size in child["opened"] if parent_vid in path or "/parts/" in path)
        row = {"n": n, "parent_wall_s": parent["wall"], "child_wall_s": child["wall"],
               "wall_ratio": child["wall"] / parent["wall"], "cpu_ratio": child["cpu"] / parent["cpu"],
               "driver_read_parent_b": read, "parent_ledger_b": ledger, "read_fraction": read / ledger}
        rows.append(row)
        print(f"  +1% on {n:>9,}: child/fresh wall {row['wall_ratio']:.3f} (driver CPU {row['cpu_ratio']:.3f}); "
              f"driver read {read:,} B of the parent = {100 * row['read_fraction']:.3f} % of its "
              f"{ledger:,} ledger bytes", flush=True)
    return rows


def flat_dir(path: Path, n: int, start: int = 0) -> Path:
    """n tiny files that look like photos by name (each is read once and rejected at decode)."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (path / f"IMG_{i:09d}.jpg").write_bytes(b"not a jpeg %d" % i)
    return path


def q3(sizes, tmp: Path) -> list[dict]:
    rows = []
    for n in sizes:
        d = tmp / f"q3_{n}"
        src = flat_dir(d / "src", n)
        fresh = drive(dataset=str(d / "ds"), lists=[], dirs=[str(src)], partitions=64, dry_run=True)
        parent = drive(dataset=str(d / "ds"), lists=[], dirs=[str(src)], partitions=64, dry_run=False)
        flat_dir(src, n // 100, start=n)
        child = drive(dataset=str(d / "ds"), lists=[], dirs=[str(src)], partitions=64, dry_run=False)
        # the build's own sampled peak (ru_maxrss can be Ray's start-up, hiding the listing)
        rows.append({"n": n, "fresh_rss_mb": fresh["build_rss_peak_kb"] / 1024, "fresh_wall_s": fresh["wall"],
                     "parent_wall_s": parent["wall"], "child_rss_mb": child["build_rss_peak_kb"] / 1024,
                     "child_wall_s": child["wall"]})
        print(f"  flat dir {n:>9,}: dry-run {fresh['wall']:6.1f} s, driver peak RSS {rows[-1]['fresh_rss_mb']:7.1f} MB; "
              f"parent build {parent['wall']:6.1f} s; +1 % build {child['wall']:6.1f} s, driver peak RSS "
              f"{rows[-1]['child_rss_mb']:7.1f} MB", flush=True)
    for a, b in zip(rows, rows[1:]):
        for what in ("fresh", "child"):
            growth = (b[f"{what}_rss_mb"] - a[f"{what}_rss_mb"]) * 2**20 / (b["n"] - a["n"])
            b[f"{what}_rss_growth_b_per_input"] = growth
            print(f"  {what} RSS growth {a['n']:,} -> {b['n']:,}: {growth:.1f} B/input (goal <= 50)")
    return rows


def main():
    global CODE
    big = "--big" in sys.argv
    if "--code" in sys.argv:
        CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
    if "--flat" in sys.argv:          # Q3 only
        with tempfile.TemporaryDirectory() as tmp:
            print("Q3: flat directory, fresh (--dry-run) and +1 % incremental")
            print(json.dumps({"q3": q3([10_000, 60_000] + ([200_000] if big else []), Path(tmp))}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("Q1: listing + planning (--dry-run)")
        r1 = q1([10**5, 10**6] + ([10**7] if big else []), Path(tmp))
        print("Q2: incremental +1 %")
        r2 = q2([10**5, 10**6], Path(tmp))
    print(json.dumps({"q1": r1, "q2": r2}))


if __name__ == "__main__":
    main()
