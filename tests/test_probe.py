"""Format probing, and the raw-probing risk of the seed: a raw backing file
with a recorded format is never re-probed, whatever its first sector says."""

from __future__ import annotations

import pytest

import libqblock as qb

from conftest import qemu_img, qemu_raw_bytes


def _qcow2_header_bytes(tmp) -> bytes:
    """A real qcow2 header naming a backing file the 'guest' chose."""
    secret = tmp / "secret.raw"
    secret.write_bytes(b"SECRET" * 1000)
    evil = tmp / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil), "1M")
    return evil.read_bytes()[:4096]


def test_raw_backing_with_recorded_format_is_never_probed(tmp):
    # The guest wrote a qcow2 header into the first sector of its raw disk.
    base = tmp / "base.raw"
    qb.create(base, qb.RawOptions(1 << 20))
    header = _qcow2_header_bytes(tmp)
    with qb.open(base, fmt="raw") as img:
        img.write(header, 0)
    assert qb.probe(base) is qb.Format.QCOW2  # a probe would be fooled ...
    top = tmp / "top.qcow2"
    qb.create(top, qb.Qcow2Options(0, backing=base, backing_fmt=qb.Format.RAW))
    with qb.open(top, flags=0) as img:
        info = img.info()
        assert info.backing_format is qb.Format.RAW
        assert img.virt_size == 1 << 20
        # ... but the recorded format wins: the guest's bytes, not the secret file.
        assert img.read(4096, 0) == header
        assert b"SECRET" not in img.read(1 << 20, 0)
    assert qemu_raw_bytes(str(top), tmp)[:4096] == header


def test_probe_picks_qcow2_and_raw(tmp):
    q = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(q), "1M")
    r = tmp / "a.raw"
    qemu_img("create", "-f", "raw", str(r), "1M")
    assert qb.probe(q) is qb.Format.QCOW2
    assert qb.probe(r) is qb.Format.RAW
    with qb.open(q, flags=0) as img:
        assert img.format is qb.Format.QCOW2


@pytest.mark.parametrize(
    "fmt,opts",
    [
        ("qcow", []),
        ("qed", []),
        ("vdi", []),
        ("vmdk", []),
        ("vpc", []),
        ("vpc", ["-o", "subformat=fixed"]),
        ("vhdx", []),
        ("parallels", []),
        ("luks", ["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"]),
    ],
)
def test_every_qemu_format_is_probed_and_served_or_refused(tmp, fmt, opts):
    p = tmp / f"img.{fmt}"
    qemu_img("create", "-f", fmt, *opts, str(p), "4M")
    assert qb.probe(p).value == fmt
    if qb.Format.from_str(fmt) in qb.supported_formats():
        with qb.open(p, flags=0) as img:
            assert img.format.value == fmt
            # Forced format: QEMU's own probe takes a fixed VHD for raw.
            assert img.read(img.virt_size, 0) == qemu_raw_bytes(str(p), tmp, "-f", fmt)
    else:
        # No driver: a clean refusal naming the format, never the container bytes.
        with pytest.raises(qb.UnsupportedError) as ei:
            qb.open(p, flags=0)
        assert fmt in ei.value.message
    # An explicit raw open still works: the caller asked for the container bytes.
    with qb.open(p, fmt="raw", flags=0) as img:
        assert img.format is qb.Format.RAW
