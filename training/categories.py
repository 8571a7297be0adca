"""How a categorical cell becomes its category string, the same in training and serving.

A module of its own, importing numpy only: serving replicas and the request parser
use it without loading pandas or the spec models.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MISSING_CATEGORY = ""  # a missing categorical value is a category of its own


def category_text(value: Any) -> str:
    """A categorical cell as its category string: missing → '' , whole numbers without
    '.0' (a column of codes with a gap is read as floats, a JSON client sends ints),
    anything else as str()."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return MISSING_CATEGORY
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)
