"""Moving points between the two images through the fields, and target registration error.

A point placed on the **fixed** image goes into moving space through the **forward** field (which
lives on the fixed grid): ``q = p + forward(p)``. A point on the **moving** image goes into fixed
space through the **backward** field: ``p = q + backward(q)``. Each is one evaluation of a field
by trilinear interpolation (what ITK's ``DisplacementFieldTransform.TransformPoint`` does), never
an iterative inversion of the other field.

Coordinates: the library works in LPS (ITK's, and the field files'). Files say what they hold:

- Slicer markups JSON (``.mrk.json``): each markup's ``coordinateSystem`` (``LPS`` or ``RAS``;
  Slicer writes LPS by default); written back in the same system, every other field kept.
- Slicer's older fiducial CSV (``.fcsv``): its ``# CoordinateSystem`` line (``RAS``/``LPS``, or
  Slicer's old codes 0 = RAS, 1 = LPS; RAS when absent); written back with every column kept.
- CSV with a header: columns ``x,y,z`` (optionally ``label`` or ``name``), in the system the
  caller names (default LPS, as ``antsApplyTransformsToPoints`` expects); written the same way.

RAS = LPS with x and y negated.
"""
from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InverseRegError
from .fields import image_to_field
from .grid import Geometry

COORDINATE_SYSTEMS = ("LPS", "RAS")
_FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS


@dataclass
class PointSet:
    """Points read from a file: ``lps`` (N, 3) mm and their ``names``, plus what it takes to write
    the same kind of file back (``kind``: ``"csv"`` or ``"markups"``; ``coordinates``: the file's
    system for CSV; ``document``: the markups JSON; ``slots``: (markup, control point) of each)."""
    lps: np.ndarray
    names: list[str]
    kind: str
    coordinates: str = "LPS"
    document: dict | None = None
    slots: list[tuple[int, int]] = field(default_factory=list)


def is_markups(path) -> bool:
    return str(path).lower().endswith(".json")


def is_fcsv(path) -> bool:
    return str(path).lower().endswith(".fcsv")


def point_file_suffix(path) -> str:
    """The suffix an output of the same kind as ``path`` gets."""
    return ".mrk.json" if is_markups(path) else ".fcsv" if is_fcsv(path) else ".csv"


_FCSV_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]


def _read_fcsv(path: Path) -> PointSet:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InverseRegError(f"cannot read fiducial file {path}: {error}") from None
    header = [line for line in lines if line.startswith("#")]
    system, columns = "RAS", list(_FCSV_COLUMNS)
    for line in header:
        key, _, value = line.lstrip("#").partition("=")
        key, value = key.strip().lower(), value.strip()
        if key == "coordinatesystem":
            system = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
            if system not in COORDINATE_SYSTEMS:
                raise InverseRegError(f"fiducial file {path}: unknown CoordinateSystem {value!r} (LPS or RAS)")
        elif key == "columns":
            columns = [c.strip() for c in value.split(",")]
    if not {"x", "y", "z"} <= set(columns):
        raise InverseRegError(f"fiducial file {path}: its columns line has no x, y, z")
    rows = list(csv.reader(line for line in lines if line.strip() and not line.startswith("#")))
    lps, names = [], []
    for number, row in enumerate(rows, start=1):
        values = dict(zip(columns, row))
        try:
            position = np.array([float(values["x"]), float(values["y"]), float(values["z"])])
        except (KeyError, ValueError):
            raise InverseRegError(f"fiducial file {path}: point {number} has no numeric x, y, z") from None
        lps.append(position * _FLIP if system == "RAS" else position)
        names.append(values.get("label") or values.get("id") or str(number))
    document = {"header": header, "columns": columns, "rows": rows}
    return PointSet(np.asarray(lps, dtype=np.float64).reshape(-1, 3), names, "fcsv", system, document)


def read_points(path, coordinates: str = "LPS") -> PointSet:
    """Read a ``.mrk.json`` or a CSV point list. ``coordinates`` (``LPS``/``RAS``) is the system of a
    CSV file; a markups file names its own. Raises :class:`InverseRegError` naming the file."""
    path = Path(path)
    if coordinates not in COORDINATE_SYSTEMS:
        raise InverseRegError(f"coordinates must be LPS or RAS, got {coordinates!r}")
    if not path.is_file():
        raise InverseRegError(f"point file not found: {path}")
    if is_markups(path):
        points = _read_markups(path)
    elif is_fcsv(path):
        points = _read_fcsv(path)
    else:
        points = _read_csv(path, coordinates)
    if len(points.names) == 0:
        raise InverseRegError(f"point file {path} holds no points")
    return points


