"""The float32 forward kernel's arithmetic, emulated in NumPy: where its error against float64 comes from.

    python bench/emulate_float32.py [--sk 4096,65536] [--variants kernel,one-sum,exact-scores,compensated]

The float32 path of ``kernels/fwd_sm80.cu`` computes S = Q Kᵀ and O += P V on tf32 tensor cores by
3xTF32 (x = big + small, both tf32; big·big' + small·big' + big·small' per k8 step into a fresh
accumulator, then one rounded float32 add), keeps each lane's row sum l of exp2(c·s − m) over its
columns, and rescales O and l when the row max grows by more than 8 (log2 units). This script
replays that order of operations on the CPU for Sq = 64 queries over Sk keys at D = 64, with the
tensor core modelled as an exact sum of one k8 step's products rounded toward zero (the hardware
truncates), and prints the max |error| against float64 beside a naive float32 computation's
(NumPy's, summing as BLAS does). Variants:

- ``kernel``: the kernel as it is: O's running sum moved out every 1024 keys (kFlushKeys; added to
  what was moved before, rescaled to the row max of the moment), l a compensated (Kahan) sum;
- ``one-sum``: the kernel before that: one float32 sum of every k8 step's product over all of Sk,
  l plain (what the GPU measured at 2.6-6.4x naive);
- ``exact-scores``: ``one-sum`` with S rounded once from float64 (no 3xTF32 error in the scores);
- ``compensated``: ``one-sum`` with both sums compensated (a second register block as large as O).

Sq = 64, D = 64, seed 2 are the GPU test's inputs: the ``one-sum`` row came within 1.5x of the
error the GPU gave on them (``bench/NOTES.md``, "float32 accuracy over long key sequences"), which
is what makes the other rows predictions worth acting on.
"""

import argparse
import math

import numpy as np

F32, F64 = np.float32, np.float64
K_STEP = 8  # keys (or head-dim columns) per m16n8k8 tf32 product
SLACK = 8.0  # kRescaleSlack of attn/softmax.cuh
QUAD = 4  # lanes sharing a row's columns


def tf32(x):
    """cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (on the magnitude bits)."""
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(F32)


def toward_zero(x):
    """float64 to float32, rounded toward zero (the tensor cores' accumulation)."""
    r = x.astype(F32)
    over = np.abs(r.astype(F64)) > np.abs(x)
    r[over] = np.nextafter(r[over], F32(0))
    return r


def product_3xtf32(a, b):
    """One k8 step, a (M, 8) @ b (8, N), as mma_3xtf32 computes it into a fresh accumulator."""
    a_big, b_big = tf32(a), tf32(b)
    a_small, b_small = tf32(a - a_big), tf32(b - b_big)
    part = toward_zero(a_big.astype(F64) @ b_big.astype(F64))
    part = toward_zero(part.astype(F64) + a_small.astype(F64) @ b_big.astype(F64))
    return toward_zero(part.astype(F64) + a_big.astype(F64) @ b_small.astype(F64))


class Sum:
    """A float32 running sum, plain or compensated (Kahan), rescalable."""

    def __init__(self, shape, compensated):
        self.value = np.zeros(shape, F32)
        self.error = np.zeros(shape, F32)
        self.compensated = compensated

    def add(self, x):
        if not self.compensated:
            self.value = self.value + x
            return
        y = x - self.error
        t = self.value + y
        self.error = (t - self.value) - y
        self.value = t

    def scale(self, alpha):
        self.value = self.value * alpha
        self.error = self.error * alpha

    def result(self):
        return self.value - self.error


