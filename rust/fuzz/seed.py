#!/usr/bin/env python3
"""Build the seed corpora for the fuzz targets, in corpus/<target>/.

Two sources:
  * the conformance corpus (../shared/corpus, see its README and MANIFEST.tsv):
    each image goes to the target of its magic format, decompressed; an image
    larger than SEED_MAX contributes its first SEED_MAX bytes;
  * small images qemu-img creates for each format it writes, with a few
    qemu-io writes (and compressed / snapshot / subcluster variants);
  * cow images (QEMU no longer writes cow) made by libqblock itself, when
    it is importable.

Every seed also goes to the `probe` target. Seeds are generated, never
committed (corpus/ is git-ignored). Usage: seed.py [--max BYTES]
"""
import argparse
import bz2
import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.normpath(os.path.join(REPO, "..", "shared", "corpus"))

# MANIFEST's magic_format (its first word) -> fuzz target.
MAGIC_TARGET = {
    "qcow2": "qcow2", "qcow": "qcow", "vdi": "vdi", "vmdk": "vmdk",
    "vpc/vhd": "vpc", "vhdx": "vhdx", "parallels": "parallels", "dmg": "dmg",
    "bochs": "bochs", "cloop": "cloop", "raw": "raw", "luks": "probe",
}


# Targets whose seeds may be longer than --max: vhdx puts its log, metadata
# and BAT regions at MiB offsets, so its smallest images are a few MiB.
TARGET_MAX = {"vhdx": 8 << 20}


def put(target, name, data, seen):
    """Write one seed (once per target and content), cut to its limit."""
    data = data[: TARGET_MAX.get(target, LIMIT)]
    key = (target, hash(data))
    if key in seen or not data:
        return
    seen.add(key)
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


LIMIT = 1 << 20


def head(path, stored_as, limit):
    """The first `limit` bytes of the decompressed file."""
    opener = open
    if stored_as.startswith("gz"):
        opener = gzip.open
    elif stored_as.startswith("bz2"):
        opener = bz2.open
    elif stored_as.startswith("xz"):
        opener = lzma.open
    with opener(path, "rb") as f:
        return f.read(limit)


