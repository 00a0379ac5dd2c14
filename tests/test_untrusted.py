"""Untrusted images: qb.inspect reports the files an image names without
opening them, and open(..., references=...) decides which may be followed.
Every format that can name a file is crafted to point at /etc/passwd, through
``..``, by an absolute path and by a symlink inside the folder that points out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import libqblock as qb

from conftest import QEMU_IMG, qblock_cmd, qemu_img, qemu_info

MiB = 1 << 20
PASSWD = "/etc/passwd"


def _qcow2_backing(path: Path, name: str, fmt: str = "raw") -> None:
    """A qcow2 image naming ``name`` as its backing file, made by qemu-img without opening it (-u)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", fmt, str(path), "1M")


def _qcow2_data_file(path: Path, name: str) -> None:
    """A qcow2 image whose external data file is ``name``: made with a harmless
    placeholder name of the same length, which is then replaced in the header
    (creating it with the real name would truncate that file)."""
    placeholder = "q" * len(name)
    # data_file_raw: every cluster maps to the same offset of the data file,
    # so its bytes show. qemu-img creates a relative data file in its working
    # folder: run it in the image's.
    subprocess.run([QEMU_IMG or "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={placeholder},data_file_raw=on",
                    path.name, "1M"], cwd=path.parent, check=True, capture_output=True)
    (path.parent / placeholder).unlink()
    head = path.read_bytes()
    assert head.count(placeholder.encode()) == 1
    path.write_bytes(head.replace(placeholder.encode(), name.encode()))


def _vmdk_descriptor(path: Path, extents: list, parent: str | None = None, kind: str = "monolithicFlat") -> None:
    lines = ["# Disk DescriptorFile", "version=1", "CID=12345678",
             f"parentCID={'87654321' if parent else 'ffffffff'}", f'createType="{kind}"']
    if parent:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description"]
    lines += [f'RW 2048 {t} "{n}"' + (" 0" if t == "FLAT" else "") for t, n in extents]
    lines += ["", 'ddb.virtualHWVersion = "4"', 'ddb.geometry.cylinders = "2"', ""]
    path.write_text("\n".join(lines))


def _bundle(folder: Path, file: str) -> Path:
    folder.mkdir(exist_ok=True)
    xml = ("<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\"><Disk_Parameters>"
           "<Disk_size>2048</Disk_size></Disk_Parameters><StorageData><Storage><Start>0</Start><End>2048</End>"
           f"<Image><Type>Plain</Type><File>{file}</File></Image></Storage></StorageData></Parallels_disk_image>\n")
    p = folder / "DiskDescriptor.xml"
    p.write_text(xml)
    return p


def _backed(tmp: Path, fmt: str, name: str) -> Path:
    """An image of ``fmt`` whose backing file is ``name``, made without opening it."""
    path = tmp / f"top.{fmt}"
    if fmt == "qcow2":
        _qcow2_backing(path, name)
    elif fmt in ("qed", "qcow"):
        extra = ["-F", "raw"]  # qemu-img insists; qcow does not record it
        qemu_img("create", "-q", "-f", fmt, "-u", "-b", name, *extra, str(path), "1M")
    elif fmt == "cow":  # qemu-img no longer creates cow images
        qb.create(path, qb.CowOptions(virt_size=MiB, backing=name))
    elif fmt == "vmdk":
        (tmp / "top-flat.raw").write_bytes(bytes(MiB))
        _vmdk_descriptor(path, [("FLAT", "top-flat.raw")], parent=name)
    else:
        raise AssertionError(fmt)
    return path


BACKED = ["qcow2", "qed", "qcow", "cow", "vmdk"]


@pytest.fixture
def world(tmp):
    """tmp/img/ holds the images; tmp/outside.raw and /etc/passwd are outside it."""
    img = tmp / "img"
    img.mkdir()
    (img / "base.raw").write_bytes(b"\x11" * MiB)
    (tmp / "outside.raw").write_bytes(b"\x22" * MiB)
    os.symlink(PASSWD, img / "passwd-link")
    os.symlink(img / "base.raw", img / "base-link")
    return img


# Each escaping name, and the real path it reaches.
def _escapes(img: Path) -> dict:
    return {
        PASSWD: PASSWD,
        "../outside.raw": str((img.parent / "outside.raw").resolve()),
        "passwd-link": PASSWD,
        str(img / ".." / "outside.raw"): str((img.parent / "outside.raw").resolve()),
    }


