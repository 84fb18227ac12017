"""Writing a run's files into an output folder as one unit: all of the new result or none of it.

Every file of a run is first written into a staging folder that this module creates inside the
output folder (``.inversereg-staging-*``), so nothing under a final name is ever half-written and
the two folders share a file system (renames cannot fail half-way). Then the files are swapped in:

1. the previous run's files of the same names, and any output name this run does not produce
   (e.g. an old ``affine.tfm`` when this run has no affine), are moved aside into the staging
   folder, the index file (``report.json``, ``summary.json``) first;
2. the new files are moved into place, the index file last;
3. the staging folder, with the previous run's files, is deleted.

A failure at any point (an exception, Ctrl-C) before the index file is in place undoes steps 1-2:
the folder holds exactly the previous complete result (or none), and the staging folder is
removed. (Should putting a previous file back fail too, the folder is left without an index file,
i.e. not a result, and the previous files stay in the staging folder rather than being deleted.) The index file records each file's size and sha256 (``files``), so a reader can check
that it describes exactly the files beside it. Only files with the tool's own output names are
ever moved or deleted, and only the staging folder (which this module created) is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .fastgzip import DEFAULT_COMPRESSION, compression_settings
from .fieldfile import write_field
from .imageio import OUTPUT_NAMES, prepare_output_dir, write_image_atomic, write_text_atomic
from .pipeline import RegistrationResult

#: prefix of the staging folder a run writes into before its files are moved into place
STAGING_PREFIX = ".inversereg-staging-"

Writer = Callable[[Path], None]


def file_digest(path: Path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def publish(outdir: Path, writers: dict[str, Writer], index_name: str, index: Callable[[dict], str],
            managed: tuple[str, ...]) -> dict[str, Path]:
    """Write a set of files into ``outdir`` all at once (see the module docstring).

    ``writers`` maps each file name (not ``index_name``) to a function that writes that file at
    the path it is given; ``index(files)`` returns the text of the index file given
    ``{name: {"bytes", "sha256"}}`` of the other files. ``managed``: every output name of this
    tool in such a folder; those this run does not write are moved out of the way (then
    deleted), so no stale file stays beside the new index. Returns the final paths by name,
    the index last.
    """
    outdir = Path(outdir)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=outdir))
    new, old = staging / "new", staging / "old"
    moved_in: list[str] = []
    moved_aside: list[str] = []
    try:
        new.mkdir()
        old.mkdir()
        for name, write in writers.items():
            write(new / name)
        files = {name: file_digest(new / name) for name in writers}
        write_text_atomic(index(files), new / index_name)
        order = [*writers, index_name]
        # the old index goes first: from here until the new index is in place the folder holds
        # no index at all, never one that describes other files
        for name in (index_name, *[n for n in managed if n != index_name]):
            if (outdir / name).is_file() or (outdir / name).is_symlink():
                os.replace(outdir / name, old / name)
                moved_aside.append(name)
        for name in order:
            os.replace(new / name, outdir / name)
            moved_in.append(name)
    except BaseException:
        if _roll_back(outdir, old, moved_in, moved_aside):
            shutil.rmtree(staging, ignore_errors=True)
        # else the previous run's files that could not be put back stay in staging/old
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return {name: outdir / name for name in order}


def _roll_back(outdir: Path, old: Path, moved_in: list[str], moved_aside: list[str]) -> bool:
    """Undo a partial swap: the new files out, the previous run's files back (index last).
    Returns False if a previous file could not be put back (it is then still in ``old``)."""
    for name in reversed(moved_in):
        (outdir / name).unlink(missing_ok=True)
    restored = True
    for name in sorted(moved_aside, key=lambda n: n in _INDEX_NAMES):
        if not restored and name in _INDEX_NAMES:
            break  # an index beside an incomplete set of files would describe files not there
        try:
            os.replace(old / name, outdir / name)
        except OSError:
            restored = False
    return restored


#: the files that describe a folder's other files; restored last so they never precede them
_INDEX_NAMES = ("report.json", "summary.json")


def write_result(result: RegistrationResult, outdir, inputs: list,
                 extra: dict[str, Writer] | None = None, compression: str = DEFAULT_COMPRESSION) -> dict[str, Path]:
    """Write the four images, the affine (if any), ``extra`` files (name -> writer, e.g. the
    demo's overview.png), the carried label maps and extra images (Jacobians) if any, and
    report.json into ``outdir`` as one unit (see the module docstring).

    ``inputs`` are the input file paths: an output that would land on one of them is refused
    before anything is written. ``compression``: how the ``.nii.gz`` files are compressed
    (:data:`~.fastgzip.COMPRESSIONS`; the default stores them uncompressed in gzip form, the
    fastest to write and to read back). The report gains ``files`` (size and sha256 of every other
    file), ``seconds_writing`` (and ``seconds_whole_process`` when the command line timed its
    start-up); ``result.report`` is updated to the report written. Returns the written paths by
    name (``forward``, ..., ``report``).
    """
    started = time.perf_counter()
    outdir = prepare_output_dir(outdir, inputs)
    writers: dict[str, Writer] = {}
    compression_settings(compression)  # an unknown name is refused before anything is written
    for name, array, geometry in (("forward", result.forward_field, result.fixed_geometry),
                                  ("backward", result.backward_field, result.moving_geometry)):
        # straight from the float32 array; intent 1006, which Slicer's reader expects
        writers[f"{name}.nii.gz"] = lambda path, a=array, g=geometry: write_field(a, g, path, compression)
    images = {"moving_warped": result.moving_warped, "fixed_warped": result.fixed_warped,
              # carried label maps and other per-run images (Jacobians) the front end asked for
              **result.label_images, **result.extra_images}
    for name, image in images.items():
        writers[f"{name}.nii.gz"] = lambda path, image=image: write_image_atomic(image, path, compression=compression)
    if result.affine is not None:
        from .affine import write_affine
        writers["affine.tfm"] = lambda path: write_affine(result.affine, path)
    writers.update(extra or {})

    def index(files: dict) -> str:
        result.report["files"] = files
        result.report["seconds_writing"] = round(time.perf_counter() - started, 3)
        if "seconds_startup" in result.report:
            from .timing import seconds_since_process_start
            result.report["seconds_whole_process"] = seconds_since_process_start()
        return json.dumps(result.report, indent=2, sort_keys=True) + "\n"

    paths = publish(outdir, writers, "report.json", index, OUTPUT_NAMES)
    return {name.split(".", 1)[0]: path for name, path in paths.items()}
