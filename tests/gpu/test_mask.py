"""The CUDA mask (cuda_src/attn/mask.cuh) and the Python one (cuflash/_mask.py) agree tile by tile.

A probe kernel asks ``Mask`` every question the kernels ask — which key tiles a query tile needs,
which query tiles a key tile needs, whether a tile pair needs element masking, and each row's
visible columns (both orientations, and the forward's per-CTA ``RowBand``), and which rows see
any key at all — on awkward sizes, offsets and windows; every answer is checked against
``MaskSpec`` and its brute-force matrix.
"""

import itertools

import numpy
import pytest

from cuflash._cuda import runtime
from cuflash._mask import MaskSpec

from ..helpers import gpu_skip_reason

_SKIP = gpu_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"no usable GPU: {_SKIP}")

UNBOUNDED = 1 << 62
TILE = 16  # the probe's BlockM = BlockN
COLS = 32  # columns of the per-row questions

_PROBE = r"""
using namespace cuflash;
// One thread per (query tile, key tile) pair of one mask: the tile questions, and per row of the
// tile pair the visible columns, for rows as queries and as keys.
extern "C" __global__ void probe(const long long* spec, int n_qt, int n_kt, int* tiles, int* rows) {
    const int qt = blockIdx.x, kt = threadIdx.x;
    if (qt >= n_qt || kt >= n_kt) return;
    const Mask m{spec[2], spec[3], spec[4], static_cast<int>(spec[0]), static_cast<int>(spec[1])};
    const int i0 = qt * 16, i1 = i0 + 16 < m.seqlen_q ? i0 + 16 : m.seqlen_q;
    const int j0 = kt * 16, j1 = j0 + 16 < m.seqlen_k ? j0 + 16 : m.seqlen_k;
    int* t = tiles + (qt * n_kt + kt) * 9;
    const TileRange kr = m.key_tiles<16>(i0, i1), qr = m.query_tiles<16>(j0, j1);
    int lo, hi;
    m.keys_of_all(i0, i1, lo, hi);
    t[0] = kr.begin; t[1] = kr.end; t[2] = qr.begin; t[3] = qr.end;
    t[4] = m.full(i0, i1, j0, j0 + 16); t[5] = lo; t[6] = hi;
    m.live_queries(t[7], t[8]);
    int* r = rows + (qt * n_kt + kt) * 16 * 6;
    const Mask::RowBand band = m.row_band(i0);
    for (int d = 0; d < 16; ++d) {
        m.keys_of_query(i0 + d, j0, 32, r[6 * d], r[6 * d + 1]);
        m.queries_of_key(j0 + d, i0, 32, r[6 * d + 2], r[6 * d + 3]);
        r[6 * d + 4] = band.first(d) - j0;
        r[6 * d + 5] = band.last(d, m.seqlen_k) - j0;
    }
}
"""


def _probe_kernel():
    import cupy

    code = runtime.cuda_source("attn/mask.cuh") + _PROBE
    return cupy.RawModule(code=code, options=("--std=c++20",)).get_function("probe")


def _cases():
    sizes = [(1, 1), (5, 2), (2, 5), (17, 33), (33, 17), (64, 64), (70, 200), (200, 70)]
    windows = [(None, None), (None, 0), (0, 0), (3, None), (None, 5), (7, 2), (40, 0), (0, 40), (100, 100)]
    for (sq, sk), (left, right), align in itertools.product(sizes, windows, ("bottom_right", "top_left")):
        yield MaskSpec(sq, sk, sk - sq if align == "bottom_right" else 0, left, right)


def _clip(x, cols):
    return max(-1, min(cols, x))


