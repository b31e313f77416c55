"""The variant table and the parameter structs, without a GPU.

The table decides every kernel a launcher may run; these tests hold it to what the launchers and
the compile gate assume: every lookup lands on a listed instantiation, spill tiles fit their
family's shared memory, features are stated, and parameter records carry what the launchers put
in them (pointers filled per call by ``params.Template``).
"""

import types

import numpy
import pytest

from cuflash._cuda import params, variants
from cuflash._problem import check_forward


def test_every_lookup_is_an_instantiation_the_gate_compiles():
    """What a launcher compiles is the lookup's defines with the family's (runtime.get_kernel adds
    them): each such variant is listed for the gate."""
    for family in variants.FAMILY_ARCHS:
        listed = {(source, kernel, tuple(sorted(defines.items())))
                  for source, kernel, defines in variants.instantiations(family)}

        def launched(source, kernel, defines):
            return source, kernel, tuple(sorted({**defines, **variants.family_defines(family)}.items()))

        for kind, names in (("16bit", ("float16", "bfloat16")), ("float32", ("float32",))):
            names = [name for name in names if name in variants.family_dtypes(family)]
            for bucket in variants.FWD_TILES.get((family, kind), {}) if names else ():
                for name in names:
                    for mods in variants.SCORE_MOD_SETS:
                        for vec in (True, False):
                            tile, b = variants.fwd_tile(family, name, bucket, bucket, mods, vec)
                            defines = variants.fwd_defines(tile, b, name, vec, mods)
                            assert launched(variants.FWD_SOURCE, variants.FWD_KERNEL, defines) in listed
            for bucket in variants.BWD_TILES.get((family, kind), {}) if names else ():
                for name in names:
                    for mods in variants.SCORE_MOD_SETS:
                        entry, b = variants.bwd_entry(family, name, bucket, bucket, mods)
                        for atomic in (True, False):
                            tile = variants.dkdv_tile(family, name, b, mods, atomic)
                            defines = variants.dkdv_defines(tile, b, name, atomic, mods)
                            assert launched(variants.dkdv_source(tile), variants.DKDV_KERNEL, defines) in listed
                        defines = variants.dq_defines(entry.dq, b, name, mods)
                        assert launched(variants.DQ_SOURCE, variants.DQ_KERNEL, defines) in listed


def test_spill_tiles_fit_their_family_and_name_real_variants():
    for (family, kind, bucket, mods, vec), tile in variants.FWD_SPILL_TILES.items():
        assert bucket in variants.FWD_TILES[(family, kind)] and mods in variants.SCORE_MOD_SETS
        assert tile.smem_bytes(bucket, 4 if kind == "float32" else 2) <= variants.SMEM_LIMITS[family]
        assert isinstance(vec, bool)
    for (family, kind, bucket, mods, role), tile in variants.BWD_SPILL_TILES.items():
        assert bucket in variants.BWD_TILES[(family, kind)] and mods in variants.SCORE_MOD_SETS
        assert role in ("dkdv_atomic", "dkdv", "dq")
        elem = 4 if kind == "float32" else 2
        if role == "dq":
            assert tile.smem_bytes(bucket, elem, False, False) <= variants.SMEM_LIMITS[family]
        else:
            assert tile.smem_bytes(bucket, elem, True, role == "dkdv_atomic") <= variants.SMEM_LIMITS[family]


def _problem(**options):
    rng = numpy.random.default_rng(0)
    q = rng.standard_normal((2, 33, 4, 40)).astype(numpy.float16)
    k = rng.standard_normal((2, 50, 2, 40)).astype(numpy.float16)
    slopes = options.pop("alibi_slopes", None)
    return check_forward(q, k, k, causal_alignment="bottom_right", scale=None, backend="numpy",
                         alibi_slopes=slopes, **options)


def test_problem_features_and_score_mod_bits():
    assert variants.problem_features(_problem(causal=False)) == {"gqa"}
    assert variants.problem_features(_problem(causal=True)) == {"causal", "gqa"}
    assert variants.problem_features(_problem(causal=True, window=(7, None))) == {"causal", "window", "gqa"}
    both = _problem(causal=False, softcap=3.0, alibi_slopes=numpy.ones(4, numpy.float32))
    assert variants.problem_features(both) == {"softcap", "alibi", "gqa"}
    assert variants.score_mods(both) == 3 and variants.score_mods(_problem(causal=False)) == 0
    for name in variants.SCORE_MOD_BITS:
        assert name in variants.FEATURES


