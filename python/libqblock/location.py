"""Where an image lives: a protocol and its parameters."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Tuple, Union
from urllib.parse import urlsplit

from .errors import InvalidParamError

PathLike = Union[str, "os.PathLike[str]"]

_SERVED = ("file",)


@dataclass(frozen=True)
class Location:
    """A protocol (``file``, ``nbd``, ``rbd``, ``http``) and its parameters.

    Only ``file`` is served today; opening or creating any other location
    raises :class:`~libqblock.errors.UnsupportedError`.
    """

    protocol: str
    target: str
    params: Tuple[Tuple[str, str], ...] = field(default=())

    @classmethod
    def file(cls, path: PathLike) -> "Location":
        p = os.fspath(path)
        if not isinstance(p, str) or not p:
            raise InvalidParamError("a file location needs a non-empty path")
        if "\0" in p:
            raise InvalidParamError("a file path may not contain NUL")
        return cls("file", p)

    @classmethod
    def nbd(cls, host: str = "127.0.0.1", port: int = 10809, export: str = "") -> "Location":
        if not 0 < port < 65536:
            raise InvalidParamError(f"NBD port must be 1..65535, not {port}")
        return cls("nbd", f"{host}:{port}/{export}", (("host", host), ("port", str(port)), ("export", export)))

    @classmethod
    def rbd(cls, pool: str, image: str, snapshot: str = "", conf: str = "") -> "Location":
        if not pool or not image:
            raise InvalidParamError("an RBD location needs a pool and an image name")
        target = f"{pool}/{image}" + (f"@{snapshot}" if snapshot else "")
        return cls("rbd", target, (("pool", pool), ("image", image), ("snapshot", snapshot), ("conf", conf)))

    @classmethod
    def http(cls, url: str) -> "Location":
        if not re.match(r"^https?://", url):
            raise InvalidParamError(f"not an http(s) URL: {url!r}")
        return cls("http", url)

    @classmethod
    def parse(cls, text: PathLike) -> "Location":
        """A location from a path or URL (``nbd://host:port/export``, ``rbd:pool/image``, ``http(s)://``)."""
        s = os.fspath(text)
        if s.startswith("nbd://"):
            u = urlsplit(s)
            return cls.nbd(u.hostname or "127.0.0.1", u.port or 10809, u.path.lstrip("/"))
        if s.startswith("rbd:"):
            rest = s[4:]
            pool, _, image = rest.partition("/")
            image, _, snap = image.partition("@")
            return cls.rbd(pool, image, snap)
        if s.startswith(("http://", "https://")):
            return cls.http(s)
        if s.startswith("file:"):
            s = s[5:]
        return cls.file(s)

    @classmethod
    def of(cls, where: Union["Location", PathLike]) -> "Location":
        """Accept a Location or anything :meth:`parse` accepts."""
        return where if isinstance(where, Location) else cls.parse(where)

    @property
    def parameters(self) -> Mapping[str, str]:
        return dict(self.params)

    @property
    def path(self) -> str:
        """The file path of a ``file`` location."""
        if self.protocol != "file":
            raise InvalidParamError(f"a {self.protocol} location has no file path")
        return self.target

    def __str__(self) -> str:
        return self.target if self.protocol == "file" else f"{self.protocol}://{self.target}"
