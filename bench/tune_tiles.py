"""Find spill-free tiles for the variants whose table tile spills registers (no GPU needed).

    python bench/tune_tiles.py [--family sm90|sm80|sm75] [--pass fwd|bwd]

Compiles every variant of the table (as the compile gate does, with spills as errors); for each
that fails, tries alternative tiles in a fixed order (fewer CTAs promised per SM, a narrower
streamed tile, shorter unrolls, a narrower owned tile, a higher register cap) and prints the first spill-free one as an
entry of ``FWD_SPILL_TILES`` / ``BWD_SPILL_TILES`` in cuflash/_cuda/variants.py. Alternatives are
slower than the table's tile; they serve only the variants that would otherwise spill.
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash._cuda import runtime, variants  # noqa: E402
from cuflash._cuda.variants import FwdTile, KvTile, RowsTile, WgTile  # noqa: E402

STRICT = ("-Xptxas=--warn-on-spills", "-Xptxas=--warning-as-error")


def compiles(source, kernel, defines, arch):
    try:
        runtime.compile_cubin(source, kernel, defines, arch, STRICT)
        return True
    except Exception:
        return False


# Register caps to try, highest first: ptxas may schedule more loads ahead under a higher cap
# and spill where a lower one fits (seen at float32, d = 192 and 256).
CAPS = (255, 232, 216, 200, 184, 176, 168, 160, 152, 144, 128)


def fwd_candidates(tile, kind_name):
    smallest_n = 16 if kind_name == "16bit" else 8
    shapes = [tile]
    if tile.min_blocks > 1:
        shapes.append(replace(tile, min_blocks=1))
    n = tile.block_n // 2
    while n >= smallest_n:
        shapes.append(replace(tile, block_n=n, min_blocks=1))
        n //= 2
    if tile.block_m // 2 >= 16 * tile.warps:
        shapes.append(replace(tile, block_m=tile.block_m // 2, min_blocks=1))
    if tile.warps > 1 and tile.block_m // 2 >= 16 * (tile.warps // 2):
        shapes.append(replace(tile, block_m=tile.block_m // 2, warps=tile.warps // 2, min_blocks=1))
    out = []
    for shape in shapes:
        out += [shape] + [replace(shape, max_regs=cap) for cap in CAPS if cap != shape.max_regs]
    return out[1:]


def bwd_candidates(tile, bucket):
    out = []
    if isinstance(tile, WgTile):
        if tile.block_m > 64:
            out.append(replace(tile, block_m=64))
        out += [KvTile(64, 128, 8, 4, 4, 4), KvTile(64, 64, 8, 4, 4, 4)]
    elif isinstance(tile, KvTile):
        for kk in (bucket // 32, 2, 1):
            if kk >= 1:
                out.append(replace(tile, kk_unroll=kk))
        out.append(replace(tile, kk_unroll=1, dq_unroll=1))
        if tile.block_m > 16:
            out.append(replace(tile, block_m=tile.block_m // 2, kk_unroll=1, dq_unroll=1))
        if tile.block_n > 32:
            out.append(replace(tile, block_n=tile.block_n // 2))
            out.append(replace(tile, block_n=tile.block_n // 2, kk_unroll=1, dq_unroll=1))
    else:
        for kk in (bucket // 32, 2, 1):
            if kk >= 1:
                out.append(replace(tile, kk_unroll=kk))
        if tile.split_stream:
            out.append(replace(tile, split_stream=False))
        if tile.block_m > 16:
            out.append(replace(tile, block_m=tile.block_m // 2, kk_unroll=1))
        # A narrower owned tile: fewer 16-row groups, more warps sharing each.
        if tile.block_n > 16 and tile.warps % (tile.split_d * 2) == 0:
            out.append(replace(tile, block_n=tile.block_n // 2, split_d=tile.split_d * 2))
            out.append(replace(tile, block_n=tile.block_n // 2, split_d=tile.split_d * 2, split_stream=False))
    return out


def tune(args):
    found = {}
    limit = variants.SMEM_LIMITS
    jobs = []
    for fam in args.family:
        arch = variants.FAMILY_ARCHS[fam][0]
        if "fwd" in args.passes:
            for (f, kind_name), table in variants.FWD_TILES.items():
                if f != fam:
                    continue
                for bucket, base in table.items():
                    for mods in variants.SCORE_MOD_SETS:
                        for vec in (True, False):
                            jobs.append(("fwd", fam, arch, kind_name, bucket, mods, vec))
        if "bwd" in args.passes:
            for (f, kind_name), table in variants.BWD_TILES.items():
                if f != fam:
                    continue
                for bucket in table:
                    for mods in variants.SCORE_MOD_SETS:
                        for role in ("dkdv_atomic", "dkdv", "dq"):
                            jobs.append(("bwd", fam, arch, kind_name, bucket, mods, role))

    def run(job):
        what, fam, arch, kind_name, bucket, mods, which = job
        names = [name for name in variants.dtypes_of(kind_name) if name in variants.family_dtypes(fam)]

        def compiles_here(source, kernel, defines):
            # With the family's own defines, as runtime.get_kernel compiles it (TURING for sm75).
            return compiles(source, kernel, {**defines, **variants.family_defines(fam)}, arch)

        if what == "fwd":
            base = variants.FWD_TILES[(fam, kind_name)][bucket]
            base = base if which else base.element_wise()
            elem = 2 if kind_name == "16bit" else 4

            def ok(tile):
                return tile.smem_bytes(bucket, elem) <= limit[fam] and all(
                    compiles_here(variants.FWD_SOURCE, variants.FWD_KERNEL,
                                  variants.fwd_defines(tile, bucket, n, which, mods)) for n in names)
            candidates = fwd_candidates(base, kind_name)
        else:
            entry = variants.BWD_TILES[(fam, kind_name)][bucket]
            base = entry.dq if which == "dq" else entry.dkdv
            elem = 2 if kind_name == "16bit" else 4
            atomic = which == "dkdv_atomic"

            def ok(tile):
                if which == "dq":
                    return all(compiles_here(variants.DQ_SOURCE, variants.DQ_KERNEL,
                                             variants.dq_defines(tile, bucket, n, mods)) for n in names)
                fits = tile.smem_bytes(bucket, elem, True, atomic) <= limit[fam] or (atomic and fam == "sm80")
                return fits and all(compiles_here(variants.dkdv_source(tile), variants.DKDV_KERNEL,
                                                  variants.dkdv_defines(tile, bucket, n, atomic, mods))
                                    for n in names)
            candidates = bwd_candidates(base, bucket)
        if ok(base):
            return None
        for tile in candidates:
            if ok(tile):
                return job, tile
        return job, "none found"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(run, jobs):
            if result is not None:
                job, tile = result
                what, fam, _, kind_name, bucket, mods, which = job
                found[(what, fam, kind_name, bucket, mods, which)] = tile
                print(f"{what.upper()}_SPILL_TILES[({fam!r}, {kind_name!r}, {bucket}, {mods}, {which!r})] = {tile!r}",
                      flush=True)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sm90,sm80", type=lambda s: s.split(","))
    parser.add_argument("--pass", dest="passes", default="fwd,bwd", type=lambda s: s.split(","))
    found = tune(parser.parse_args())
    print(f"{len(found)} variants need another tile")


if __name__ == "__main__":
    main()