class _Device:
    """Stands in for a CuPy array: what the parameter builders read (pointer, strides, itemsize)."""

    def __init__(self, array, ptr):
        self.data = types.SimpleNamespace(ptr=ptr)
        self.strides, self.itemsize = array.strides, array.itemsize


def test_parameter_records_carry_the_problem_and_templates_fill_pointers():
    problem = _problem(causal=True, window=(5, None), softcap=2.0, alibi_slopes=numpy.ones((2, 4), numpy.float32))
    q = _Device(numpy.empty((2, 33, 4, 40), numpy.float16).transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3), 16)
    k = _Device(numpy.empty((2, 50, 2, 40), numpy.float16), 32)
    out = _Device(numpy.empty((2, 33, 4, 40), numpy.float16), 48)
    lse = _Device(numpy.empty((2, 4, 33), numpy.float32), 64)
    record = params.forward(problem, q, k, k, out, lse, None, 3, True)
    assert tuple(record["q_st"].tolist()) == (33 * 4 * 40, 40, 33 * 40, 1)  # BHSD storage seen as BSHD
    assert record["mask_offset"] == 50 - 33 and record["window_left"] == 5 and record["window_right"] == 0
    assert record["alibi_sb"] == 4 and record["group"] == 2 and record["num_m_blocks"] == 3
    numpy.testing.assert_allclose(record["softcap_in"], problem.scale / 2.0, rtol=1e-6)
    numpy.testing.assert_allclose(record["softcap_out"], 2.0 * 1.4426950408889634, rtol=1e-6)
    unbounded = params.forward(_problem(causal=False), q, k, k, out, lse, None, 1, True)
    assert unbounded["window_left"] == params.UNBOUNDED == unbounded["window_right"]
    filled = params.Template(record, params.FWD_POINTERS)(101, 102, 103, 104, 105, 106)
    assert [int(filled[name]) for name in params.FWD_POINTERS] == [101, 102, 103, 104, 105, 106]
    for name in ("q_st", "mask_offset", "window_left", "scale", "softcap_out", "num_m_blocks", "vec_out"):
        assert filled[name] == record[name], name
    backward = params.backward(record, out, None, None, None, q, k, k, params.strides(k), params.strides(k), 0, 0,
                               128, 1, 1, 7, True, False)
    filled = params.Template(backward, params.BWD_POINTERS)(*range(1, 14))
    assert [int(filled["fwd"][n]) for n in params.FWD_POINTERS] == list(range(1, 7))
    assert [int(filled[n]) for n in params.BWD_POINTERS[6:]] == list(range(7, 14))
    assert filled["n_tiles"] == 7 and filled["fwd"]["window_left"] == 5


@pytest.mark.parametrize("size", [None, 0, 3, 2**70])
def test_window_sides_beyond_the_unbounded_value_clamp(size):
    side = params.window_side(size)
    assert side == (params.UNBOUNDED if size is None or size > params.UNBOUNDED else size)
    numpy.zeros((), params.FWD)["window_left"] = side  # fits the int64 field


def test_ragged_tables_name_real_entries():
    """The ragged (SEQ_MODE 1) spill tables and the unserved set refer to entries of the main tables,
    and an unserved configuration has no ragged instantiation."""
    for (family, kind, bucket, mods, vec), tile in variants.RAGGED_FWD_SPILL_TILES.items():
        assert bucket in variants.FWD_TILES[(family, kind)] and mods in variants.SCORE_MOD_SETS
        assert tile.smem_bytes(bucket, 4 if kind == "float32" else 2) <= variants.SMEM_LIMITS[family]
    for (family, kind, bucket, mods, role) in variants.RAGGED_SPILL_TILES:
        assert bucket in variants.BWD_TILES[(family, kind)] and mods in variants.SCORE_MOD_SETS
        assert role in ("dkdv", "dkdv_atomic", "dq")
    for family, kind, bucket, mods in variants.RAGGED_FWD_UNSERVED:
        dtype = "float32" if kind == "float32" else "float16"
        assert not variants.ragged_served(family, dtype, bucket, bucket, mods)
        assert not [d for _, name, d in variants.instantiations(family)
                    if name == variants.FWD_KERNEL and d.get("SEQ_MODE") == variants.SEQ_RAGGED
                    and (d["HEAD_DIM"], d["SCORE_MODS"], d["DTYPE"]) == (bucket, mods, variants.DTYPE_CODES[dtype])]
