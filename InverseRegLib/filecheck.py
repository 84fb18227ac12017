"""Refusing truncated or damaged image files before they are read.

ITK reads a truncated NIfTI file (``.nii``, ``.nii.gz``, ``.hdr``/``.img``) or VTK file without
complaint, with the missing voxels set to zero, and reports a truncated MetaImage as "No such
file or directory". :func:`check_complete` compares what each file's header promises with what
the file holds, so a damaged input is refused with one line saying so:

* any gzip-compressed file (NIfTI ``.nii.gz``, ``.img.gz``, ``.gipl.gz``, ...) is decompressed to
  its end, which checks that the stream is complete and its CRC matches (each member of a
  multi-member file);
* NIfTI-1/-2 and Analyze: ``vox_offset`` + the voxel count times ``bitpix`` / 8 must be there;
* NRRD (attached or detached; raw or gzip): ``sizes`` x ``type`` (x components) from the data start;
* MetaImage (``.mha``; ``.mhd`` + ``.raw``/``.zraw``): ``DimSize`` x ``ElementType`` x channels,
  raw or zlib-compressed;
* VTK legacy binary ``STRUCTURED_POINTS``: ``DIMENSIONS`` x the scalar type.

Only headers are parsed and compressed payloads streamed through zlib, so the cost on a good
file is a fraction of reading it (measured in docs/benchmark.md). Formats not listed here are
left to ITK's own reader.
"""
from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

from .errors import InverseRegError

#: bytes read from a file per step, and the most a compressed step may expand to (bounds memory)
_BLOCK = 1 << 20
_MAX_OUT = 16 << 20

_GZIP_MAGIC = b"\x1f\x8b"


class Damaged(InverseRegError):
    """The file is shorter than its header says, or its compressed stream is broken.
    ``file`` is the damaged file (the image file or the data file its header names)."""

    def __init__(self, file: Path, detail: str):
        super().__init__(f"{file.name} is truncated or damaged: {detail}")
        self.file, self.detail = file, detail


def _damaged(path: Path, detail: str) -> Damaged:
    return Damaged(path, detail)


def _inflate_size(path: Path, offset: int, wbits: int, multi_member: bool) -> int:
    """Decompress ``path`` from ``offset`` to the end of its stream(s); -> uncompressed bytes.

    ``wbits`` 31 is gzip, 47 auto-detects zlib or gzip. Raises :class:`Damaged` if a stream ends
    early or is corrupt (zlib checks each stream's CRC / Adler-32).
    """
    total = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        inflater = zlib.decompressobj(wbits)
        pending = b""
        while True:
            if not pending:
                pending = handle.read(_BLOCK)
                if not pending:
                    break
            try:
                total += len(inflater.decompress(pending, _MAX_OUT))
            except zlib.error as error:
                raise _damaged(path, f"corrupt compressed data ({error})") from None
            pending = inflater.unconsumed_tail
            if inflater.eof:
                pending = inflater.unused_data + pending
                if not multi_member or not pending.lstrip(b"\0"):
                    # gzip allows trailing zero padding; anything else would be a further member
                    return total
                inflater = zlib.decompressobj(wbits)
        if not inflater.eof:
            raise _damaged(path, f"the compressed stream ends early (after {total} bytes of data)")
    return total


def _payload(path: Path) -> tuple[bytes, int]:
    """The first 540 bytes of the file's content (decompressed if it is gzip) and its full size."""
    with open(path, "rb") as handle:
        start = handle.read(540)
    if not start.startswith(_GZIP_MAGIC):
        return start, path.stat().st_size
    size = _inflate_size(path, 0, 31, multi_member=True)
    with open(path, "rb") as handle:
        head = zlib.decompressobj(31).decompress(handle.read(_BLOCK), 540)
    return head, size


# ----------------------------------------------------------------------------------------------
# NIfTI and Analyze