@pytest.mark.parametrize("fmt", BACKED)
def test_inspect_reports_every_backing_name(world, fmt):
    for name, real in _escapes(world).items():
        top = _backed(world, fmt, name)
        r = qb.inspect(top)
        assert r.format is qb.Format.from_str(fmt)
        assert r.virtual_size == MiB
        backing = [x for x in r.references if x.kind == "backing"]
        assert len(backing) == 1, r.references
        b = backing[0]
        assert b.name == name
        assert b.real_path == real
        assert b.inside is False and r.confined is False
        assert b.exists is True
        assert b.absolute == name.startswith("/")
        assert b.protocol is None
        assert b.path == str(Path(name) if name.startswith("/") else world / name)
        # ... and the folder it reaches may be allowed.
        assert qb.inspect(top, allowed=[os.path.dirname(real)]).references[0].inside is True
        top.unlink()
    top = _backed(world, fmt, "base.raw")
    (b,) = [x for x in qb.inspect(top).references if x.kind == "backing"]
    assert b.inside and b.exists and not b.absolute and b.real_path == str((world / "base.raw").resolve())


def _reads(top: Path, fmt: str, byte: bytes, **kw: object) -> None:
    """Opened past the policy: the backing file's bytes show through. A vmdk's
    parent must be a vmdk, so the raw one is then refused for its content."""
    if fmt == "vmdk":
        with pytest.raises(qb.CorruptImageError, match="descriptor"):
            qb.open(top, flags=0, **kw)  # type: ignore[arg-type]
        return
    with qb.open(top, flags=0, **kw) as i:  # type: ignore[arg-type]
        assert i.read(4, 0) == byte * 4


@pytest.mark.parametrize("fmt", BACKED)
def test_confined_refuses_exactly_the_escaping_backing_files(world, fmt):
    for name in _escapes(world):
        top = _backed(world, fmt, name)
        with pytest.raises(qb.InvalidParamError, match=r"backing file '%s' refused.*outside" % name.replace(".", r"\.")):
            qb.open(top, flags=0, references="confined")
        with pytest.raises(qb.InvalidParamError, match="references='none'"):
            qb.open(top, flags=0, references="none")
        # Allowing the folder it reaches lets it through.
        real = _escapes(world)[name]
        if not real.startswith("/etc"):
            _reads(top, fmt, b"\x22", references="confined", allowed_dirs=[world.parent])
        top.unlink()
    for name in ("base.raw", "base-link", str(world / "base.raw")):
        top = _backed(world, fmt, name)
        for refs in ("any", "confined"):
            _reads(top, fmt, b"\x11", references=refs)
        # (a vmdk descriptor's own extent is refused first)
        with pytest.raises(qb.InvalidParamError, match="extent" if fmt == "vmdk" else "backing file"):
            qb.open(top, flags=0, references="none")
        if fmt != "vmdk":  # no_backing opens nothing more, so nothing is refused
            qb.open(top, flags=qb.O_NO_BACKING, references="none").close()
        top.unlink()


def test_any_keeps_todays_behaviour_across_folders(world):
    top = _backed(world, "qcow2", "../outside.raw")
    with qb.open(top, flags=0) as i:
        assert i.read(4, 0) == b"\x22" * 4
        assert i.info().backing_filename == "../outside.raw"


def test_policy_applies_to_the_whole_chain(world):
    """A middle image inside the folder whose own backing file escapes is refused too."""
    _qcow2_backing(world / "mid.qcow2", "../outside.raw")
    _qcow2_backing(world / "top.qcow2", "mid.qcow2", fmt="qcow2")
    with pytest.raises(qb.InvalidParamError, match="'../outside.raw' refused"):
        qb.open(world / "top.qcow2", flags=0, references="confined")
    # Judged against the top image's folder, not the middle one's.
    sub = world / "sub"
    sub.mkdir()
    _qcow2_backing(sub / "mid.qcow2", "../base.raw")
    _qcow2_backing(sub / "top.qcow2", "mid.qcow2", fmt="qcow2")
    with qb.open(sub / "top.qcow2", flags=0, references="confined", allowed_dirs=[world]) as i:
        assert i.read(4, 0) == b"\x11" * 4
    with pytest.raises(qb.InvalidParamError, match="'../base.raw' refused"):
        qb.open(sub / "top.qcow2", flags=0, references="confined")


