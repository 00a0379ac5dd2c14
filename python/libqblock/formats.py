"""Format names: one table that maps both ways."""

from __future__ import annotations

import enum

from .errors import InvalidParamError


class Format(enum.Enum):
    """Every image format libqblock knows by name; NONE means unknown.

    The members' values are QEMU's names, and ``str(fmt)`` gives them; the
    enum and its inverse ``_BY_NAME`` are the one table both directions use.
    """

    NONE = "none"
    COW = "cow"
    QED = "qed"
    QCOW = "qcow"
    QCOW2 = "qcow2"
    RAW = "raw"
    RBD = "rbd"
    SHEEPDOG = "sheepdog"
    VDI = "vdi"
    VMDK = "vmdk"
    VPC = "vpc"
    VHDX = "vhdx"
    LUKS = "luks"
    PARALLELS = "parallels"
    DMG = "dmg"
    BOCHS = "bochs"
    CLOOP = "cloop"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_str(cls, name: str) -> "Format":
        """The format called ``name`` (case-insensitive); ``Format.NONE`` if unknown."""
        return _BY_NAME.get(name.lower(), Format.NONE) if isinstance(name, str) else Format.NONE


# The one table: the enum's values are the names, this is its inverse.
_BY_NAME = {f.value: f for f in Format if f is not Format.NONE}


def str2fmttype(name: str) -> Format:
    """The seed's name for :meth:`Format.from_str`."""
    return Format.from_str(name)


def fmttype2str(fmt: Format) -> str:
    """The seed's inverse of :func:`str2fmttype`; ``"none"`` for NONE.

    Also takes a format's name; anything else is an InvalidParamError.
    """
    try:
        return str(Format(fmt))
    except ValueError:
        raise InvalidParamError(f"not a format: {fmt!r}") from None
