"""Gzip output for the ``.nii.gz`` images and fields, at the speed of the disk when asked.

ITK compresses NIfTI at zlib's default level, about 10 MB/s of input on this project's 2-core
CPU for a float64 displacement field: writing the two fields of a 1 mm brain took longer than the
registration. Displacement fields and resampled images are noisy floating-point data on which
deflate finds little (zlib's run-length strategy at level 1 keeps a 1 mm brain's float64 field at
64 % of its size, at ~60 MB/s per core). So the outputs have three settings
(:data:`COMPRESSIONS`, the command line's ``--compression``):

* ``none`` (the default): a gzip file whose deflate blocks are *stored*, not compressed: every
  gzip reader reads it (the same format), the file is as large as the plain NIfTI, and it is
  written at memory speed (a CRC and a copy, ~0.2 s for 118 MB here);
* ``fast``: zlib level 1, run-length strategy, several blocks in parallel;
* ``small``: zlib level 6 (what ITK and ``gzip`` do by default), several blocks in parallel.

With ``threads`` > 1 the data is cut into blocks compressed in parallel (zlib releases the GIL),
each its own gzip member: RFC 1952 allows a file to be several members, and zlib's ``gzread``
(ITK, so SimpleITK, ANTs and Slicer), Python's ``gzip`` and nibabel read them as one stream.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: ``--compression`` name -> (zlib level, strategy)
COMPRESSIONS = {
    "none": (0, zlib.Z_DEFAULT_STRATEGY),
    "fast": (1, zlib.Z_RLE),
    "small": (6, zlib.Z_DEFAULT_STRATEGY),
}
DEFAULT_COMPRESSION = "none"
#: input bytes per gzip member when compressing in parallel
BLOCK = 8 << 20
#: input bytes handed to zlib at a time by the one-member stream: zlib returns each call's output
#: as a new buffer, and one of a whole 32 MB slab is fresh memory the kernel pages in 4 kB at a
#: time (a 1 mm brain's field, stored: 46 k page faults and 0.21-0.52 s to write; in 1 MB pieces,
#: none and ~0.1 s)
PIECE = 1 << 20


def compression_settings(compression: str) -> tuple[int, int]:
    """(zlib level, strategy) of a :data:`COMPRESSIONS` name; ValueError for an unknown one."""
    try:
        return COMPRESSIONS[compression]
    except KeyError:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}") from None


def _member(data, level: int, strategy: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31, 8, strategy)
    return compressor.compress(data) + compressor.flush()


class GzipWriter:
    """A write-only stream: bytes in, gzip out to the open binary ``handle``.

    Stored (``none``) or single-threaded output is one gzip member written as the data comes;
    otherwise blocks of ``block`` bytes become members compressed by ``threads`` threads, at most
    ``threads + 1`` blocks in memory (``block`` default :data:`BLOCK`). ``close()`` finishes the stream (it does not close ``handle``).
    """

    def __init__(self, handle, compression: str = DEFAULT_COMPRESSION, threads: int = 1, block: int | None = None):
        self._handle = handle
        self._level, self._strategy = compression_settings(compression)
        self._block = max(1, int(block or BLOCK))
        parallel = threads > 1 and self._level > 0
        self._pool = ThreadPoolExecutor(threads) if parallel else None
        self._threads = threads
        self._pending: list = []
        self._buffer = bytearray()
        self._stream = None if parallel else zlib.compressobj(self._level, zlib.DEFLATED, 31, 8, self._strategy)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._stream is not None:
            for start in range(0, len(view), PIECE):
                self._handle.write(self._stream.compress(view[start:start + PIECE]))
            return
        while len(view):
            take = min(len(view), self._block - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self._block:
                self._submit()

    def _submit(self) -> None:
        self._pending.append(self._pool.submit(_member, bytes(self._buffer), self._level, self._strategy))
        self._buffer = bytearray()
        while len(self._pending) > self._threads:
            self._handle.write(self._pending.pop(0).result())

    def close(self) -> None:
        if self._stream is not None:
            self._handle.write(self._stream.flush())
            self._stream = None
            return
        if self._pool is None:
            return
        try:
            if self._buffer or not self._pending:
                self._submit()
            for future in self._pending:
                self._handle.write(future.result())
        finally:
            self._pending = []
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def gzip_file(source, target, compression: str = DEFAULT_COMPRESSION, threads: int = 1) -> None:
    """Compress the file ``source`` into ``target`` (several members when ``threads`` > 1).

    ``target`` is written in place: callers write to a temporary name and rename (see
    :func:`InverseRegLib.imageio.write_image_atomic`)."""
    with open(Path(source), "rb") as reader, open(Path(target), "wb") as writer:
        stream = GzipWriter(writer, compression, threads)
        while block := reader.read(BLOCK):
            stream.write(block)
        stream.close()


def default_threads() -> int:
    """Threads for compression: the CPUs this process may use, at most 4."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(4, available))


def read_gzip(path) -> bytes:
    """The decompressed content of a gzip file, every member, CRC and length checked.

    A file written with ``compression="none"`` (deflate *stored* blocks, as zlib's level 0 makes
    them) is taken apart here with one copy of its data (~4x faster than ``zlib.decompress``,
    which grows its output in steps); anything else goes to ``gzip.decompress``. ``OSError`` or
    ``zlib.error``/``EOFError`` for a damaged or truncated file, as ``gzip`` raises them."""
    import gzip

    raw = memoryview(Path(path).read_bytes())
    stored = _unpack_stored(raw)
    return stored if stored is not None else gzip.decompress(raw)


def _unpack_stored(raw: memoryview) -> bytes | None:
    """The content of a single-member gzip file made only of stored deflate blocks, or None
    (another block type, several members, header flags other than none or FNAME, a bad length):
    the caller then decompresses it the usual way."""
    if len(raw) < 18 or raw[0] != 0x1F or raw[1] != 0x8B or raw[2] != 8 or raw[3] not in (0, 8):
        return None
    position = 10
    if raw[3] == 8:  # FNAME: a zero-terminated name
        end = bytes(raw[position:position + 4096]).find(b"\0")
        if end < 0:
            return None
        position += end + 1
    pieces = []
    total = 0
    while True:
        if position + 5 > len(raw):
            return None
        header = raw[position]
        if header & 0x06 or header & 0xF8:  # not a stored block, or padding bits set
            return None
        length = raw[position + 1] | raw[position + 2] << 8
        if length ^ (raw[position + 3] | raw[position + 4] << 8) != 0xFFFF:
            return None
        start = position + 5
        if start + length > len(raw):
            return None
        pieces.append(raw[start:start + length])
        total += length
        position = start + length
        if header & 1:  # BFINAL
            break
    if position + 8 != len(raw):  # another member or trailing bytes: leave it to gzip
        return None
    data = b"".join(pieces)
    crc, size = int.from_bytes(raw[position:position + 4], "little"), int.from_bytes(raw[position + 4:position + 8], "little")
    if zlib.crc32(data) != crc or size != total & 0xFFFFFFFF:
        raise OSError("CRC check failed: the gzip file is damaged")
    return data
