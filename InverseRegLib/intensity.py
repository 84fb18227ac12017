"""Intensity normalisation shared by training and registration (stored in the model file)."""
from __future__ import annotations

import numpy as np

#: the default recipe; a model file carries its own copy so inference normalises as training did
DEFAULT_NORMALIZATION = {"method": "percentile", "low": 0.5, "high": 99.5}


def normalize(array: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Map intensities to [0, 1] robustly: clip at percentiles of the non-background voxels.

    Background is what lies at or below the ``low`` percentile of the whole image (zeros after
    skull stripping, air noise otherwise); the ``high`` percentile is taken over the rest so a
    large empty background does not compress the brain's range. Returns float32.
    """
    params = params or DEFAULT_NORMALIZATION
    if params.get("method") != "percentile":
        raise ValueError(f"unknown normalisation method {params.get('method')!r}")
    data = np.asarray(array, dtype=np.float32)
    lo = float(np.percentile(data, params["low"]))
    above = data[data > lo]
    if above.size == 0:
        return np.zeros_like(data)
    hi = float(np.percentile(above, params["high"]))
    if hi <= lo:
        return np.zeros_like(data)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
