"""Which keys each query may see: the one Python statement of the mask rule.

The reference, the NumPy backend, the tests and the benchmarks all ask ``MaskSpec``; the CUDA
kernels ask its counterpart ``cuda_src/attn/mask.cuh``, which answers the same questions with the
same formulas (``tests/gpu/test_mask.py`` checks that they agree tile by tile; ``tests/test_mask.py``
checks ``MaskSpec``'s answers against its brute-force matrix).

The rule (a band around the aligned diagonal): query i may see key j iff 0 <= j < Sk and

    i + offset - left  <=  j  <=  i + offset + right,

with ``offset`` = Sk - Sq for the bottom-right alignment and 0 for top-left; ``left`` or ``right``
None means unbounded on that side. Causal attention is ``right = 0``; full attention is
``left = right = None``; a sliding window bounds both sides.
"""

from dataclasses import dataclass
from typing import Optional

import numpy


@dataclass(frozen=True)
class MaskSpec:
    seqlen_q: int
    seqlen_k: int
    offset: int
    left: Optional[int] = None
    right: Optional[int] = None

    @property
    def is_full(self):
        """Every query sees every key (no band)."""
        return self.left is None and self.right is None

    def visible(self, i, j):
        """Whether query i sees key j; broadcasts over index arrays (the result has the broadcast shape,
        also where the band leaves i unused). Keys outside 0..Sk-1 are never seen."""
        i, j = numpy.broadcast_arrays(i, j)
        seen = (j >= 0) & (j < self.seqlen_k)
        d = j - (i + self.offset)
        if self.left is not None:
            seen = seen & (d >= -self.left)
        if self.right is not None:
            seen = seen & (d <= self.right)
        return seen

    def matrix(self):
        """(Sq, Sk) boolean matrix of ``visible`` (for the reference and tests: Sq·Sk memory)."""
        return self.visible(numpy.arange(self.seqlen_q)[:, None], numpy.arange(self.seqlen_k)[None, :])

    # Per-row bounds, unclipped: the keys of query i lie in [first_key(i), last_key(i)].
    def first_key(self, i):
        return -(1 << 62) if self.left is None else i + self.offset - self.left

    def last_key(self, i):
        return 1 << 62 if self.right is None else i + self.offset + self.right

    def sees_any(self, i):
        """Whether query i (an index array) sees at least one key; rows that see none are the
        fully masked rows of the contract."""
        i = numpy.asarray(i, dtype=numpy.int64)
        # Sides wider than every distance in the matrix are unbounded (and keep int64 from overflowing).
        reach = self.seqlen_q + self.seqlen_k + abs(self.offset)
        lo, hi = numpy.zeros_like(i), numpy.full_like(i, self.seqlen_k - 1)
        if self.left is not None and self.left < reach:
            lo = numpy.maximum(lo, i + self.offset - self.left)
        if self.right is not None and self.right < reach:
            hi = numpy.minimum(hi, i + self.offset + self.right)
        return lo <= hi

    def key_range(self, i0, i1):
        """Keys [lo, hi) that some query of i0..i1-1 may see, clipped to 0..Sk (lo >= hi: none)."""
        lo = max(0, self.first_key(i0))
        hi = min(self.seqlen_k, self.last_key(i1 - 1) + 1)
        return lo, max(lo, hi)

    def keys_seen_by_all(self, i0, i1):
        """Keys [lo, hi) that every query of i0..i1-1 sees (lo >= hi: none)."""
        lo = max(0, self.first_key(i1 - 1))
        hi = min(self.seqlen_k, self.last_key(i0) + 1)
        return lo, max(lo, hi)

    def query_range(self, j0, j1):
        """Queries [lo, hi) that may see some key of j0..j1-1, clipped to 0..Sq (the transposed question)."""
        lo = 0 if self.right is None else max(0, j0 - self.offset - self.right)
        hi = self.seqlen_q if self.left is None else min(self.seqlen_q, j1 - 1 - self.offset + self.left + 1)
        return lo, max(lo, hi)

    def tile_is_full(self, i0, i1, j0, j1):
        """Whether every query of i0..i1-1 sees every key of j0..j1-1 (such a tile needs no mask)."""
        lo, hi = self.keys_seen_by_all(i0, i1)
        return lo <= j0 and j1 <= hi
