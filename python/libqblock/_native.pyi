"""Type stubs for ``libqblock._native``, the PyO3 extension
(rust/qblock-python/src/image.rs, tools.rs, check.rs). Checked against the built module by
``python -m mypy.stubtest libqblock._native`` (tests/test_api.py)."""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union, final

from typing_extensions import Buffer

__all__ = [
    "Image",
    "amend_image",
    "check_image",
    "checksum_image",
    "commit_image",
    "compare_images",
    "convert_images",
    "convert_stream",
    "create",
    "fault_arm",
    "fault_disarm",
    "fault_status",
    "formats",
    "inspect",
    "open",
    "probe",
    "rebase_image",
    "snapshot_apply",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_list",
]

# (offset, length, allocated, present, data, zero, compressed, depth, file, file_offset)
_StatusTuple = Tuple[int, int, bool, bool, bool, bool, bool, int, Optional[str], Optional[int]]
_OptionValue = Union[int, str, bool]

@final
class Image:
    """An open image; made by :func:`open`, not constructed directly."""

    def read(self, length: int, offset: int) -> bytes: ...
    def readinto(self, buffer: Buffer, offset: int) -> int: ...
    def write(self, data: Buffer, offset: int) -> int: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def close(self) -> None: ...
    def __repr__(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def format(self) -> str: ...
    def block_status(self, offset: int, length: int) -> _StatusTuple: ...
    def check_allocation(self, start: int, length: int) -> Tuple[bool, int]: ...
    def map(self, start: int = 0, length: Optional[int] = None) -> List[_StatusTuple]: ...
    def info(self) -> Dict[str, Any]: ...

def open(
    protocol: str,
    target: str,
    fmt: Optional[str] = None,
    read_only: bool = False,
    no_backing: bool = False,
    write_through: bool = False,
    no_flush: bool = False,
    snapshot: bool = False,
    direct: bool = False,
    force_share: bool = False,
    references: str = "any",
    allowed_dirs: List[str] = ...,
    allow_protocols: bool = False,
) -> Image: ...
def inspect(
    protocol: str,
    target: str,
    fmt: Optional[str] = None,
    allowed: List[str] = ...,
) -> Dict[str, Any]: ...
def create(protocol: str, target: str, fmt: str, options: Dict[str, _OptionValue]) -> None: ...
def probe(protocol: str, target: str) -> str: ...
def formats() -> List[Tuple[str, bool, bool]]: ...

# (id, name, vm_state_size, date_sec, date_nsec, vm_clock_nsec, icount)
_SnapshotTuple = Tuple[str, str, int, int, int, int, Optional[int]]

def snapshot_list(image: Image) -> List[_SnapshotTuple]: ...
def snapshot_create(image: Image, name: str) -> _SnapshotTuple: ...
def snapshot_apply(image: Image, id_or_name: str) -> None: ...
def snapshot_delete(image: Image, id_or_name: str) -> None: ...

_Progress = Optional[Callable[[int, int], object]]

def convert_images(
    sources: List[Tuple[Image, int, int]],
    target: Image,
    sparse_min: int,
    threads: int,
    progress: _Progress = None,
    compress: bool = False,
) -> None: ...
def convert_stream(
    sources: List[Tuple[Image, int, int]],
    format: str,
    options: Dict[str, Union[int, bool, str]],
    out: Any,
    sparse_min: int,
    threads: int,
    progress: Optional[Callable[[int, int], object]] = None,
    compress: bool = False,
) -> int: ...
def checksum_image(image: Image, threads: int, progress: _Progress = None) -> str: ...
def compare_images(a: Image, b: Image, strict: bool, progress: _Progress = None) -> Tuple[str, Optional[int]]: ...
def commit_image(
    top: Image, base: Optional[Tuple[str, str]] = None, empty: bool = True, progress: _Progress = None
) -> bool: ...
def rebase_image(
    image: Image,
    name: Optional[str],
    backing_format: Optional[str] = None,
    unsafe_: bool = False,
    progress: _Progress = None,
) -> None: ...

# (format, first report, second report after a repair that fixed something);
# each report has the CheckReport fields and "messages".
def check_image(
    protocol: str, target: str, fmt: Optional[str], repair: str, force_share: bool = False
) -> Tuple[str, Dict[str, Any], Optional[Dict[str, Any]]]: ...
def amend_image(
    protocol: str,
    target: str,
    format: Optional[str] = None,
    compat: Optional[str] = None,
    lazy_refcounts: Optional[bool] = None,
    refcount_bits: Optional[int] = None,
    size: Optional[int] = None,
    backing_file: Optional[str] = None,
    backing_fmt: Optional[str] = None,
    data_file: Optional[str] = None,
    data_file_raw: Optional[bool] = None,
    progress: _Progress = None,
) -> None: ...

# fault.rs: the fault-injecting backend (libqblock.faults)
def fault_arm(dir: str, kind: str, at: int, unflushed: str, seed: int) -> None: ...
def fault_status(dir: str) -> Optional[Tuple[int, bool]]: ...
def fault_disarm(dir: str) -> Optional[Tuple[int, bool]]: ...