def _nifti_expected(head: bytes, path: Path) -> tuple[int, int] | None:
    """(data offset, data bytes) from a NIfTI-1, NIfTI-2 or Analyze 7.5 header; None if not one."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack_from(endian + "i", head, 0)[0] == 348:
            dims = struct.unpack_from(endian + "8h", head, 40)
            bitpix = struct.unpack_from(endian + "h", head, 72)[0]
            offset = struct.unpack_from(endian + "f", head, 108)[0]
            single = head[344:348] in (b"n+1\0", b"n+1 ")
            break
        if len(head) >= 540 and struct.unpack_from(endian + "i", head, 0)[0] == 540:
            dims = struct.unpack_from(endian + "8q", head, 16)
            bitpix = struct.unpack_from(endian + "h", head, 14)[0]
            offset = struct.unpack_from(endian + "q", head, 168)[0]
            single = head[4:8] == b"n+2\0"
            break
    else:
        return None
    rank = int(dims[0])
    if not 1 <= rank <= 7 or any(int(d) < 1 for d in dims[1:rank + 1]) or bitpix <= 0:
        raise _damaged(path, f"its header is invalid (dim {list(dims)}, bitpix {bitpix})")
    data = math.ceil(math.prod(int(d) for d in dims[1:rank + 1]) * int(bitpix) / 8)
    return (int(offset) if single else 0), data


def _analyze_data_file(path: Path) -> Path | None:
    """The ``.img`` (or ``.img.gz``) beside a ``.hdr`` (or ``.hdr.gz``), as ITK looks for it."""
    name = path.name
    stem = name[: -len(".hdr.gz")] if name.lower().endswith(".hdr.gz") else name[: -len(".hdr")]
    for suffix in (".img", ".img.gz", ".IMG", ".IMG.gz"):
        candidate = path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _analyze_header_file(path: Path) -> Path | None:
    """The ``.hdr`` (or ``.hdr.gz``) beside an ``.img`` (or ``.img.gz``) given as the image."""
    name = path.name
    stem = name[: -len(".img.gz")] if name.lower().endswith(".img.gz") else name[: -len(".img")]
    for suffix in (".hdr", ".hdr.gz", ".HDR", ".HDR.gz"):
        candidate = path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _check_nifti(path: Path) -> None:
    if path.name.lower().endswith((".img", ".img.gz")):
        header = _analyze_header_file(path)
        if header is None:
            return  # ITK says that the header is missing
        path = header
    head, size = _payload(path)
    expected = _nifti_expected(head, path)
    if expected is None:
        return  # not a NIfTI/Analyze header: ITK will say what it is
    offset, data = expected
    lower = path.name.lower()
    if lower.endswith((".hdr", ".hdr.gz")):
        data_file = _analyze_data_file(path)
        if data_file is None:
            return  # ITK names the missing data file itself
        _, size = _payload(data_file)
        path = data_file
    if size < offset + data:
        raise _damaged(path, f"the header promises {offset + data} bytes, the file holds {size}")


# ----------------------------------------------------------------------------------------------
# NRRD

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
        "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
        "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_SIZE = {name: size for size, names in _NRRD_TYPES.items() for name in names}


def _read_header_lines(path: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    """Text lines up to the first empty line (or the end), and the byte offset after it."""
    with open(path, "rb") as handle:
        block = handle.read(limit)
    lines, position = [], 0
    while position < len(block):
        end = block.find(b"\n", position)
        if end < 0:
            lines.append(block[position:].decode("latin-1").rstrip("\r"))
            return lines, len(block)
        line = block[position:end].decode("latin-1").rstrip("\r")
        position = end + 1
        if not line:
            return lines, position
        lines.append(line)
    return lines, position


def _check_nrrd(path: Path) -> None:
    lines, data_start = _read_header_lines(path)
    if not lines or not lines[0].startswith("NRRD"):
        return
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        element = _NRRD_SIZE[fields["type"].lower()]
    except (KeyError, ValueError):
        return  # an unusual header: ITK's reader judges it
    encoding = fields.get("encoding", "raw").lower()
    expected = math.prod(sizes) * element
    detached = fields.get("data file", fields.get("datafile"))
    data_path, offset = path, data_start
    if detached is not None:
        if detached.startswith("LIST") or len(detached.split()) > 1 or "%" in detached:
            return  # a list of files or a pattern: left to ITK
        data_path = (path.parent / detached) if not Path(detached).is_absolute() else Path(detached)
        offset = 0
        if not data_path.is_file():
            raise _damaged(path, f"its data file {detached} is missing")
    skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if skip == -1 and encoding == "raw":
        return  # data at the end of the file: its size alone cannot tell
    if int(fields.get("line skip", fields.get("lineskip", "0")) or 0):
        return
    if encoding == "raw":
        held = data_path.stat().st_size - offset - max(skip, 0)
    elif encoding in ("gzip", "gz"):
        held = _inflate_size(data_path, offset, 31, multi_member=True)
    else:
        return  # ascii, hex, bzip2: ITK checks those while parsing
    if held < expected:
        raise _damaged(data_path, f"the header promises {expected} bytes of data, the file holds {held}")


# ----------------------------------------------------------------------------------------------
# MetaImage

_META_SIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _check_meta(path: Path) -> None:
    with open(path, "rb") as handle:
        block = handle.read(1 << 16)
    fields, data_start = {}, None
    position = 0
    while position < len(block):
        end = block.find(b"\n", position)
        end = len(block) if end < 0 else end
        line = block[position:end].decode("latin-1").strip()
        position = end + 1
        key, sep, value = line.partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            data_start = min(position, len(block))
            break
    try:
        dims = [int(v) for v in fields["dimsize"].split()]
        element = _META_SIZE[fields["elementtype"].upper()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        data_file = fields["elementdatafile"]
    except (KeyError, ValueError):
        return
    expected = math.prod(dims) * element * channels
    if data_file.upper() == "LOCAL":
        data_path, offset = path, data_start
    elif data_file.upper().startswith("LIST") or len(data_file.split()) > 1 or "%" in data_file:
        return
    else:
        data_path = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
        offset = 0
        if not data_path.is_file():
            raise _damaged(path, f"its data file {data_file} is missing")
    header_size = int(fields.get("headersize", "0") or 0)
    if header_size == -1:
        return
    offset += max(header_size, 0)
    if fields.get("compresseddata", "false").lower() == "true":
        held = _inflate_size(data_path, offset, 47, multi_member=False)
    else:
        held = data_path.stat().st_size - offset
    if held < expected:
        raise _damaged(data_path, f"the header promises {expected} bytes of data, the file holds {held}")


# ----------------------------------------------------------------------------------------------
# VTK legacy


def _check_vtk(path: Path) -> None:
    with open(path, "rb") as handle:
        block = handle.read(1 << 12)
    if not block.startswith(b"# vtk DataFile"):
        return
    text = block.decode("latin-1")
    if not re.search(r"^BINARY\s*$", text, re.MULTILINE):
        return  # ASCII: ITK stops with an error on missing numbers
    dims = re.search(r"^DIMENSIONS\s+(\d+)\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    scalars = re.search(r"^SCALARS\s+\S+\s+(\w+)(?:\s+(\d+))?", text, re.MULTILINE)
    table = re.search(r"^LOOKUP_TABLE\s+\S+[^\n]*\n", text, re.MULTILINE)
    sizes = {"bit": None, "unsigned_char": 1, "char": 1, "unsigned_short": 2, "short": 2, "unsigned_int": 4,
             "int": 4, "unsigned_long": 8, "long": 8, "float": 4, "double": 8}
    if not (dims and scalars and table) or sizes.get(scalars.group(1).lower()) is None:
        return
    count = math.prod(int(v) for v in dims.groups()) * int(scalars.group(2) or 1)
    expected = count * sizes[scalars.group(1).lower()]
    held = path.stat().st_size - len(text[: table.end()].encode("latin-1"))
    if held < expected:
        raise _damaged(path, f"the header promises {expected} bytes of data, the file holds {held}")


# ----------------------------------------------------------------------------------------------


def check_complete(path) -> None:
    """Raise :class:`Damaged` (an :class:`InverseRegError`) when the image file at ``path``, or
    the data file its header names, holds less data than the header says, or when a compressed
    stream in it is cut short or corrupt. Files of other formats pass unchecked (but for gzip)."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        _check_nifti(path)
    elif lower.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif lower.endswith((".mha", ".mhd")):
        _check_meta(path)
    elif lower.endswith(".vtk"):
        _check_vtk(path)
    else:
        with open(path, "rb") as handle:
            if handle.read(2) == _GZIP_MAGIC:
                _inflate_size(path, 0, 31, multi_member=True)