def kernel(q, k, v, scale, block_n=64, exact_scores=False, compensated_o=False, compensated_l=False,
           move_keys=None):
    """out of the float32 forward for q (Sq, D) against k, v (Sk, D), tile by tile as the kernel goes."""
    rows = q.shape[0]
    c = F32(scale * math.log2(math.e))
    m = np.full(rows, -np.inf, F32)
    o = Sum((rows, v.shape[1]), compensated_o)
    l = Sum((rows, QUAD), compensated_l)
    moved, m_moved = np.zeros((rows, v.shape[1]), F32), np.full(rows, -np.inf, F32)

    def rescale_moved():
        f = np.where(np.isneginf(m_moved), F32(0), np.exp2((m_moved - m).astype(F64)).astype(F32))
        return moved * f[:, None]

    for j0 in range(0, k.shape[0], block_n):
        kj, vj = k[j0:j0 + block_n], v[j0:j0 + block_n]
        if exact_scores:
            s = (q.astype(F64) @ kj.astype(F64).T).astype(F32)
        else:
            s = np.zeros((rows, kj.shape[0]), F32)
            for d0 in range(0, q.shape[1], K_STEP):
                s = s + product_3xtf32(q[:, d0:d0 + K_STEP], kj[:, d0:d0 + K_STEP].T)
        row_max = (c * s.max(axis=1)).astype(F32)
        if (row_max > m + SLACK).any():  # the kernel decides per warp; every row moves with it here
            m_new = np.maximum(m, row_max)
            alpha = np.where(np.isneginf(m), F32(0), np.exp2((m - m_new).astype(F64)).astype(F32))
            o.scale(alpha[:, None])
            l.scale(alpha[:, None])
            m = m_new
        p = np.exp2((s.astype(F64) * F64(c) - m[:, None]).astype(F32).astype(F64)).astype(F32)
        # Each lane of the quad owns columns 2t, 2t + 1 of every n8 tile and sums them in order.
        lanes = p.reshape(rows, -1, QUAD, 2)
        tile_sum = np.zeros((rows, QUAD), F32)
        for nt in range(lanes.shape[1]):
            for e in range(2):
                tile_sum = tile_sum + lanes[:, nt, :, e]
        l.add(tile_sum)
        for k0 in range(0, kj.shape[0], K_STEP):
            o.add(product_3xtf32(p[:, k0:k0 + K_STEP], vj[k0:k0 + K_STEP]))
        if move_keys and (j0 + block_n) % move_keys == 0 and j0 + block_n < k.shape[0]:
            moved, m_moved = rescale_moved() + o.result(), m.copy()
            o = Sum((rows, v.shape[1]), compensated_o)
    lane_sums = l.result()
    row_sum = (lane_sums[:, 0] + lane_sums[:, 1]) + (lane_sums[:, 2] + lane_sums[:, 3])
    return (o.result() + rescale_moved()) / row_sum[:, None]


VARIANTS = {
    "kernel": dict(move_keys=1024, compensated_l=True),
    "one-sum": {},
    "exact-scores": dict(exact_scores=True),
    "compensated": dict(compensated_o=True, compensated_l=True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sk", default="4096,65536", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()
    scale = 1 / 8
    for sk in args.sk:
        rng = np.random.default_rng(args.seed)
        q, k, v = (rng.standard_normal(shape).astype(F32) for shape in ((64, 64), (sk, 64), (sk, 64)))
        S = (q.astype(F64) * scale) @ k.astype(F64).T
        P = np.exp(S - S.max(axis=1, keepdims=True))
        exact = (P / P.sum(axis=1, keepdims=True)) @ v.astype(F64)
        S32 = (q * F32(scale)) @ k.T
        P32 = np.exp(S32 - S32.max(axis=1, keepdims=True))
        naive = float(np.abs((P32 / P32.sum(axis=1, keepdims=True)) @ v - exact).max())
        print(f"Sk = {sk}, block_n = {args.block_n}: naive float32 {naive:.3g}")
        for name in args.variants:
            error = float(np.abs(kernel(q, k, v, scale, args.block_n, **VARIANTS[name]) - exact).max())
            print(f"  {name:14} {error:9.3g}   {error / naive:5.2f}x naive", flush=True)


if __name__ == "__main__":
    main()
