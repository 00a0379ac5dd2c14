"""libqblock for fuzzers: Hypothesis strategies for valid disk images and
structured mutations of them.

For people testing *other* parsers of disk images (or ours)::

    from hypothesis import given
    import libqblock.testing as qbt

    @given(qbt.images(formats=["qcow2", "vmdk"]))
    def test_my_parser_reads_the_content(image):
        assert my_parser(image.data).read_all() == image.content

- :func:`images` draws :class:`GeneratedImage` values: an image's bytes, its
  format, the options it was created with and the guest content it holds.
- :func:`chains` draws :class:`GeneratedChain` values: a base and overlays
  naming each other by relative file names.
- :func:`mutations` / :func:`mutated_images` draw :class:`Mutation` values:
  one field pushed out of range or one table entry pointed elsewhere (which
  field, old and new value, a description, the mutated bytes).

Every image is made by libqblock itself (create, write, convert -c,
snapshots) and is read by ``qemu-img`` as its content model says.
Hypothesis is an optional dependency: ``pip install libqblock[testing]``.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "libqblock.testing needs Hypothesis, an optional dependency: pip install libqblock[testing]"
    ) from e

from ._model import (
    BACKING_FORMATS,
    CONFIGURATIONS,
    QEMU_CHECKS,
    QEMU_READS,
    Configuration,
    GeneratedChain,
    GeneratedImage,
    Plan,
    build_chain,
    build_image,
)
from ._mutate import (
    FAR_PAST_EOF,
    HUGE,
    MISALIGNED,
    ONTO_HEADER,
    ONTO_TABLE,
    PAST_EOF,
    Field,
    MutatedImage,
    Mutation,
    all_mutations,
    candidate_fields,
    crc32c,
    flip_mutation,
    iter_mutations,
    mutate_field,
)
from ._exercise import exercise
from .strategies import chains, fuzz_settings, images, mutated_images, mutations

__all__ = [
    "BACKING_FORMATS",
    "CONFIGURATIONS",
    "Configuration",
    "FAR_PAST_EOF",
    "Field",
    "GeneratedChain",
    "GeneratedImage",
    "HUGE",
    "MISALIGNED",
    "MutatedImage",
    "Mutation",
    "ONTO_HEADER",
    "ONTO_TABLE",
    "PAST_EOF",
    "Plan",
    "QEMU_CHECKS",
    "QEMU_READS",
    "all_mutations",
    "build_chain",
    "build_image",
    "candidate_fields",
    "chains",
    "crc32c",
    "exercise",
    "flip_mutation",
    "fuzz_settings",
    "images",
    "iter_mutations",
    "mutate_field",
    "mutated_images",
    "mutations",
]
