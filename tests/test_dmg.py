"""dmg (Apple UDIF), read-only. qemu-img cannot create dmg images, so the
oracles are the corpus images (QEMU's decoded hashes and `qemu-img convert
-O raw` of them), UDIF images built byte by byte here (data fork, mish
blocks in an XML property list or a resource fork, koly trailer) with a
bytearray model of the disk, and `qemu-img convert`/`info` of those. Chunk
types QEMU cannot read in this build (bzip2 needs its dmg-bz2 module, ADC it
never reads) are checked against the model only.

Opening a dmg image writable is refused with UnsupportedError (as QEMU's
dmg refuses read-write use), so no write lock is taken; writes through a
read-only open are refused too and leave the file unchanged.
"""

from __future__ import annotations

import base64
import bz2
import struct
import threading
import zlib
from pathlib import Path
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libqblock as qb

from childrun import run_result_child
from conftest import CORPUS, qemu_img, qemu_info, qemu_io, qemu_map, qemu_raw_bytes

KiB, MiB = 1024, 1024 * 1024
S = 512

UDZE, UDRW, UDIG, UDCO, UDZO, UDBZ, ULFO, UDCM, UDLE = (
    0, 1, 2, 0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x7FFFFFFE, 0xFFFFFFFF,
)

Chunk = Tuple[int, int, bytes]  # type, sectors, stored bytes


# --- building UDIF images ---------------------------------------------------------


def pattern(n: int, seed: int) -> bytes:
    return bytes(((i * 31 + seed) ^ (i >> 8)) & 0xFF for i in range(n))


def adc_encode(data: bytes) -> bytes:
    """ADC of `data`: literal runs, and runs of a repeated byte as copies from distance 1."""
    out = bytearray()
    i = 0
    while i < len(data):
        run = 1
        while i + run < len(data) and data[i + run] == data[i] and run < 1000:
            run += 1
        if run >= 5 and i > 0 and data[i - 1] == data[i]:
            n = min(run, 67)
            out += bytes([0x40 | (n - 4), 0, 0])  # three-byte copy, distance 1
            i += n
            continue
        lit = data[i : i + min(128, max(1, run))]
        out += bytes([0x80 | (len(lit) - 1)]) + lit
        i += len(lit)
    return bytes(out)


def zero(sectors: int) -> Tuple[Chunk, bytes]:
    return (UDZE, sectors, b""), bytes(sectors * S)


def ignore(sectors: int) -> Tuple[Chunk, bytes]:
    return (UDIG, sectors, b""), bytes(sectors * S)


