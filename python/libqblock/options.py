"""Creation options: one frozen dataclass per format, validated on
construction. ``to_native()`` gives the QEMU-named options the engine takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, Optional, Union

from .errors import InvalidParamError
from .formats import Format
from .location import Location, PathLike

Backing = Optional[Union[Location, PathLike]]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_size(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidParamError(f"{name} must be a non-negative integer, not {v!r}")
    if v > (1 << 63) - 1:
        raise InvalidParamError(f"{name} {v} does not fit in 63 bits")


def _choice(name: str, v: Any, allowed: tuple) -> None:
    if v not in allowed:
        raise InvalidParamError(f"{name} must be one of {', '.join(map(str, allowed))}; got {v!r}")


def _backing_name(b: Backing) -> Optional[str]:
    if b is None:
        return None
    loc = Location.of(b)
    return loc.target if loc.protocol == "file" else str(loc)


@dataclass(frozen=True)
class ImageOptions:
    """Fields every format shares: the virtual size in bytes and a backing file."""

    format: ClassVar[Format] = Format.NONE
    virt_size: int = 0

    def __post_init__(self) -> None:
        _check_size("virt_size", self.virt_size)
        self._validate()

    def _validate(self) -> None:
        """Format-specific checks; raise InvalidParamError."""

    def to_native(self) -> Dict[str, Union[int, str, bool]]:
        """The options under QEMU's names, for the engine."""
        return {"size": self.virt_size}


@dataclass(frozen=True)
class RawOptions(ImageOptions):
    """raw: preallocation ``off``, ``falloc`` or ``full``."""

    format: ClassVar[Format] = Format.RAW
    preallocation: str = "off"

    def _validate(self) -> None:
        _choice("preallocation", self.preallocation, ("off", "falloc", "full"))

    def to_native(self) -> Dict[str, Union[int, str, bool]]:
        return {"size": self.virt_size, "preallocation": self.preallocation}


@dataclass(frozen=True)
class Qcow2Options(ImageOptions):
    """qcow2 (QEMU's native format), version 2 (compat "0.10") or 3 ("1.1")."""

    format: ClassVar[Format] = Format.QCOW2
    backing: Backing = None
    backing_fmt: Optional[Format] = None
    encrypt: bool = False
    cluster_size: int = 65536
    compat: str = "1.1"
    preallocation: str = "off"
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    data_file: Optional[Union[Location, PathLike]] = None
    data_file_raw: bool = False

    def _validate(self) -> None:
        if not _is_pow2(self.cluster_size) or not 512 <= self.cluster_size <= 2 * 1024 * 1024:
            raise InvalidParamError(
                f"cluster_size must be a power of two between 512 and 2 MiB, not {self.cluster_size}"
            )
        _choice("compat", self.compat, ("0.10", "1.1"))
        _choice("preallocation", self.preallocation, ("off", "metadata", "falloc", "full"))
        if not _is_pow2(self.refcount_bits) or self.refcount_bits > 64:
            raise InvalidParamError(f"refcount_bits must be a power of two up to 64, not {self.refcount_bits}")
        _choice("compression_type", self.compression_type, ("zlib", "zstd"))
        if self.compat == "0.10":
            for name, bad in (
                ("lazy_refcounts", self.lazy_refcounts),
                ("extended_l2", self.extended_l2),
                ("refcount_bits other than 16", self.refcount_bits != 16),
                ("compression_type zstd", self.compression_type != "zlib"),
                ("data_file", self.data_file is not None),
            ):
                if bad:
                    raise InvalidParamError(f"{name} needs compat 1.1 (qcow2 version 3)")
        if self.extended_l2 and self.cluster_size < 16384:
            raise InvalidParamError("extended_l2 needs a cluster_size of at least 16 KiB")
        if self.backing_fmt is not None and self.backing is None:
            raise InvalidParamError("backing_fmt given without a backing file")
        if self.backing_fmt is not None and not isinstance(self.backing_fmt, Format):
            raise InvalidParamError("backing_fmt must be a Format")
        if self.backing is None and self.virt_size == 0:
            raise InvalidParamError("virt_size may be 0 only with a backing file (it then takes its size)")
        if self.data_file_raw and self.data_file is None:
            raise InvalidParamError("data_file_raw needs a data_file")
        if self.virt_size % 512:
            raise InvalidParamError(f"virt_size must be a multiple of 512, not {self.virt_size}")

    def to_native(self) -> Dict[str, Union[int, str, bool]]:
        o: Dict[str, Union[int, str, bool]] = {
            "size": self.virt_size,
            "cluster_size": self.cluster_size,
            "compat": self.compat,
            "preallocation": self.preallocation,
            "lazy_refcounts": self.lazy_refcounts,
            "refcount_bits": self.refcount_bits,
            "extended_l2": self.extended_l2,
            "compression_type": self.compression_type,
            "encrypt": self.encrypt,
        }
        b = _backing_name(self.backing)
        if b is not None:
            o["backing_file"] = b
        if self.backing_fmt is not None:
            o["backing_fmt"] = self.backing_fmt.value
        d = _backing_name(self.data_file)
        if d is not None:
            o["data_file"] = d
            o["data_file_raw"] = self.data_file_raw
        return o


def option_fields(cls: type) -> list:
    """Names of a dataclass's fields (for docs and the CLI)."""
    return [f.name for f in fields(cls)]