def from_corpus(limit, seen):
    manifest = os.path.join(CORPUS, "MANIFEST.tsv")
    if not os.path.exists(manifest):
        print(f"seed: no corpus at {CORPUS}, skipping it", file=sys.stderr)
        return 0
    n = 0
    with open(manifest, encoding="utf-8") as f:
        cols = f.readline().rstrip("\n").split("\t")
        for line in f:
            row = dict(zip(cols, line.rstrip("\n").split("\t")))
            target = MAGIC_TARGET.get(row["magic_format"].split(" ")[0])
            if target is None:
                continue
            stored = os.path.join(CORPUS, "images", row["file"])
            # The file column names the decompressed file; the stored one
            # may carry the compression suffix.
            for cand in (stored, stored + ".gz", stored + ".bz2", stored + ".xz"):
                if os.path.exists(cand):
                    break
            else:
                continue
            data = head(cand, row["stored_as"], max(limit, *TARGET_MAX.values()))
            name = "corpus-" + re.sub(r"\.(gz|bz2|xz)$", "", row["file"]).replace("/", "_")[-120:]
            put(target, name, data, seen)
            put("probe", name, data, seen)
            n += 1
    return n


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# (target, file name, qemu-img create arguments, virtual size)
CREATED = [
    ("qcow2", "v3.qcow2", ["-f", "qcow2", "-o", "cluster_size=4096"], "4M"),
    ("qcow2", "v2.qcow2", ["-f", "qcow2", "-o", "compat=0.10,cluster_size=512"], "2M"),
    ("qcow2", "l2ext.qcow2", ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=16384"], "4M"),
    ("qcow2", "zstd.qcow2", ["-f", "qcow2", "-o", "compression_type=zstd,cluster_size=4096"], "4M"),
    ("qcow2", "refbits1.qcow2", ["-f", "qcow2", "-o", "refcount_bits=1,cluster_size=4096"], "4M"),
    ("qcow2", "backing.qcow2", ["-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw"], "4M"),
    ("qcow", "plain.qcow", ["-f", "qcow"], "4M"),
    ("qed", "plain.qed", ["-f", "qed", "-o", "cluster_size=4096,table_size=4"], "4M"),
    ("raw", "plain.raw", ["-f", "raw"], "2M"),
    ("vdi", "dynamic.vdi", ["-f", "vdi"], "4M"),
    ("vdi", "static.vdi", ["-f", "vdi", "-o", "static=on"], "2M"),
    ("vmdk", "sparse.vmdk", ["-f", "vmdk"], "4M"),
    ("vmdk", "vmdk3.vmdk", ["-f", "vmdk", "-o", "subformat=monolithicSparse,hwversion=6"], "4M"),
    ("vpc", "dynamic.vhd", ["-f", "vpc"], "4M"),
    ("vpc", "fixed.vhd", ["-f", "vpc", "-o", "subformat=fixed"], "2M"),
    ("vhdx", "dynamic.vhdx", ["-f", "vhdx", "-o", "block_size=1M,log_size=1M"], "4M"),
    ("parallels", "plain.hds", ["-f", "parallels", "-o", "cluster_size=4096"], "4M"),
]

# Compressed variants: (target, name, qemu-img convert output options).
CONVERTED = [
    ("qcow2", "compressed.qcow2", ["-c", "-O", "qcow2", "-o", "cluster_size=4096"]),
    ("qcow2", "compressed-zstd.qcow2", ["-c", "-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd"]),
    ("vmdk", "stream.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
]

WRITES = ["write -P 0xaa 0 4k", "write -P 0x55 64k 12k", "write -z 128k 64k", "write -P 0x11 1020k 8k"]


def from_qemu(limit, seen):
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        print("seed: qemu-img/qemu-io missing, skipping created images", file=sys.stderr)
        return 0
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:  # a compressible and an incompressible part
            f.write(b"qblock fuzz seed " * 4096)
            f.write(os.urandom(64 << 10))
            f.truncate(1 << 20)
        base = os.path.join(tmp, "base.raw")
        with open(base, "wb") as f:
            f.truncate(4 << 20)
        for target, name, args, size in CREATED:
            path = os.path.join(tmp, name)
            try:
                run("qemu-img", "create", "-q", *args, path, size)
                fmt = args[args.index("-f") + 1]
                for w in WRITES:
                    run("qemu-io", "-f", fmt, "-c", w, path)
                if target == "qcow2" and name not in ("backing.qcow2", "refbits1.qcow2"):
                    run("qemu-img", "snapshot", "-c", "snap1", path)
                    run("qemu-io", "-f", fmt, "-c", "write -P 0x77 0 4k", path)
            except subprocess.CalledProcessError as e:
                print(f"seed: {name}: {e.stderr.decode().strip()}", file=sys.stderr)
                continue
            data = open(path, "rb").read()
            put(target, "qemu-" + name, data, seen)
            put("probe", "qemu-" + name, data, seen)
            n += 1
        for target, name, args in CONVERTED:
            path = os.path.join(tmp, name)
            try:
                run("qemu-img", "convert", "-f", "raw", *args, src, path)
            except subprocess.CalledProcessError as e:
                print(f"seed: {name}: {e.stderr.decode().strip()}", file=sys.stderr)
                continue
            data = open(path, "rb").read()
            put(target, "qemu-" + name, data, seen)
            put("probe", "qemu-" + name, data, seen)
            n += 1
    return n


def from_libqblock(limit, seen):
    """cow seeds: QEMU dropped the format, so libqblock writes them."""
    try:
        import libqblock as qb
    except ImportError:
        print("seed: libqblock not importable, no cow seeds", file=sys.stderr)
        return 0
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in (("plain.cow", 2 << 20), ("odd.cow", (1 << 20) + 512)):
            path = os.path.join(tmp, name)
            qb.create(path, qb.CowOptions(virt_size=size))
            with qb.open(path, fmt="cow") as img:
                img.write(b"\xaa" * 4096, 0)
                img.write(b"\x55" * 12288, 65536)
                img.write(b"\x11" * 512, size - 512)
            data = open(path, "rb").read(limit)
            put("cow", "qblock-" + name, data, seen)
            put("probe", "qblock-" + name, data, seen)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=int(os.environ.get("SEED_MAX", 1 << 20)),
                    help="largest seed in bytes (bigger images are cut; default 1 MiB)")
    a = ap.parse_args()
    global LIMIT
    LIMIT = a.max
    seen = set()
    c = from_corpus(a.max, seen)
    q = from_qemu(a.max, seen)
    q += from_libqblock(a.max, seen)
    print(f"seed: {c} corpus images, {q} created images -> {os.path.join(HERE, 'corpus')}")
    for t in sorted(os.listdir(os.path.join(HERE, "corpus"))):
        print(f"  {t}: {len(os.listdir(os.path.join(HERE, 'corpus', t)))} seeds")


if __name__ == "__main__":
    main()
