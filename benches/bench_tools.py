#!/usr/bin/env python3
"""The image tools side by side with qemu-img: convert (plain and compressed), map, info, check.

qemu-img runs as a command. libqblock is measured twice: as the Python call a
tool makes instead of spawning qemu-img (in a fresh interpreter, the call timed
after the import, which is what the goals judge), and as the ``qblock`` command
(start-up included: about 0.1 s of interpreter and import here). The sides
alternate run by run so that neither gets a quieter moment; each keeps its
best run and the peak RSS of its process. Every convert output is checked with ``qemu-img compare`` against
the source and, for qcow2, with ``qemu-img check``.

Inputs: the data set of bench_read.py (a 2 GiB disk, 60% of its 64 KiB clusters
random bytes on a 16-letter alphabet, which zlib shrinks to about half) as a raw
file and a qcow2; and a 1 TiB qcow2 with a few thousand scattered clusters for
map, info and check.

    python benches/bench_tools.py                # 2 GiB, the real thing
    python benches/bench_tools.py --size 256M    # a quick check
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as bl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIB = 1 << 40


@dataclass
class Case:
    name: str
    qemu: List[str]  # argv, with {src} {raw} {out} {big} placeholders
    ours: List[str]
    api: str = ""  # the Python call, run with qb, json and the paths in scope
    out_fmt: Optional[str] = None  # format of {out}; None: no output file
    source: str = "raw"  # which data-set image {src} is: raw or qcow2
    goal: float = 1.0  # target: our time at most goal x qemu-img's
    results: Dict[str, dict] = field(default_factory=dict)


def cases() -> List[Case]:
    c = "convert"
    q2 = "qb.Qcow2Options(qb.open(src, 'raw', 0).virt_size"
    return [
        Case("convert qcow2 -> raw", ["qemu-img", c, "-f", "qcow2", "-O", "raw", "{src}", "{out}"],
             ["qblock", c, "-f", "qcow2", "-O", "raw", "{src}", "{out}"],
             "qb.convert(src, out, 'raw', source_format='qcow2')", "raw", "qcow2"),
        Case("convert raw -> qcow2", ["qemu-img", c, "-f", "raw", "-O", "qcow2", "{src}", "{out}"],
             ["qblock", c, "-f", "raw", "-O", "qcow2", "{src}", "{out}"],
             f"qb.convert(src, out, {q2}), source_format='raw')", "qcow2"),
        Case("convert raw -> qcow2 -c (zlib)", ["qemu-img", c, "-c", "-f", "raw", "-O", "qcow2", "{src}", "{out}"],
             ["qblock", c, "-c", "-f", "raw", "-O", "qcow2", "{src}", "{out}"],
             f"qb.convert(src, out, {q2}), source_format='raw', compress=True)", "qcow2", goal=0.5),
        Case("convert raw -> qcow2 -c (zstd)",
             ["qemu-img", c, "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", "{src}", "{out}"],
             ["qblock", c, "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", "{src}", "{out}"],
             f"qb.convert(src, out, {q2}, compression_type='zstd'), source_format='raw', compress=True)",
             "qcow2", goal=0.6),
        Case("convert raw -> vmdk streamOptimized",
             ["qemu-img", c, "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "{src}", "{out}"],
             ["qblock", c, "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "{src}", "{out}"],
             "qb.convert(src, out, qb.VmdkOptions(qb.open(src, 'raw', 0).virt_size, subformat='streamOptimized'),"
             " source_format='raw')", "vmdk", goal=0.5),
        Case("convert qcow2 -> vmdk", ["qemu-img", c, "-f", "qcow2", "-O", "vmdk", "{src}", "{out}"],
             ["qblock", c, "-f", "qcow2", "-O", "vmdk", "{src}", "{out}"],
             "qb.convert(src, out, 'vmdk', source_format='qcow2')", "vmdk", "qcow2"),
        Case("map --output=json, 1 TiB sparse qcow2", ["qemu-img", "map", "--output=json", "{big}"],
             ["qblock", "map", "--output=json", "{big}"],
             "img = qb.open(big, 'qcow2', 0); json.dumps([e.to_qemu_map() for e in img.map()]); img.close()", goal=0.5),
        Case("info, 1 TiB sparse qcow2", ["qemu-img", "info", "--output=json", "{big}"],
             ["qblock", "info", "--output=json", "{big}"], "img = qb.open(big, 'qcow2', 0); img.info(); img.close()"),
        Case("check, 1 TiB sparse qcow2", ["qemu-img", "check", "{big}"], ["qblock", "check", "{big}"],
             "qb.check(big)"),
    ]


def worker(spec: dict) -> dict:
    """Run one Python call in this fresh interpreter; its time, after the import."""
    import json

    import libqblock as qb

    scope = {"qb": qb, "json": json, **spec["paths"]}
    try:
        t0 = time.perf_counter()
        exec(spec["api"], scope)
        dt = time.perf_counter() - t0
    except Exception as e:  # reported in the table
        return {"status": "error", "message": f"{type(e).__name__}: {e}"}
    return {"status": "ok", "seconds": dt, "maxrss_kib": bl.peak_rss_kib()}


def sparse_tib(d: str, clusters: int, seed: int) -> str:
    """A 1 TiB qcow2 with `clusters` scattered 64 KiB clusters of data (made once)."""
    path = os.path.join(d, "sparse-1T.qcow2")
    done = path + ".done"
    if os.path.exists(done):
        return path
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1T"], check=True)
    rng = random.Random(seed)
    script = os.path.join(d, "sparse-writes.txt")
    with open(script, "w") as f:
        for i in rng.sample(range(TIB // bl.CLUSTER), clusters):
            f.write(f"write -q -P {i % 250 + 1} {i * bl.CLUSTER} 64k\n")
    with open(script) as inp:
        subprocess.run(["qemu-io", "-f", "qcow2", path], stdin=inp, stdout=subprocess.DEVNULL, check=True)
    open(done, "w").close()
    return path


def fill(argv: List[str], paths: Dict[str, str]) -> List[str]:
    out = [a.format(**paths) for a in argv]
    if out[0] == "qblock":
        # The entry point beside this interpreter, not a version manager's shim
        # on PATH (pyenv's adds 0.2 s of shell to every start).
        exe = os.path.join(os.path.dirname(sys.executable), "qblock")
        out = ([exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "libqblock"]) + out[1:]
    return out


def verify(case: Case, src: str, out: str) -> str:
    fmt = "qcow2" if case.source == "qcow2" else "raw"
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", case.out_fmt, src, out]).returncode
    if same:
        return "WRONG (qemu-img compare)"
    if case.out_fmt in ("qcow2", "vmdk") and subprocess.run(["qemu-img", "check", "-q", out]).returncode:
        return "WRONG (qemu-img check)"
    return "ok"


def run_case(case: Case, ds: bl.Dataset, big: str, repeat: int) -> None:
    d = ds.dir
    src = ds.qcow2 if case.source == "qcow2" else ds.raw
    for rnd in range(repeat):
        # Alternate which side goes first, so that neither always follows the other.
        order = ("qemu", "api", "cmd") if rnd % 2 == 0 else ("cmd", "api", "qemu")
        for side in order:
            out = os.path.join(d, f"out-{side}.{case.out_fmt or 'none'}")
            paths = {"src": src, "raw": ds.raw, "out": out, "big": big}
            if case.out_fmt:
                bl.remove_and_sync(out)
            if side == "api":
                r = bl.run_worker(os.path.abspath(__file__), {"api": case.api, "paths": paths})
            else:
                r = bl.run_timed_command(fill(case.qemu if side == "qemu" else case.ours, paths), d)
            res = case.results.setdefault(side, {"times": [], "rss": 0, "check": "n/a"})
            if r["status"] != "ok":
                res["error"] = r["message"].strip().splitlines()[-1][:120] if r["message"].strip() else "failed"
                continue
            if case.out_fmt:
                # Durable before the clock stops for the next run: no write-back left over.
                os.sync()
                if rnd == 0:
                    res["check"] = verify(case, src, out)
                res["size"] = os.stat(out).st_blocks * 512
                bl.remove_and_sync(out)
            res["times"].append(r["seconds"])
            res["rss"] = max(res["rss"], r["maxrss_kib"])


def report(cs: List[Case], markdown: bool) -> str:
    header = ["case", "qemu-img", "libqblock call", "ratio", "goal", "qblock command", "peak RSS (qemu-img / call)",
              "output on disk (qemu-img / call)", "check"]
    rows = []
    for c in cs:
        q, o, cmd = c.results.get("qemu", {}), c.results.get("api", {}), c.results.get("cmd", {})
        def fig(r: dict) -> str:
            if r.get("error") and not r.get("times"):
                return "error"
            return f"{min(r['times']):.2f} s" if r.get("times") else "-"
        ratio = "-"
        if q.get("times") and o.get("times"):
            ratio = f"{min(o['times']) / min(q['times']):.2f}x"
        rss = f"{q.get('rss', 0) / 1024:.0f} / {o.get('rss', 0) / 1024:.0f} MiB" if q.get("times") and o.get("times") else "-"
        size = "-"
        if "size" in q and "size" in o:
            size = f"{q['size'] / bl.MiB:.0f} / {o['size'] / bl.MiB:.0f} MiB"
        chk = o.get("check", "n/a") if o.get("times") else (o.get("error") or "-")
        rows.append([c.name, fig(q), fig(o), ratio, f"<= {c.goal:g}x", fig(cmd), rss, size, chk])
    verdicts = []
    for c in cs:
        q, o = c.results.get("qemu", {}), c.results.get("api", {})
        if not (q.get("times") and o.get("times")):
            verdicts.append(f"NOT RUN {c.name}: {o.get('error') or q.get('error') or 'no result'}")
            continue
        r = min(o["times"]) / min(q["times"])
        ok = r <= c.goal and o.get("check") in ("ok", "n/a")
        verdicts.append(f"{'MET' if ok else 'MISSED':<7} {c.name}: {r:.2f}x qemu-img (goal <= {c.goal:g}x)")
    table = bl.render_table(header, rows, markdown)
    if markdown:
        return table + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
    return table + "\n\n" + "\n".join(verdicts)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2G", help="virtual size of the convert data set (default 2G)")
    p.add_argument("--dir", help="where to build the data (default: a new directory under /tmp); reused if it matches")
    p.add_argument("--keep", action="store_true", help="keep the data directory at the end")
    p.add_argument("--repeat", type=int, default=3, help="runs per side and case, alternating (default 3)")
    p.add_argument("--sparse-clusters", type=int, default=3000, help="clusters of data in the 1 TiB image")
    p.add_argument("--seed", type=int, default=20121026)
    p.add_argument("--only", action="append", default=[], help="run only cases whose name contains this text")
    p.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown to FILE")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        import json

        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            p.error(f"{tool} is needed (apt-get install qemu-utils)")
    size = bl.parse_size(a.size)
    d = a.dir or bl.default_tmp_dir(size)
    keep = a.keep or bool(a.dir)
    info = bl.machine_info(REPO)
    info["load average at start"] = bl.loadavg()
    print("\n".join(f"{k:>22}: {v}" for k, v in info.items()), flush=True)
    try:
        ds = bl.build_dataset(d, size, a.seed, 1000, 10, log=lambda m: print(m, flush=True))
        big = sparse_tib(d, a.sparse_clusters, a.seed)
        cs = [c for c in cases() if not a.only or any(o.lower() in c.name.lower() for o in a.only)]
        bl.warm([ds.raw, ds.qcow2, big])
        for c in cs:
            t0 = time.perf_counter()
            run_case(c, ds, big, a.repeat)
            print(f"  [{time.perf_counter() - t0:6.1f} s] {c.name}", flush=True)
        info["load average at end"] = bl.loadavg()
        print()
        print(report(cs, False))
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write("## Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n")
                f.write(f"## Results\n\n{bl.human_size(size)} data set of bench_read.py "
                        f"({ds.allocated} of {size // bl.CLUSTER} 64 KiB clusters hold data); 1 TiB qcow2 with "
                        f"{a.sparse_clusters} scattered clusters. Best of {a.repeat} alternating runs per side; "
                        "commands timed whole (start-up included); outputs synced between runs.\n\n")
                f.write(report(cs, True) + "\n")
            print(f"\nwrote {a.markdown}")
    finally:
        if keep:
            print(f"data kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
