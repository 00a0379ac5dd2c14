"""Run libqblock over mutated images in a child process, one JSON line per image.

``python mutant_runner.py MANIFEST`` where MANIFEST is a pickle: either
``("patches", folder, [image bytes, ...], [(image index, fmt, description,
[(offset, new bytes), ...]), ...])`` (each mutant is its image with the
patches applied, so a big image is stored once) or ``("all", folder,
[GeneratedImage, ...])`` (every structured mutation of each image, made here
one at a time, their field and label reported too). Before each image it prints ``{"start": description}``, after
it ``{"done": description, "outcome": "ok" | exception class name}``; a crash
leaves a start line without its done line. An exception that is not a
QBlockError is printed as its class name and stops the run (exit 3).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path


def main() -> int:
    from libqblock.testing import exercise, iter_mutations

    kind, folder, *rest = pickle.loads(Path(sys.argv[1]).read_bytes())
    folder = Path(folder)
    if kind == "patches":
        originals, mutants = rest

        def patched():
            for index, fmt, desc, patches in mutants:
                buf = bytearray(originals[index])
                for off, new in patches:
                    buf[off : off + len(new)] = new
                p = folder / "mutant"
                p.write_bytes(buf)
                yield str(p), fmt, desc, "", ""

        jobs = patched()
    else:
        images = rest[0]

        def gen():
            for img in images:
                for m in iter_mutations(img):
                    yield str(m.write_to(folder, "mutant")), img.format, m.description, m.field, m.label

        jobs = gen()
    for path, fmt, desc, field, label in jobs:
        print(json.dumps({"start": desc}), flush=True)
        try:
            err = exercise(path, fmt)
        except Exception as e:  # noqa: BLE001 - reporting is the point
            print(json.dumps({"done": desc, "outcome": f"NOT A QBlockError: {type(e).__name__}: {e}"}), flush=True)
            return 3
        print(json.dumps({"done": desc, "field": field, "label": label,
                          "outcome": "ok" if err is None else type(err).__name__,
                          "message": "" if err is None else str(err)[:200]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
