"""Type aliases of the public signatures."""

from typing import Any, Literal, Optional

# Operands are arrays of any framework cuflash takes (NumPy, CuPy, DLPack producers): no one type.
Array = Any
Window = Optional[tuple[Optional[int], Optional[int]]]
Alignment = Literal["bottom_right", "top_left"]
Backend = Literal["auto", "numpy", "cuda"]
