"""Fast gzip compression of output files (the ``.nii.gz`` images and fields).

ITK compresses NIfTI at zlib's default level, about 10 MB/s of input on this project's 2-core
CPU for a float64 displacement field: writing the two fields of a 1 mm brain took longer than the
registration. Displacement fields and resampled images are noisy floating-point data on which
deflate's string matching finds little; zlib's run-length strategy at level 1 keeps most of the
gain (zero background, repeated exponents) at several times the speed (docs/benchmark.md).

With ``threads`` > 1 the data is cut into blocks compressed in parallel (zlib releases the GIL),
each its own gzip member: RFC 1952 allows a file to be several members, and zlib's ``gzread``
(ITK, so SimpleITK, ANTs and Slicer), Python's ``gzip`` and nibabel read them as one stream.
"""
from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: zlib level and strategy of :func:`gzip_file` unless told otherwise
LEVEL = 1
STRATEGY = zlib.Z_RLE
#: input bytes per gzip member when compressing in parallel
BLOCK = 8 << 20


def _member(data: bytes, level: int, strategy: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31, 8, strategy)
    return compressor.compress(data) + compressor.flush()


def gzip_file(source, target, level: int = LEVEL, strategy: int = STRATEGY, threads: int = 1) -> None:
    """Compress the file ``source`` into ``target`` (gzip; several members when ``threads`` > 1).

    ``target`` is written in place: callers write to a temporary name and rename (see
    :func:`InverseRegLib.imageio.write_image_atomic`)."""
    source, target = Path(source), Path(target)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        if threads <= 1:
            compressor = zlib.compressobj(level, zlib.DEFLATED, 31, 8, strategy)
            while block := reader.read(BLOCK):
                writer.write(compressor.compress(block))
            writer.write(compressor.flush())
            return
        with ThreadPoolExecutor(threads) as pool:
            pending = []
            while block := reader.read(BLOCK):
                pending.append(pool.submit(_member, block, level, strategy))
                if len(pending) > threads:  # bounded memory: at most threads + 1 blocks in flight
                    writer.write(pending.pop(0).result())
            for future in pending:
                writer.write(future.result())


def gzip_bytes(data: bytes, target, level: int = LEVEL, strategy: int = STRATEGY, threads: int = 1,
               block: int = BLOCK) -> None:
    """:func:`gzip_file` for data already in memory (e.g. a NIfTI file whose header was edited);
    ``block``: input bytes per gzip member when ``threads`` > 1."""
    view = memoryview(data)
    blocks = [view[i:i + block] for i in range(0, len(view), block)] or [view[:0]]
    with open(Path(target), "wb") as writer:
        if threads <= 1:
            compressor = zlib.compressobj(level, zlib.DEFLATED, 31, 8, strategy)
            for block in blocks:
                writer.write(compressor.compress(block))
            writer.write(compressor.flush())
            return
        with ThreadPoolExecutor(threads) as pool:
            for member in pool.map(lambda block: _member(block, level, strategy), blocks):
                writer.write(member)


def default_threads() -> int:
    """Threads for compression: the CPUs this process may use, at most 4."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(4, available))