def test_qcow2_data_file_reported_and_confined(world):
    for name, real in _escapes(world).items():
        top = world / "top.qcow2"
        _qcow2_data_file(top, name)
        r = qb.inspect(top)
        (d,) = r.references
        assert (d.kind, d.name, d.real_path, d.inside, d.exists) == ("data_file", name, real, False, True)
        assert r.features["data-file"] == name
        with pytest.raises(qb.InvalidParamError, match="external data file '%s' refused" % name.replace(".", r"\.")):
            qb.open(top, flags=0, references="confined")
        with pytest.raises(qb.InvalidParamError, match="external data file"):
            qb.open(top, flags=0, references="none")
        top.unlink()
    top = world / "top.qcow2"
    _qcow2_data_file(top, "base.raw")
    (d,) = qb.inspect(top).references
    assert d.inside and d.path == str(world / "base.raw")
    with qb.open(top, flags=0, references="confined") as i:
        assert i.read(4, 0) == b"\x11" * 4  # relative to the image's folder


def test_qcow2_report_agrees_with_qemu_img_info(world):
    for name in ("../outside.raw", PASSWD, "base.raw"):
        top = world / "top.qcow2"
        _qcow2_backing(top, name)
        q = qemu_info(str(top))
        (b,) = qb.inspect(top).references
        assert b.name == q["backing-filename"]
        assert b.path == q["full-backing-filename"]
        assert b.format is qb.Format.from_str(q["backing-filename-format"])
        top.unlink()
        _qcow2_data_file(top, name)
        q = qemu_info(str(top))
        (d,) = qb.inspect(top).references
        assert d.name == q["format-specific"]["data"]["data-file"]
        top.unlink()


def test_vmdk_extents_reported_and_confined(world):
    (world / "ext.raw").write_bytes(bytes(MiB))
    for name, real in _escapes(world).items():
        desc = world / "d.vmdk"
        _vmdk_descriptor(desc, [("FLAT", "ext.raw"), ("FLAT", name)])
        r = qb.inspect(desc)
        assert r.format is qb.Format.VMDK and r.virtual_size == 2 * MiB
        assert [(x.kind, x.name, x.inside) for x in r.references] == [("extent", "ext.raw", True),
                                                                       ("extent", name, False)]
        assert r.references[1].real_path == real
        with pytest.raises(qb.InvalidParamError, match="extent '%s' refused" % name.replace(".", r"\.")):
            qb.open(desc, flags=0, references="confined")
        with pytest.raises(qb.InvalidParamError, match="extent 'ext.raw' refused"):
            qb.open(desc, flags=0, references="none")


def test_vmdk_two_gb_sparse_extents(world):
    """A twoGbMaxExtentSparse image made by qemu-img, its descriptor edited to
    name an extent outside the folder: inspect reports the sparse extents
    (their line's size: they are not opened), confined refuses the escaping one."""
    src = world / "split.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(src), "3G")
    text = src.read_text()
    r = qb.inspect(src)
    assert [x.kind for x in r.references] == ["extent", "extent"] and all(x.inside for x in r.references)
    assert r.virtual_size == 3 << 30
    with qb.open(src, flags=0, references="confined") as i:
        assert i.virt_size == 3 << 30
    os.rename(world / "split-s002.vmdk", world.parent / "split-s002.vmdk")
    src.write_text(text.replace('"split-s002.vmdk"', '"../split-s002.vmdk"'))
    r = qb.inspect(src)
    assert [(x.name, x.inside) for x in r.references] == [("split-s001.vmdk", True), ("../split-s002.vmdk", False)]
    with pytest.raises(qb.InvalidParamError, match="extent '../split-s002.vmdk' refused"):
        qb.open(src, flags=0, references="confined")
    with qb.open(src, flags=0) as i:  # "any": as before
        assert i.virt_size == 3 << 30


