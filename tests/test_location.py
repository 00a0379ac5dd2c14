"""Location: file, nbd, rbd, http and parse; protocols not served yet raise
UnsupportedError on open and create."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import libqblock as qb

MiB = 1 << 20


def test_file():
    loc = qb.Location.file("/var/images/a.qcow2")
    assert (loc.protocol, loc.target, loc.path, str(loc)) == ("file", "/var/images/a.qcow2", "/var/images/a.qcow2", "/var/images/a.qcow2")
    assert qb.Location.file(Path("rel/b.raw")) == qb.Location.file("rel/b.raw")
    assert loc.served and loc.parameters == {}
    # bytes as os.fsdecode reads them, like every other location argument
    assert qb.Location.file(b"/bytes/a.qcow2") == qb.Location.file("/bytes/a.qcow2")
    assert qb.Location.file(Path(os.fsdecode(b"/b/x"))) == qb.Location.file(b"/b/x")
    with pytest.raises(qb.UnsupportedError, match="not valid UTF-8"):
        qb.Location.file(b"/a/\xff.qcow2")
    for bad in ("", b"", "a\0b", b"a\0b", 42, None):
        with pytest.raises(qb.InvalidParamError):
            qb.Location.file(bad)  # type: ignore[arg-type]


def test_nbd():
    loc = qb.Location.nbd("10.1.2.3", 10810, "disk0")
    assert loc.protocol == "nbd" and not loc.served
    assert loc.parameters == {"host": "10.1.2.3", "port": "10810", "export": "disk0"}
    assert str(loc) == "nbd://10.1.2.3:10810/disk0"
    assert qb.Location.nbd() == qb.Location.nbd("127.0.0.1", 10809, "")
    for kw in ({"port": 0}, {"port": 65536}, {"port": True}, {"port": "10809"}, {"host": ""}):
        with pytest.raises(qb.InvalidParamError):
            qb.Location.nbd(**kw)  # type: ignore[arg-type]
    with pytest.raises(qb.InvalidParamError):
        loc.path


def test_rbd():
    loc = qb.Location.rbd("pool", "img", "snap1", "/etc/ceph/ceph.conf")
    assert loc.target == "pool/img@snap1"
    assert loc.parameters == {"pool": "pool", "image": "img", "snapshot": "snap1", "conf": "/etc/ceph/ceph.conf"}
    assert str(loc) == "rbd:pool/img@snap1:conf=/etc/ceph/ceph.conf"
    assert str(qb.Location.rbd("p", "i")) == "rbd:p/i"
    for args in (("", "i"), ("p", ""), ("p/q", "i"), ("p", "i@x"), ("p", "i", "s:t")):
        with pytest.raises(qb.InvalidParamError):
            qb.Location.rbd(*args)


def test_http():
    loc = qb.Location.http("https://images.example.invalid/a.qcow2")
    assert loc.protocol == "http" and str(loc) == "https://images.example.invalid/a.qcow2"
    for bad in ("ftp://x/y", "http://", "/path", 3):
        with pytest.raises(qb.InvalidParamError):
            qb.Location.http(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/abs/a.img", qb.Location.file("/abs/a.img")),
        ("rel.img", qb.Location.file("rel.img")),
        ("file:/x/y.img", qb.Location.file("/x/y.img")),
        ("file:///x/y%20z.img", qb.Location.file("/x/y z.img")),
        ("nbd://127.0.0.1:10809/name", qb.Location.nbd("127.0.0.1", 10809, "name")),
        ("nbd://server/", qb.Location.nbd("server", 10809, "")),
        ("nbd://[::1]:10810/e", qb.Location.nbd("::1", 10810, "e")),
        ("nbd:server:10811", qb.Location.nbd("server", 10811, "")),
        ("nbd:server:10811:exportname=vm1", qb.Location.nbd("server", 10811, "vm1")),
        ("rbd:pool/image", qb.Location.rbd("pool", "image")),
        ("rbd:pool/image@snap:conf=/etc/ceph.conf", qb.Location.rbd("pool", "image", "snap", "/etc/ceph.conf")),
        ("http://h/x.raw", qb.Location.http("http://h/x.raw")),
        ("https://h/x.raw", qb.Location.http("https://h/x.raw")),
    ],
)
def test_parse(text, expected):
    loc = qb.Location.parse(text)
    assert loc == expected
    assert qb.Location.parse(str(loc)) == loc  # str() reads back
    assert qb.Location.of(loc) is loc and qb.Location.of(text) == loc


@pytest.mark.parametrize("bad", ["", "nbd://h:99999/x", "nbd:h", "nbd:h:p", "nbd:h:1:foo=bar", "rbd:pool", "rbd:p/i:key=v", None])
def test_parse_rejects(bad):
    with pytest.raises(qb.InvalidParamError):
        qb.Location.parse(bad)  # type: ignore[arg-type]


def test_a_file_named_like_a_url_round_trips():
    loc = qb.Location.file("nbd:odd-name")
    assert str(loc) == "file:nbd:odd-name" and qb.Location.parse(str(loc)) == loc


@pytest.mark.parametrize(
    "loc",
    [qb.Location.nbd("127.0.0.1", 10809, "x"), qb.Location.rbd("p", "i"), qb.Location.http("http://127.0.0.1:9/x.raw")],
    ids=lambda l: l.protocol,
)
def test_protocols_not_served_yet_are_unsupported(loc):
    with pytest.raises(qb.UnsupportedError) as ei:
        qb.open(loc, flags=0)
    assert loc.protocol in ei.value.message and ei.value.code == -102
    with pytest.raises(qb.UnsupportedError):
        qb.open(loc, fmt="raw", flags=0)
    with pytest.raises(qb.UnsupportedError):
        qb.create(loc, qb.RawOptions(MiB))
    with pytest.raises(qb.UnsupportedError):
        qb.probe(loc)


def test_open_and_create_take_paths_strings_and_locations(tmp):
    p = tmp / "a.raw"
    qb.create(str(p), qb.RawOptions(MiB))
    for where in (p, str(p), qb.Location.file(p), f"file:{p}", f"file://{p}"):
        with qb.open(where, flags=0) as img:
            assert img.virt_size == MiB and img.location == qb.Location.file(p)


# --- str() and parse() are inverse for every location ----------------------------------------

from hypothesis import given, strategies as st  # noqa: E402

_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=40)
_name = st.text(st.characters(blacklist_characters="\0/@:", blacklist_categories=("Cs",)), min_size=1, max_size=20)
_host = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True),
    st.ip_addresses().map(str),
)

locations = st.one_of(
    _text.map(qb.Location.file),
    st.builds(qb.Location.nbd, _host, st.integers(1, 65535), st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30)),
    st.builds(qb.Location.rbd, _name, _name, st.one_of(st.just(""), _name), st.one_of(st.just(""), _name)),
    st.from_regex(r"https?://[a-z0-9.-]{1,20}(/[A-Za-z0-9._~-]{0,10}){0,4}", fullmatch=True).map(qb.Location.http),
)


@given(locations)
def test_str_parses_back(loc):
    assert qb.Location.parse(str(loc)) == loc
