"""The Open Inference Protocol's tensor datatype names and their numpy dtypes, both ways (from dtypes.TYPES)."""

from __future__ import annotations

import numpy as np

from yatdeploy import dtypes

DATATYPES: dict[str, np.dtype] = {t.v2: t.numpy for t in dtypes.TYPES}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    return _NAMES[np.dtype(dtype)]