def _read_markups(path: Path) -> PointSet:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        markups = document["markups"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InverseRegError(f"cannot read markups file {path}: {type(error).__name__}: {error}") from None
    lps, names, slots = [], [], []
    for m_index, markup in enumerate(markups):
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in COORDINATE_SYSTEMS:
            raise InverseRegError(f"markups file {path}: unknown coordinateSystem {system!r} (LPS or RAS)")
        units = markup.get("coordinateUnits", "mm")
        if units not in ("mm", ["mm", "mm", "mm"]):
            raise InverseRegError(f"markups file {path}: coordinates in {units!r}, only mm is supported")
        for p_index, point in enumerate(markup.get("controlPoints", [])):
            if point.get("positionStatus", "defined") != "defined":
                continue  # an unplaced point has no position to move
            try:
                position = np.asarray(point["position"], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                raise InverseRegError(f"markups file {path}: control point {p_index + 1} has no position") from None
            if position.shape != (3,) or not np.isfinite(position).all():
                raise InverseRegError(f"markups file {path}: control point {p_index + 1} position is not 3 numbers")
            lps.append(position * _FLIP if system == "RAS" else position)
            names.append(str(point.get("label") or point.get("id") or f"{len(names) + 1}"))
            slots.append((m_index, p_index))
    return PointSet(np.asarray(lps, dtype=np.float64).reshape(-1, 3), names, "markups", document=document, slots=slots)


def _read_csv(path: Path, coordinates: str) -> PointSet:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = [c.strip().lower() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InverseRegError(f"cannot read point file {path}: {error}") from None
    if rows and not {"x", "y", "z"} <= set(header):
        raise InverseRegError(f"point file {path} needs a header with columns x,y,z (optionally label); got {header}")
    lps, names = [], []
    for number, row in enumerate(rows, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        try:
            position = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
        except ValueError:
            raise InverseRegError(f"point file {path} line {number}: x, y, z must be numbers") from None
        if not np.isfinite(position).all():
            raise InverseRegError(f"point file {path} line {number}: x, y, z must be finite")
        lps.append(position * _FLIP if coordinates == "RAS" else position)
        names.append(row.get("label") or row.get("name") or str(number - 1))
    return PointSet(np.asarray(lps, dtype=np.float64).reshape(-1, 3), names, "csv", coordinates)


def write_points(points: PointSet, lps: np.ndarray, path) -> Path:
    """Write ``lps`` (N, 3) in place of ``points``' positions, as the same kind of file in the same
    coordinate system (atomically: a temporary sibling, then a rename)."""
    from .imageio import write_text_atomic
    lps = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
    if lps.shape[0] != len(points.names):
        raise ValueError(f"{lps.shape[0]} positions for {len(points.names)} points")
    path = Path(path)
    if points.kind == "markups":
        document = copy.deepcopy(points.document)
        for (m_index, p_index), position in zip(points.slots, lps):
            markup = document["markups"][m_index]
            system = str(markup.get("coordinateSystem", "LPS")).upper()
            value = position * _FLIP if system == "RAS" else position
            markup["controlPoints"][p_index]["position"] = [float(v) for v in value]
        write_text_atomic(json.dumps(document, indent=4) + "\n", path)
        return path
    if points.kind == "fcsv":
        import io
        columns = points.document["columns"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for row, position in zip(points.document["rows"], lps):
            row = list(row) + [""] * (len(columns) - len(row))
            value = position * _FLIP if points.coordinates == "RAS" else position
            for axis, name in enumerate("xyz"):
                row[columns.index(name)] = f"{value[axis]:.6f}"
            writer.writerow(row)
        write_text_atomic("\n".join(points.document["header"]) + "\n" + buffer.getvalue(), path)
        return path
    lines = ["label,x,y,z"]
    for name, position in zip(points.names, lps):
        value = position * _FLIP if points.coordinates == "RAS" else position
        label = name if "," not in name and '"' not in name else '"' + name.replace('"', '""') + '"'
        lines.append(f"{label},{value[0]:.6f},{value[1]:.6f},{value[2]:.6f}")
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def transform_points(lps: np.ndarray, displacement_field: sitk.Image, names=None, grid_name: str = "the field's grid") -> np.ndarray:
    """``p + d(p)`` for LPS points (N, 3), ``d`` the field interpolated trilinearly (float64).

    A point further than half a voxel outside the field's grid has no displacement there: it is
    refused with :class:`InverseRegError` naming it (``names``) and ``grid_name``. Within that
    half voxel the edge values extend outwards (ITK's border rule for images).
    """
    try:
        values, geometry = image_to_field(displacement_field)
    except ValueError as error:
        raise InverseRegError(f"cannot move points: {error}") from None
    lps = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
    index = geometry.physical_to_index(lps)
    size = np.asarray(geometry.size, dtype=np.float64)
    outside = np.any((index < -0.5) | (index > size - 0.5), axis=1)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        name = names[first] if names is not None else str(first + 1)
        raise InverseRegError(f"point {name!r} at LPS ({', '.join(f'{v:.2f}' for v in lps[first])}) mm is outside "
                              f"{grid_name} ({int(outside.sum())} of {len(lps)} points are)")
    return lps + _trilinear(values, geometry, index)


def _trilinear(values: np.ndarray, geometry: Geometry, index: np.ndarray) -> np.ndarray:
    """(z, y, x, C) samples at continuous (x, y, z) indices (N, 3), edge-clamped; -> (N, C)."""
    size = np.asarray(geometry.size)
    index = np.clip(index, 0.0, size - 1.0)
    base = np.minimum(np.floor(index).astype(np.int64), size - 1)
    fraction = index - base
    upper = np.minimum(base + 1, size - 1)
    out = np.zeros((index.shape[0], values.shape[-1]))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                x = upper[:, 0] if dx else base[:, 0]
                y = upper[:, 1] if dy else base[:, 1]
                z = upper[:, 2] if dz else base[:, 2]
                weight = ((fraction[:, 0] if dx else 1 - fraction[:, 0]) * (fraction[:, 1] if dy else 1 - fraction[:, 1])
                          * (fraction[:, 2] if dz else 1 - fraction[:, 2]))
                out += weight[:, None] * values[z, y, x]
    return out


def match_points(a: PointSet, b: PointSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair two point lists: by label when both have unique labels and share them all, else by
    order (equal counts needed). Returns index arrays into ``a`` and ``b`` and the pair names."""
    if len(set(a.names)) == len(a.names) and len(set(b.names)) == len(b.names) and set(a.names) == set(b.names):
        lookup = {name: i for i, name in enumerate(b.names)}
        return np.arange(len(a.names)), np.array([lookup[n] for n in a.names]), list(a.names)
    if len(a.names) != len(b.names):
        raise InverseRegError(f"cannot pair the point lists: {len(a.names)} fixed and {len(b.names)} moving points, "
                              "and their labels do not match one to one")
    return np.arange(len(a.names)), np.arange(len(b.names)), [f"{x}/{y}" if x != y else x for x, y in zip(a.names, b.names)]


def error_summary(errors: np.ndarray) -> dict:
    errors = np.asarray(errors, dtype=np.float64)
    return {"n": int(errors.size), "mean_mm": float(errors.mean()), "median_mm": float(np.median(errors)),
            "max_mm": float(errors.max())}


def target_registration_error(fixed_points: PointSet, moving_points: PointSet, forward: sitk.Image,
                              backward: sitk.Image) -> tuple[dict, list[dict]]:
    """TRE both ways for corresponding points: fixed points through forward against the moving
    points, moving points through backward against the fixed points, and the distance before
    registration. Returns (summary, per-point rows)."""
    ia, ib, names = match_points(fixed_points, moving_points)
    p, q = fixed_points.lps[ia], moving_points.lps[ib]
    p_in_moving = transform_points(p, forward, [fixed_points.names[i] for i in ia], "the fixed image's grid")
    q_in_fixed = transform_points(q, backward, [moving_points.names[i] for i in ib], "the moving image's grid")
    forward_error = np.linalg.norm(p_in_moving - q, axis=1)
    backward_error = np.linalg.norm(q_in_fixed - p, axis=1)
    before = np.linalg.norm(p - q, axis=1)
    summary = {"pairs": len(names), "before": error_summary(before),
               "fixed_to_moving": error_summary(forward_error), "moving_to_fixed": error_summary(backward_error)}
    rows = [{"label": n, "before_mm": float(b), "fixed_to_moving_mm": float(f), "moving_to_fixed_mm": float(m)}
            for n, b, f, m in zip(names, before, forward_error, backward_error)]
    return summary, rows