@pytest.mark.parametrize("spec", list(_cases()), ids=lambda s: f"{s.seqlen_q}x{s.seqlen_k}-o{s.offset}-w{s.left},{s.right}")
def test_cuda_mask_agrees_with_maskspec(spec):
    import cupy

    kernel = _probe_kernel()
    n_qt, n_kt = -(-spec.seqlen_q // TILE), -(-spec.seqlen_k // TILE)
    side = lambda x: UNBOUNDED if x is None else x  # noqa: E731
    params = cupy.asarray([spec.seqlen_q, spec.seqlen_k, spec.offset, side(spec.left), side(spec.right)],
                          dtype=numpy.int64)
    tiles = cupy.full((n_qt, n_kt, 9), -7, dtype=numpy.int32)
    rows = cupy.full((n_qt, n_kt, 16, 6), -7, dtype=numpy.int32)
    kernel((n_qt,), (n_kt,), (params, numpy.int32(n_qt), numpy.int32(n_kt), tiles, rows))
    tiles, rows = tiles.get(), rows.get()
    visible = spec.matrix()
    for qt, kt in itertools.product(range(n_qt), range(n_kt)):
        i0, i1 = qt * TILE, min(spec.seqlen_q, qt * TILE + TILE)
        j0, j1 = kt * TILE, min(spec.seqlen_k, kt * TILE + TILE)
        where = f"query tile {qt}, key tile {kt}"
        t = tiles[qt, kt]
        lo, hi = spec.key_range(i0, i1)
        want = (lo // TILE, -(-hi // TILE)) if hi > lo else None
        assert (tuple(t[:2]) if t[1] > t[0] else None) == want, where
        lo, hi = spec.query_range(j0, j1)
        want = (lo // TILE, -(-hi // TILE)) if hi > lo else None
        assert (tuple(t[2:4]) if t[3] > t[2] else None) == want, where
        # full() takes a whole 16-key tile, so a tile past Sk is never full.
        assert bool(t[4]) == (j0 + TILE <= spec.seqlen_k and visible[i0:i1, j0:j0 + TILE].all()), where
        lo, hi = spec.keys_seen_by_all(i0, i1)
        assert (t[5], t[6]) == (lo, hi) or (t[6] <= t[5] and hi <= lo), where
        # The live queries: exactly the rows that see some key.
        live = numpy.zeros(spec.seqlen_q, bool)
        live[t[7]:t[8]] = True
        assert numpy.array_equal(live, spec.sees_any(numpy.arange(spec.seqlen_q))), where
        # Every key tile any query of the tile sees lies in the range, and none outside it is needed.
        seen_tiles = {j // TILE for j in numpy.nonzero(visible[i0:i1].any(axis=0))[0]}
        if seen_tiles:
            assert t[0] <= min(seen_tiles) and max(seen_tiles) < t[1], where
        for d in range(16):
            r = rows[qt, kt, d]
            i, j = i0 + d, j0 + d
            cols = numpy.arange(COLS)
            if i < spec.seqlen_q:
                seen = spec.visible(i, j0 + cols)
                assert numpy.array_equal((cols >= r[0]) & (cols <= r[1]), seen), f"{where}, query row {i}"
            if d < i1 - i0:
                band = (cols >= r[4]) & (cols <= r[5])
                assert numpy.array_equal(band, spec.visible(i, j0 + cols)), f"{where}, band of row {i}"
            if j < spec.seqlen_k:
                seen = spec.visible(i0 + cols, j) & (i0 + cols < spec.seqlen_q) | (i0 + cols >= spec.seqlen_q) & \
                    _transposed_rule(spec, i0 + cols, j)
                got = (cols >= r[2]) & (cols <= r[3])
                assert numpy.array_equal(got, seen), f"{where}, key row {j}"
            else:
                assert r[3] < r[2] or r[3] == -1, f"{where}: key {j} past Sk must see no query"


def _transposed_rule(spec, i, j):
    """The band rule for rows past Sq too (the backward's key rows ignore Sq: L2 = +inf there)."""
    d = j - (i + spec.offset)
    seen = numpy.ones(numpy.shape(i), bool)
    if spec.left is not None:
        seen &= d >= -spec.left
    if spec.right is not None:
        seen &= d <= spec.right
    return seen
