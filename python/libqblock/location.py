"""Where an image lives: a protocol and its parameters."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from .errors import InvalidParamError, UnsupportedError

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: The protocols the engine serves today; the others are known by name and
#: refused by open and create with UnsupportedError until their backends land.
SERVED_PROTOCOLS = ("file",)
PROTOCOLS = ("file", "nbd", "rbd", "http")


def _text(p: Union[str, bytes]) -> str:
    """A path as the str the engine takes: bytes decoded with the file
    system encoding."""
    if isinstance(p, str):
        return p
    s = os.fsdecode(p)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        # The engine takes names as UTF-8 strings.
        raise UnsupportedError(f"a path that is not valid UTF-8 is not supported yet: {p!r}") from None
    return s


@dataclass(frozen=True)
class Location:
    """A protocol (``file``, ``nbd``, ``rbd``, ``http``) and its parameters.

    Build one with :meth:`file`, :meth:`nbd`, :meth:`rbd`, :meth:`http` or
    :meth:`parse`. Only ``file`` is served today; :func:`libqblock.open` and
    :func:`libqblock.create` raise :class:`~libqblock.errors.UnsupportedError`
    for any other location. ``str(location)`` is text :meth:`parse` reads
    back to the same location.
    """

    protocol: str
    target: str
    params: Tuple[Tuple[str, str], ...] = field(default=())

    @classmethod
    def file(cls, path: PathLike) -> "Location":
        """A local file (or block device); the path is kept as given (bytes decoded as :func:`os.fsdecode` does)."""
        try:
            p = _text(os.fspath(path))
        except TypeError:
            raise InvalidParamError(f"a file location needs a path, not {path!r}") from None
        if not p:
            raise InvalidParamError("a file location needs a non-empty path")
        if "\0" in p:
            raise InvalidParamError("a file path may not contain NUL")
        return cls("file", p)

    @classmethod
    def nbd(cls, host: str = "127.0.0.1", port: int = 10809, export: str = "") -> "Location":
        """An export of an NBD server (TCP)."""
        if not isinstance(host, str) or not host:
            raise InvalidParamError("an NBD location needs a host")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidParamError(f"NBD port must be 1..65535, not {port!r}")
        if not isinstance(export, str):
            raise InvalidParamError(f"NBD export must be a str, not {export!r}")
        return cls("nbd", f"{host}:{port}/{export}", (("host", host), ("port", str(port)), ("export", export)))

    @classmethod
    def rbd(cls, pool: str, image: str, snapshot: str = "", conf: str = "") -> "Location":
        """An image in a Ceph pool, optionally a snapshot of it, with a ceph.conf path."""
        for name, v in (("pool", pool), ("image", image), ("snapshot", snapshot), ("conf", conf)):
            if not isinstance(v, str):
                raise InvalidParamError(f"RBD {name} must be a str, not {v!r}")
        if not pool or not image:
            raise InvalidParamError("an RBD location needs a pool and an image name")
        if any(c in pool + image + snapshot for c in "/@:"):
            raise InvalidParamError("RBD pool, image and snapshot names may not contain '/', '@' or ':'")
        if ":" in conf or "\0" in pool + image + snapshot + conf:
            raise InvalidParamError("RBD names and the conf path may not contain ':' or NUL")
        target = f"{pool}/{image}" + (f"@{snapshot}" if snapshot else "")
        return cls("rbd", target, (("pool", pool), ("image", image), ("snapshot", snapshot), ("conf", conf)))

    @classmethod
    def http(cls, url: str) -> "Location":
        """A file served over HTTP(S), read with range requests."""
        if not isinstance(url, str) or not re.match(r"^https?://[^/]", url):
            raise InvalidParamError(f"not an http(s) URL: {url!r}")
        return cls("http", url)

    @classmethod
    def parse(cls, text: PathLike) -> "Location":
        """A location from a path or URL.

        ``nbd://host[:port][/export]`` (and QEMU's
        ``nbd:host:port[:exportname=name]``), ``rbd:pool/image[@snap][:conf=path]``,
        ``http(s)://...``, ``file:path`` or ``file:///path``; anything else is a
        file path.
        """
        try:
            s = os.fspath(text)
        except TypeError:
            raise InvalidParamError(f"a location must be a path or a URL, not {text!r}") from None
        s = _text(s)
        if s.startswith("nbd://"):
            u = urlsplit(s)
            try:
                port = u.port
            except ValueError:
                raise InvalidParamError(f"bad NBD port in {s!r}") from None
            return cls.nbd(u.hostname or "127.0.0.1", port or 10809, unquote(u.path.lstrip("/")))
        if s.startswith("nbd:"):
            return cls._parse_qemu_nbd(s)
        if s.startswith("rbd:"):
            return cls._parse_rbd(s)
        if s.startswith(("http://", "https://")):
            return cls.http(s)
        if s.startswith("file://"):
            return cls.file(unquote(urlsplit(s).path))
        if s.startswith("file:"):
            s = s[5:]
        return cls.file(s)

    @classmethod
    def _parse_qemu_nbd(cls, s: str) -> "Location":
        parts = s[4:].split(":")
        if len(parts) < 2 or not parts[1].isdigit():
            raise InvalidParamError(f"not an NBD location (nbd:host:port[:exportname=name]): {s!r}")
        export = ""
        for opt in parts[2:]:
            key, sep, val = opt.partition("=")
            if key != "exportname" or not sep:
                raise InvalidParamError(f"unknown NBD option {opt!r} in {s!r}")
            export = val
        return cls.nbd(parts[0], int(parts[1]), export)

    @classmethod
    def _parse_rbd(cls, s: str) -> "Location":
        head, *opts = s[4:].split(":")
        pool, _, image = head.partition("/")
        image, _, snap = image.partition("@")
        conf = ""
        for opt in opts:
            key, sep, val = opt.partition("=")
            if key != "conf" or not sep:
                raise InvalidParamError(f"unknown RBD option {opt!r} in {s!r}")
            conf = val
        return cls.rbd(pool, image, snap, conf)

    @classmethod
    def of(cls, where: Union["Location", PathLike]) -> "Location":
        """Accept a Location or anything :meth:`parse` accepts."""
        return where if isinstance(where, Location) else cls.parse(where)

    @property
    def parameters(self) -> Mapping[str, str]:
        """The protocol's parameters by name (host/port/export, pool/image/...)."""
        return dict(self.params)

    @property
    def served(self) -> bool:
        """Whether the engine can open and create at this location today."""
        return self.protocol in SERVED_PROTOCOLS

    @property
    def path(self) -> str:
        """The file path of a ``file`` location."""
        if self.protocol != "file":
            raise InvalidParamError(f"a {self.protocol} location has no file path")
        return self.target

    def __str__(self) -> str:
        p = self.parameters
        if self.protocol == "nbd":
            host = f"[{p['host']}]" if ":" in p["host"] else p["host"]
            return f"nbd://{host}:{p['port']}/{quote(p['export'], safe='/')}"
        if self.protocol == "rbd":
            return f"rbd:{self.target}" + (f":conf={p['conf']}" if p.get("conf") else "")
        if self.protocol == "file" and re.match(r"^(nbd|rbd|https?|file):", self.target):
            return "file:" + self.target  # so that parse() reads it back as a file
        return self.target