def test_parallels_bundle_symlink_out(world):
    bundle = world / "disk.hdd"
    _bundle(bundle, "a.hds")
    os.symlink(world.parent / "outside.raw", bundle / "a.hds")
    r = qb.inspect(bundle / "DiskDescriptor.xml")
    assert r.format is qb.Format.PARALLELS and r.virtual_size == MiB
    (e,) = r.references
    assert (e.kind, e.name, e.inside, e.exists) == ("extent", "a.hds", False, True)
    assert e.real_path == str((world.parent / "outside.raw").resolve())
    with pytest.raises(qb.InvalidParamError, match="extent 'a.hds' refused"):
        qb.open(bundle / "DiskDescriptor.xml", flags=0, references="confined")
    with qb.open(bundle / "DiskDescriptor.xml", flags=0, references="confined", allowed_dirs=[world.parent]) as i:
        assert i.read(4, 0) == b"\x22" * 4


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_inspect_opens_nothing_a_fifo_proves_it(world):
    """Every reference points at a FIFO: opening one would block forever.
    inspect returns at once, and a confined open refuses without opening."""
    fifo = world.parent / "fifo"
    os.mkfifo(fifo)
    os.mkfifo(world / "fifo-in")
    cases = []
    top = world / "backed.qcow2"
    _qcow2_backing(top, str(fifo))
    cases.append((top, "backing"))
    data = world / "data.qcow2"
    _qcow2_data_file(data, str(fifo))
    cases.append((data, "data_file"))
    desc = world / "d.vmdk"
    _vmdk_descriptor(desc, [("FLAT", str(fifo)), ("SPARSE", "fifo-in")], kind="twoGbMaxExtentSparse")
    cases.append((desc, "extent"))
    bundle = _bundle(world / "b.hdd", "x.hds")
    os.symlink(fifo, world / "b.hdd" / "x.hds")
    cases.append((bundle, "extent"))
    for path, kind in cases:
        r = subprocess.run([*qblock_cmd(), "inspect", "--output=json", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr  # a reference escapes
        refs = json.loads(r.stdout)["references"]
        assert kind in [x["kind"] for x in refs] and all(x["exists"] for x in refs)
        code = (f"import libqblock as qb\ntry:\n qb.open({str(path)!r}, flags=0, references='confined')\n"
                "except qb.InvalidParamError as e:\n print('refused', e.message)\n")
        out = _run(code).stdout
        assert out.startswith("refused") and "refused" in out[8:], out


@pytest.mark.parametrize("name,proto", [
    ('json:{"file.driver":"file","file.filename":"/etc/passwd"}', "json"),
    ("nbd://127.0.0.1:10809/export", "nbd"),
    ("nbd:127.0.0.1:10809", "nbd"),
    ("http://example.invalid/disk.raw", "http"),
])
def test_protocol_backing_names_are_refused_by_default(world, name, proto):
    top = world / "top.qcow2"
    _qcow2_backing(top, name)
    (b,) = qb.inspect(top).references
    assert (b.protocol, b.path, b.real_path, b.inside, b.exists) == (proto, None, None, False, False)
    assert b.location == name
    with pytest.raises(qb.UnsupportedError, match=r"protocol prefix \('%s:'\).*allow_protocols" % proto):
        qb.open(top, flags=0)
    # Allowed, it is a protocol location, which nothing serves yet.
    with pytest.raises(qb.UnsupportedError, match=f"the {proto} protocol is not supported yet"):
        qb.open(top, flags=0, allow_protocols=True)
    with pytest.raises(qb.InvalidParamError, match="refused"):
        qb.open(top, flags=0, references="confined", allow_protocols=True)
    # info() still reports it, and no_backing still opens.
    with qb.open(top, flags=qb.O_NO_BACKING) as i:
        assert i.info().backing_filename == name


def test_file_prefix_is_dropped_and_resolves_in_the_images_folder(world):
    top = world / "top.qcow2"
    _qcow2_backing(top, "file:base.raw")
    (b,) = qb.inspect(top).references
    assert (b.protocol, b.path, b.inside) == (None, str(world / "base.raw"), True)
    with qb.open(top, flags=0, references="confined") as i:
        assert i.read(4, 0) == b"\x11" * 4
    top.unlink()
    _qcow2_backing(top, "file:" + PASSWD)
    (b,) = qb.inspect(top).references
    assert (b.absolute, b.path, b.inside) == (True, PASSWD, False)
    with pytest.raises(qb.InvalidParamError, match="refused"):
        qb.open(top, flags=0, references="confined")


def test_relative_names_resolve_against_the_images_folder_not_the_cwd(world, monkeypatch):
    sub = world / "deep"
    sub.mkdir()
    (sub / "base.raw").write_bytes(b"\x33" * MiB)
    _qcow2_backing(sub / "top.qcow2", "base.raw")
    _qcow2_data_file(sub / "data.qcow2", "base.raw")
    (sub / "ext.raw").write_bytes(b"\x44" * MiB)
    _vmdk_descriptor(sub / "d.vmdk", [("FLAT", "ext.raw")])
    monkeypatch.chdir(world)  # world/base.raw holds other bytes
    for name, byte in (("top.qcow2", 0x33), ("data.qcow2", 0x33), ("d.vmdk", 0x44)):
        with qb.open(Path("deep") / name, flags=0, references="confined") as i:
            assert i.read(2, 0) == bytes([byte]) * 2, name
        r = qb.inspect(Path("deep") / name)
        assert all(x.inside for x in r.references)


def test_image_without_references(world):
    qb.create(world / "plain.qcow2", qb.Qcow2Options(virt_size=MiB))
    r = qb.inspect(world / "plain.qcow2")
    assert r.references == () and r.confined
    assert r.features["encrypted"] is False and r.features["compat"] == "1.1"
    qb.open(world / "plain.qcow2", flags=0, references="none").close()
    r = qb.inspect(world / "base.raw", fmt="raw")
    assert r.format is qb.Format.RAW and r.virtual_size == MiB and r.references == ()


def test_bad_arguments(world):
    with pytest.raises(qb.InvalidParamError, match="references must be"):
        qb.open(world / "base.raw", references="some")  # type: ignore[arg-type]
    with pytest.raises(qb.InvalidParamError, match="allowed_dirs needs"):
        qb.open(world / "base.raw", allowed_dirs=[world])
    with pytest.raises(qb.CorruptImageError):
        (world / "bad.qcow2").write_bytes(b"QFI\xfb" + bytes(60))
        qb.inspect(world / "bad.qcow2")


def test_cli_inspect_human_and_json(world):
    top = _backed(world, "qcow2", PASSWD)
    r = subprocess.run([*qblock_cmd(), "inspect", str(top)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "file format: qcow2" in r.stdout
    assert f"backing: '{PASSWD}' -> {PASSWD} (absolute, OUTSIDE, exists)" in r.stdout
    r = subprocess.run([*qblock_cmd(), "inspect", "--allowed", "/etc", "--output=json", str(top)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["format"] == "qcow2" and j["confined"] is True
    assert j["references"][0]["name"] == PASSWD and j["references"][0]["inside"] is True


def test_vpc_parent_locators(world):
    """A differencing VHD whose locator climbs out of the folder: inspect lists
    every candidate the driver would try (opening none), confined refuses the
    escaping one and opens the child only with an allowed parent."""
    from test_vpc import _make_child

    parent = world.parent / "parent.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", str(parent), "4M")
    child = _make_child(world, parent.read_bytes()[68:84], locator="..\\parent.vhd")
    r = qb.inspect(child)
    assert r.format is qb.Format.VPC
    cands = {x.name: x for x in r.references}
    assert set(cands) == {"../parent.vhd", "parent.vhd"}
    assert all(x.kind == "parent_locator" for x in r.references)
    assert (cands["../parent.vhd"].inside, cands["../parent.vhd"].exists) == (False, True)
    assert (cands["parent.vhd"].inside, cands["parent.vhd"].exists) == (True, False)
    with pytest.raises(qb.InvalidParamError, match=r"parent locator '\.\./parent\.vhd' refused"):
        qb.open(child, flags=0, references="confined")
    with pytest.raises(qb.InvalidParamError, match="references='none'"):
        qb.open(child, flags=0, references="none")
    for kw in ({}, {"references": "confined", "allowed_dirs": [world.parent]}):
        with qb.open(child, flags=0, **kw) as i:  # type: ignore[arg-type]
            assert i.info().backing_location is not None
    # A symlink beside the child that points out is refused the same way.
    os.symlink(parent, world / "parent.vhd")
    (c,) = [x for x in qb.inspect(child).references if x.name == "parent.vhd"]
    assert (c.inside, c.exists, c.real_path) == (False, True, str(parent.resolve()))
    with pytest.raises(qb.InvalidParamError, match="refused"):
        qb.open(child, flags=0, references="confined")