def raw(data: bytes) -> Tuple[Chunk, bytes]:
    return (UDRW, len(data) // S, data), data


def zl(data: bytes) -> Tuple[Chunk, bytes]:
    return (UDZO, len(data) // S, zlib.compress(data)), data


def bz(data: bytes) -> Tuple[Chunk, bytes]:
    return (UDBZ, len(data) // S, bz2.compress(data)), data


def adc(data: bytes) -> Tuple[Chunk, bytes]:
    return (UDCO, len(data) // S, adc_encode(data)), data


def mish(first: int, chunks: List[Chunk], data_at: int, base: int = 0) -> bytes:
    """A mish block; its chunk offsets are relative to `base` (its DataOffset)."""
    m = bytearray(204)
    m[0:4] = b"mish"
    struct.pack_into(">IQQQ", m, 4, 1, first, sum(c[1] for c in chunks), base)
    struct.pack_into(">I", m, 200, len(chunks) + 1)
    sector, off = 0, data_at - base
    for ty, n, stored in list(chunks) + [(UDLE, 0, b"")]:
        m += struct.pack(">IIQQQQ", ty, 0, sector, n, off, len(stored))
        sector += n
        off += len(stored)
    return bytes(m)


def trailer(data_len: int, rsrc: Tuple[int, int], xml: Tuple[int, int], sectors: int, fork_at: int = 0) -> bytes:
    t = bytearray(512)
    t[0:4] = b"koly"
    struct.pack_into(">III", t, 4, 4, 512, 1)
    struct.pack_into(">QQ", t, 0x18, fork_at, data_len)
    struct.pack_into(">QQ", t, 0x28, *rsrc)
    struct.pack_into(">QQ", t, 0xD8, *xml)
    struct.pack_into(">I", t, 0x1E8, 1)
    struct.pack_into(">Q", t, 0x1EC, sectors)
    return bytes(t)


def build(parts: List[List[Chunk]], form: str = "xml", sectors: int = -1, prefix: bytes = b"") -> bytes:
    """A UDIF image: one mish block (partition) per element of `parts`. With
    a `prefix`, the data fork starts after it, and each mish block's
    DataOffset is where its partition's data starts in the fork."""
    data = bytearray()
    minis = []
    first = 0
    for p in parts:
        minis.append(mish(first, p, len(data), len(data) if prefix else 0))
        for _, _, stored in p:
            data += stored
        first += sum(c[1] for c in p)
    total = first if sectors < 0 else sectors
    data_len = len(data)
    if form == "xml":
        body = "".join(
            "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n"
            f"\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n{base64.encodebytes(m).decode()}\t\t\t\t</data>\n"
            f"\t\t\t\t<key>Name</key>\n\t\t\t\t<string>partition {k}</string>\n\t\t\t</dict>\n"
            for k, m in enumerate(minis)
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0">\n<dict>\n'
            "\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n"
            + body
            + "\t\t</array>\n\t\t<key>plst</key>\n\t\t<array>\n\t\t\t<dict>\n\t\t\t\t<key>Data</key>\n"
            "\t\t\t\t<data>AAAAAAAAAAA=</data>\n\t\t\t</dict>\n\t\t</array>\n\t</dict>\n</dict>\n</plist>\n"
        ).encode()
        at = len(prefix) + len(data)
        data += xml
        data += trailer(data_len, (0, 0), (at, len(xml)), total, len(prefix))
    else:
        area = b"".join(struct.pack(">I", len(m)) + m for m in minis) + struct.pack(">I", 4) + b"plst"
        fork = struct.pack(">IIII", 256, 0, len(area), 0).ljust(256, b"\0") + area
        at = len(prefix) + len(data)
        data += fork
        data += trailer(data_len, (at, len(fork)), (0, 0), total, len(prefix))
    return prefix + bytes(data)


def disk(spec: List[List[Tuple[Chunk, bytes]]], form: str = "xml") -> Tuple[bytes, bytes]:
    """Image bytes and the model of its disk."""
    parts = [[c for c, _ in p] for p in spec]
    model = b"".join(plain for p in spec for _, plain in p)
    return build(parts, form), model


def qemu_spec() -> List[List[Tuple[Chunk, bytes]]]:
    """Chunk types every QEMU reads: zero, ignore, raw, zlib; three partitions."""
    return [
        [raw(pattern(2 * S, 1)), zero(3)],
        [zl(pattern(64 * KiB, 2)), ignore(2), zl(bytes(8 * KiB) + b"\x01" * S), raw(pattern(S, 3))],
        [zero(100), zl(pattern(128 * KiB, 4))],
    ]


def full_spec() -> List[List[Tuple[Chunk, bytes]]]:
    """Every chunk type we can encode here (lzfse is covered by the Rust tests)."""
    half = pattern(3 * KiB, 5) + b"\xab" * KiB
    return qemu_spec() + [[bz(pattern(20 * KiB, 6)), adc(half), adc(pattern(2 * S, 7))]]


def write(tmp: Path, name: str, b: bytes) -> Path:
    p = tmp / name
    p.write_bytes(b)
    return p


def read_all(p: Path) -> bytes:
    with qb.open(p, flags=0) as img:
        return img.read(img.virt_size, 0)


# --- corpus images ------------------------------------------------------------------

CORPUS_DMG = ["dfvfs/hfsplus_zlib.dmg", "imhex-patterns/dmg.hexpat.dmg", "qemu/simple-dmg.dmg"]


@pytest.mark.parametrize("name", CORPUS_DMG)
def test_corpus_image_reads_as_qemu_reads_it(tmp, name):
    src = CORPUS / "images" / name
    if not src.exists():
        pytest.skip(f"corpus image {name} not found")
    p = write(tmp, Path(name).name, src.read_bytes())
    want = qemu_raw_bytes(str(p), tmp)
    qi = qemu_info(str(p))
    assert qb.probe(p) is qb.Format.DMG
    with qb.open(p, flags=0) as img:
        info = img.info()
        assert qi["format"] == "dmg" == info.format.value
        assert qi["virtual-size"] == img.virt_size == len(want)
        assert info.backing_location is None and info.cluster_size is None
        assert img.read(len(want), 0) == want
        # Odd offsets and lengths, crossing chunks, many inside one chunk.
        for off, n in [(1, 1), (511, 2), (4095, 8193), (len(want) - 1, 1), (len(want) // 3, 70_001)]:
            n = min(n, len(want) - off)
            assert img.read(n, off) == want[off : off + n], (off, n)
        ext = list(img.map())
        assert sum(e.length for e in ext) == len(want) and all(e.present for e in ext)
        for e in ext:
            if e.zero:
                assert want[e.offset : e.offset + e.length] == bytes(e.length)


# --- images built here, against the model and qemu-img ------------------------------


@pytest.mark.parametrize("form", ["xml", "rsrc"])
def test_built_image_reads_like_qemu_and_the_model(tmp, form):
    b, model = disk(qemu_spec(), form)
    p = write(tmp, f"q-{form}.dmg", b)
    assert qemu_raw_bytes(str(p), tmp) == model
    assert qemu_info(str(p))["virtual-size"] == len(model)
    assert read_all(p) == model


@pytest.mark.parametrize("form", ["xml", "rsrc"])
def test_data_fork_and_mish_offsets_add_up_as_in_qemu(tmp, form):
    # The data fork after 1000 bytes of something else, each partition's
    # chunk offsets relative to its mish block's DataOffset.
    spec = qemu_spec()
    parts = [[c for c, _ in p] for p in spec]
    model = b"".join(plain for p in spec for _, plain in p)
    p = write(tmp, f"prefix-{form}.dmg", build(parts, form, prefix=b"\xee" * 1000))
    assert qemu_raw_bytes(str(p), tmp) == model
    assert read_all(p) == model
    with qb.open(p, flags=0) as img:
        # The first stored chunk is at the start of the data fork.
        assert next(iter(img.map())).file_offset == 1000


@pytest.mark.parametrize("form", ["xml", "rsrc"])
def test_every_chunk_type_decodes(tmp, form):
    b, model = disk(full_spec(), form)
    p = write(tmp, f"all-{form}.dmg", b)
    assert read_all(p) == model


def test_block_status_follows_the_chunks(tmp):
    spec = [[zero(4), raw(pattern(2 * S, 1)), raw(pattern(S, 2)), zl(pattern(4 * S, 3)), ignore(2)]]
    b, model = disk(spec)
    p = write(tmp, "map.dmg", b)
    with qb.open(p, flags=0) as img:
        m = [(e.offset, e.length, e.data, e.zero, e.present, e.depth, e.file_offset) for e in img.map()]
    assert m == [
        (0, 4 * S, False, True, True, 0, None),
        (4 * S, 3 * S, True, False, True, 0, 0),  # two stored chunks, contiguous in the file
        (7 * S, 4 * S, True, False, True, 0, None),  # compressed
        (11 * S, 2 * S, False, True, True, 0, None),
    ]
    # QEMU has no block status for dmg: it reports one data extent. Ours
    # differs only in saying where zeroes are, and the bytes agree.
    q = qemu_map(str(p))
    assert [(e["start"], e["length"], e["data"]) for e in q] == [(0, len(model), True)]
    assert qemu_raw_bytes(str(p), tmp) == model


def test_huge_zero_chunk_is_cheap(tmp):
    # One zero chunk of 1 TiB: no buffer is sized by it.
    n = (1 << 40) // S
    p = write(tmp, "huge.dmg", build([[(UDZE, n, b"")]]))
    assert qemu_info(str(p))["virtual-size"] == 1 << 40
    with qb.open(p, flags=0) as img:
        assert img.virt_size == 1 << 40
        assert img.read(MiB, (1 << 40) - MiB) == bytes(MiB)
        assert [(e.length, e.zero) for e in img.map()] == [(1 << 40, True)]


def test_sectors_without_a_chunk_fail_to_read_only_there(tmp):
    # The trailer claims 8 sectors more than the map describes; QEMU fails
    # to read them too.
    spec = [[raw(pattern(4 * S, 1))]]
    parts = [[c for c, _ in p] for p in spec]
    p = write(tmp, "gap.dmg", build(parts, sectors=12))
    with qb.open(p, flags=0) as img:
        assert img.virt_size == 12 * S
        assert img.read(4 * S, 0) == pattern(4 * S, 1)
        with pytest.raises(qb.CorruptImageError):
            img.read(S, 4 * S)
    assert qemu_img("convert", "-O", "raw", str(p), str(tmp / "out.raw"), check=False).returncode != 0


# --- random reads against the model -------------------------------------------------


@pytest.fixture(scope="module")
def full_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("dmg")
    b, model = disk(full_spec())
    p = d / "full.dmg"
    p.write_bytes(b)
    img = qb.open(p, flags=0)
    yield img, model
    img.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_reads_match_the_model(full_image, data):
    img, model = full_image
    off = data.draw(st.integers(0, len(model) - 1))
    n = data.draw(st.integers(1, min(300 * KiB, len(model) - off)))
    assert img.read(n, off) == model[off : off + n]


def test_concurrent_reads_share_one_image(full_image):
    img, model = full_image
    errors: List[str] = []

    def worker(seed: int) -> None:
        x = seed
        for _ in range(150):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            off = x % len(model)
            n = min(1 + x % 9000, len(model) - off)
            if img.read(n, off) != model[off : off + n]:
                errors.append(f"{seed}: {off}+{n}")

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


# --- read-only: writable opens, writes and creation are refused ---------------------


def test_writable_open_is_refused_and_writes_change_nothing(tmp):
    b, model = disk(qemu_spec())
    p = write(tmp, "ro.dmg", b)
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(p)  # the default flags ask for O_RDWR
    assert "read-only" in ei.value.message
    with qb.open(p, flags=0) as img:
        with pytest.raises(qb.QBlockError):
            img.write(b"x", 0)
    assert p.read_bytes() == b


def test_creating_is_unsupported(tmp):
    class DmgOptions(qb.ImageOptions):
        format = qb.Format.DMG

    with pytest.raises(qb.UnsupportedError):
        qb.create(tmp / "new.dmg", DmgOptions(MiB))
    assert not (tmp / "new.dmg").exists()


def test_dmg_as_a_backing_file(tmp):
    b, model = disk(qemu_spec())
    base = write(tmp, "base.dmg", b)
    top = tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "dmg", str(top))
    qemu_io(str(top), "write -P 0x5c 1000 3000", "write -P 0x5d 70000 100")
    want = qemu_raw_bytes(str(top), tmp)
    model = bytearray(model)
    model[1000:4000] = b"\x5c" * 3000
    model[70000:70100] = b"\x5d" * 100
    assert want == bytes(model)
    with qb.open(top, flags=0) as img:
        assert img.info().backing_format is qb.Format.DMG
        assert img.read(img.virt_size, 0) == want
        assert img.block_status(200 * KiB, 4096).depth == 1
    # Writing to the overlay works; the dmg stays as it was.
    with qb.open(top) as img:
        img.write(b"\x77" * 5000, 123_457)
        model[123_457:128_457] = b"\x77" * 5000
    assert qemu_raw_bytes(str(top), tmp) == bytes(model)
    assert base.read_bytes() == b


# --- hostile images, each opened in a limited child process -------------------------

TIMEOUT = 20
ADDRESS_SPACE = 1 << 30
MAX_RSS_KIB = 256 * 1024

CHILD = r"""
import json, resource, sys
p = json.loads(sys.argv[1])
out = {"exc": None, "msg": None, "stage": "import"}
try:
    import libqblock as qb
    out["stage"] = "open"
    img = qb.open(p["path"], fmt=p["fmt"], flags=0)
    out["stage"] = "info"
    img.info()
    v = img.virt_size
    for off in range(0, v, max(1 << 20, v // 64)):
        out["stage"] = f"read {off}"
        img.read(min(1 << 20, v - off), off)
    out["stage"] = "map"
    for _ in img.map():
        pass
    img.close()
    out["stage"] = None
except BaseException as e:
    out["exc"] = type(e).__name__
    out["msg"] = str(e)[:400]
out["rss_kib"] = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))  # ru_maxrss would inherit the parent's peak
print("RESULT " + json.dumps(out), flush=True)
"""



def run_child(path: Path, fmt: str = "dmg") -> dict:
    params = {"path": str(path), "fmt": fmt}
    res = run_result_child(CHILD, params, path.name, timeout=TIMEOUT, address_space=ADDRESS_SPACE)
    assert res["rss_kib"] < MAX_RSS_KIB, res
    return res


def _base() -> bytes:
    return build([[c for c, _ in p] for p in qemu_spec()])


def _koly(field: int, fmt: str, value: int) -> bytes:
    b = bytearray(_base())
    struct.pack_into(fmt, b, len(b) - 512 + field, value)
    return bytes(b)


def _entry(k: int, field: int, value: int) -> bytes:
    """Patch field `field` of chunk entry k of the first partition."""
    spec = qemu_spec()
    parts = [[c for c, _ in p] for p in spec]
    b = bytearray(build(parts))
    t = b[-512:]
    xo, xl = struct.unpack_from(">QQ", t, 0xD8)
    xml = bytes(b[xo : xo + xl]).decode()
    a = xml.index("<data>") + 6
    e = xml.index("</data>", a)
    m = bytearray(base64.b64decode("".join(xml[a:e].split())))
    struct.pack_into(">Q", m, 204 + 40 * k + field, value)
    new = (xml[:a] + "\n" + base64.encodebytes(bytes(m)).decode() + xml[e:]).encode()
    data_len = struct.unpack_from(">Q", t, 0x20)[0]
    sectors = struct.unpack_from(">Q", t, 0x1EC)[0]
    return bytes(b[:xo]) + new + trailer(data_len, (0, 0), (xo, len(new)), sectors)


def _xml(body: str, sectors: int = 8) -> bytes:
    x = body.encode()
    return x + trailer(0, (0, 0), (0, len(x)), sectors)


def _corrupt_zlib() -> bytes:
    c = bytearray(zlib.compress(pattern(8 * S, 9)))
    c[len(c) // 2] ^= 0xFF
    c[-1] ^= 0xFF
    return build([[(UDZO, 8, bytes(c))]])


def _mish_b64(m: bytes) -> str:
    return "<key>blkx</key><array><dict><data>" + base64.b64encode(m).decode() + "</data></dict></array>"


HOSTILE = {
    "trailer-only-300-bytes": lambda: _base()[-300:],
    "no-koly-signature": lambda: _base()[:-512] + b"KOLY" + _base()[-508:],
    "data-fork-past-trailer": lambda: _koly(0x18, ">Q", 1 << 40),
    "resource-fork-huge": lambda: _koly(0x30, ">Q", (1 << 64) - 1),
    "xml-offset-past-trailer": lambda: _koly(0xD8, ">Q", 1 << 50),
    "xml-length-huge": lambda: _koly(0xE0, ">Q", (1 << 63)),
    "no-block-map": lambda: _koly(0xE0, ">Q", 0),
    "sector-count-huge": lambda: _koly(0x1EC, ">Q", (1 << 64) - 1),
    "xml-without-blkx": lambda: _xml("<plist><dict><key>plst</key><array/></dict></plist>"),
    "blkx-array-not-closed": lambda: _xml("<key>blkx</key><array><dict><data>bWlzaA==</data>"),
    "blkx-not-base64": lambda: _xml("<key>blkx</key><array><data>!!!!</data></array>"),
    "blkx-not-mish": lambda: _xml(_mish_b64(b"MISH" + bytes(300))),
    "mish-claims-too-many-chunks": lambda: _xml(_mish_b64(b"mish" + bytes(196) + struct.pack(">I", 10**6))),
    "chunk-sector-overflow": lambda: _entry(0, 8, (1 << 64) - 1),
    "chunk-sector-count-over-cap": lambda: _entry(0, 16, 64 * MiB // S + 1),
    "chunk-length-over-cap": lambda: _entry(0, 32, 64 * MiB + 1),
    "chunk-data-past-eof": lambda: _entry(0, 24, 1 << 40),
    "raw-chunk-too-short": lambda: _entry(0, 32, 100),
    "chunks-overlap": lambda: _entry(1, 8, 1),
    "zlib-stream-corrupt": _corrupt_zlib,
    "zlib-stream-too-short": lambda: build([[(UDZO, 8, zlib.compress(pattern(4 * S, 1)))]]),
    "bzip2-stream-garbage": lambda: build([[(UDBZ, 8, b"BZh91AY&SY" + bytes(40))]]),
    "adc-copy-before-output": lambda: build([[(UDCO, 1, b"\x00\x05" * 10)]]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_corrupt(tmp, name):
    p = write(tmp, f"{name}.dmg", HOSTILE[name]())
    res = run_child(p)
    assert res["exc"] == "CorruptImageError", f"{name}: {res}"


def test_largest_chunk_decodes_once_with_bounded_memory(tmp):
    # QEMU's cap: a chunk decodes to at most 64 MiB. The child reads it in
    # 1 MiB steps (decoded once into its thread's cache) within RLIMIT_AS.
    n = 64 * MiB // S
    p = write(tmp, "big-chunk.dmg", build([[(UDZO, n, zlib.compress(bytes(64 * MiB), 1))]]))
    res = run_child(p)
    assert res["exc"] is None, res


def test_zlib_bomb_stops_at_the_chunk_size(tmp):
    # The stream inflates to 256 MiB; the chunk holds 64 MiB.
    n = 64 * MiB // S
    p = write(tmp, "bomb.dmg", build([[(UDZO, n, zlib.compress(bytes(256 * MiB), 1))]]))
    res = run_child(p)
    assert res["exc"] == "CorruptImageError", res
