"""Host time of one attention call: the CPU time to enqueue a forward and a backward, and where it goes.

    python bench/bench_host.py [--calls 2000] [--json results.json]

For each way of calling cuflash that is available here (CuPy arrays; torch tensors through
``cuflash.attention`` and through ``cuflash.torch.attention``; JAX arrays through a jitted
``cuflash.jax.attention``) and, beside them, PyTorch's SDPA and JAX's ``dot_product_attention``, it
times single calls on a tiny problem, with no synchronization inside the timed region, and reports
the median. The GPU is synchronized every ``SYNC_EVERY`` calls, outside the timed region, so the
launch queue never fills up and blocks a launch.

Then it profiles the cuflash calls step by step: each step's functions are wrapped in timers that
count their own time only (time spent in a nested step counts for that step: a launch is not part
of "backend, rest"), and the table gives the median per call of each step; "rest" is the median
instrumented call less the steps and less the timers' own cost (measured, times the number of
timed calls), mostly the adapter's and autograd's Python.

Without a GPU everything runs on the CPU: cuflash's NumPy backend computes the attention inside
the call, so its time is part of what is measured (the "NumPy backend compute" row) and the
figures say nothing about the GPU path's host time.
"""

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import numpy

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import cuflash  # noqa: E402
from cuflash import _api, _dispatch, _interop  # noqa: E402

SYNC_EVERY = 64
WARMUP = 50


def _optional(name):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001  (absent, or broken in this environment: skip its cases)
        return None


def median_us(call, calls, sync):
    """Median CPU time of ``call()`` in microseconds, with ``sync()`` between batches only."""
    for _ in range(WARMUP):
        call()
    sync()
    times = []
    for i in range(calls):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            sync()
    sync()
    return statistics.median(times) / 1e3


class StepTimer:
    """Wraps functions in timers that add each call's own time (less nested wrapped calls) to a step."""

    def __init__(self):
        self.totals = defaultdict(int)
        self.calls = 0
        self._stack = []

    def wrap(self, step, fn):
        totals, stack = self.totals, self._stack

        def timed(*args, **kwargs):
            self.calls += 1
            start = time.perf_counter_ns()
            stack.append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter_ns() - start
                totals[step] += elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed

        return timed

    def take(self):
        """The steps' times since the last ``take`` (ns) and the number of timed calls, and a fresh start."""
        taken, calls = dict(self.totals), self.calls
        self.totals.clear()
        self.calls = 0
        return taken, calls


def timer_cost_us():
    """What one timed call adds to the whole (where clocks are slow, as in some sandboxes, this
    is several microseconds): the median of a timed no-op call less an untimed one."""
    timer = StepTimer()
    timed = timer.wrap("noop", lambda: None)
    return max(0.0, median_us(timed, 5000, lambda: None) - median_us(lambda: None, 5000, lambda: None))


def _steps():
    """(step, owner, attribute name) of every function the profile times, where it exists."""
    cuda_forward = _optional("cuflash._cuda.forward")
    cuda_backward = _optional("cuflash._cuda.backward")
    cuda_params = _optional("cuflash._cuda.params")
    runtime = _optional("cuflash._cuda.runtime")
    adapter = sys.modules.get("cuflash.torch")
    table = [
        ("argument checks (cached plan)", _api, "_plan"),
        ("argument checks (cached plan)", adapter, "_checked_options"),
        ("operand import (views, DLPack)", _interop, "import_operands"),
        ("operand import (views, DLPack)", _api, "import_operands"),
        ("operand import (views, DLPack)", _interop, "buffer_array"),
        ("stream lookup", _interop, "_torch_stream"),
        ("stream lookup", _interop, "_external_stream"),
        ("device/stream/allocator context", _interop._GpuContext, "__enter__"),
        ("device/stream/allocator context", _interop._GpuContext, "__exit__"),
        ("output allocation", _interop.Origin, "outputs"),
        ("output allocation", _dispatch, "_empty"),
        ("result export (DLPack)", _interop, "export"),
        ("result export (DLPack)", _api, "export"),
        ("variant choice", cuda_forward, "choose_tile"),
        ("variant choice", cuda_backward, "choose_entry"),
        ("kernel lookup", runtime, "get_kernel"),
        ("argument packing", cuda_params, "forward"),
        ("argument packing", cuda_params, "backward"),
        ("launch", runtime, "launch"),
        ("NumPy backend compute", sys.modules["cuflash._numpy_backend"], "forward"),
        ("NumPy backend compute", sys.modules["cuflash._numpy_backend"], "backward"),
        ("backend, rest (workspaces, launcher Python)", _dispatch.CudaBackend, "forward"),
        ("backend, rest (workspaces, launcher Python)", _dispatch.CudaBackend, "backward"),
        ("backend, rest (workspaces, launcher Python)", _dispatch.NumpyBackend, "forward"),
        ("backend, rest (workspaces, launcher Python)", _dispatch.NumpyBackend, "backward"),
    ]
    return [(step, owner, name) for step, owner, name in table if owner is not None and hasattr(owner, name)]


@contextlib.contextmanager
def profiled(timer):
    patched = []
    for step, owner, name in _steps():
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, timer.wrap(step, original))
        patched.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def profile(call, calls, sync):
    """Median per call of each step's own time and of the whole (instrumented) call, in µs."""
    timer = StepTimer()
    per_call, totals, counts = [], [], []
    with profiled(timer):
        for _ in range(WARMUP):
            call()
        sync()
        timer.take()
        for i in range(calls):
            start = time.perf_counter_ns()
            call()
            totals.append(time.perf_counter_ns() - start)
            taken, count = timer.take()
            per_call.append(taken)
            counts.append(count)
            if i % SYNC_EVERY == SYNC_EVERY - 1:
                sync()
        sync()
    steps = {step for taken in per_call for step in taken}
    medians = {step: statistics.median(taken.get(step, 0) for taken in per_call) / 1e3 for step in steps}
    return {"total": statistics.median(totals) / 1e3, "steps": medians, "timed_calls": statistics.median(counts)}


# --- The cases ------------------------------------------------------------------------------------


def _shape(gpu):
    # Tiny, so the GPU's work is shorter than the host's and only host time shows.
    return dict(B=1, S=128, H=8, D=64) if gpu else dict(B=1, S=16, H=2, D=16)


def cupy_case(shape, dtype):
    cupy = _optional("cupy")
    rng = numpy.random.default_rng(0)
    q, k, v, dout = (cupy.asarray(rng.standard_normal((shape["B"], shape["S"], shape["H"], shape["D"])).astype(dtype))
                     for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    return dict(
        forward=lambda: cuflash.attention(q, k, v, causal=True, return_lse=True),
        backward=lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=True),
        sync=cupy.cuda.get_current_stream().synchronize, cuflash=True)


def numpy_case(shape, dtype):
    rng = numpy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((shape["B"], shape["S"], shape["H"], shape["D"])).astype(dtype)
                     for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    return dict(
        forward=lambda: cuflash.attention(q, k, v, causal=True, return_lse=True, backend="numpy"),
        backward=lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend="numpy"),
        sync=lambda: None, cuflash=True)


def _torch_inputs(torch, shape, device, dtype, bhsd=False):
    g = torch.Generator(device=device).manual_seed(0)
    dims = (shape["B"], shape["H"], shape["S"], shape["D"]) if bhsd else (shape["B"], shape["S"], shape["H"], shape["D"])
    q, k, v, dout = (torch.randn(dims, generator=g, device=device, dtype=dtype) for _ in range(4))
    return q, k, v, dout


def _torch_sync(torch, device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def torch_plain_case(torch, shape, device, dtype):
    q, k, v, dout = _torch_inputs(torch, shape, device, dtype)
    backend = "auto" if device == "cuda" else "numpy"
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    return dict(
        forward=lambda: cuflash.attention(q, k, v, causal=True, return_lse=True, backend=backend),
        backward=lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend),
        sync=_torch_sync(torch, device), cuflash=True)


def _autograd_case(torch, forward, inputs, dout, device, cuflash_call):
    leaves = [x.requires_grad_() for x in inputs]
    out = forward(*leaves)
    return dict(
        forward=lambda: forward(*leaves),
        backward=lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
        sync=_torch_sync(torch, device), cuflash=cuflash_call)


def torch_adapter_case(torch, shape, device, dtype):
    import cuflash.torch

    q, k, v, dout = _torch_inputs(torch, shape, device, dtype)
    return _autograd_case(torch, lambda q, k, v: cuflash.torch.attention(q, k, v, causal=True), (q, k, v), dout,
                          device, True)


def sdpa_case(torch, shape, device, dtype):
    q, k, v, dout = _torch_inputs(torch, shape, device, dtype, bhsd=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return _autograd_case(torch, lambda q, k, v: sdpa(q, k, v, is_causal=True), (q, k, v), dout, device, False)


def _jax_case(jax, shape, dtype, attend, cuflash_call):
    device = jax.devices()[0]
    rng = numpy.random.default_rng(0)
    q, k, v, dout = (jax.device_put(rng.standard_normal((shape["B"], shape["S"], shape["H"], shape["D"])).astype(dtype),
                                    device) for _ in range(4))
    forward = jax.jit(attend)
    # A jitted VJP of a saved forward is the backward alone.
    _, vjp = jax.vjp(attend, q, k, v)
    backward = jax.jit(lambda dout: vjp(dout))

    def sync():
        jax.block_until_ready(forward(q, k, v))

    return dict(forward=lambda: forward(q, k, v), backward=lambda: backward(dout), sync=sync, cuflash=cuflash_call)


def jax_case(jax, shape, dtype):
    import cuflash.jax

    return _jax_case(jax, shape, dtype, lambda q, k, v: cuflash.jax.attention(q, k, v, causal=True), True)


def jax_reference_case(jax, shape, dtype):
    return _jax_case(jax, shape, dtype, lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                     False)


def cases(gpu):
    shape = _shape(gpu)
    found = []
    bfloat16 = _interop._bfloat16()
    if gpu:
        dtype = bfloat16 if bfloat16 is not None else numpy.float16
        found.append((f"CuPy {numpy.dtype(dtype).name}: cuflash.attention", lambda: cupy_case(shape, dtype)))
    else:
        found.append(("NumPy float32: cuflash.attention", lambda: numpy_case(shape, numpy.float32)))
    torch = _optional("torch")
    if torch is not None and (torch.cuda.is_available() or not gpu):
        device = "cuda" if gpu else "cpu"
        tdtype = torch.bfloat16 if gpu else torch.float32
        label = f"torch {device} {str(tdtype).removeprefix('torch.')}"
        found.append((f"{label}: cuflash.attention", lambda: torch_plain_case(torch, shape, device, tdtype)))
        found.append((f"{label}: cuflash.torch.attention", lambda: torch_adapter_case(torch, shape, device, tdtype)))
        found.append((f"{label}: SDPA (reference)", lambda: sdpa_case(torch, shape, device, tdtype)))
    jax = _optional("jax")
    if jax is not None and (jax.devices()[0].platform == "gpu") == gpu:
        jdtype = bfloat16 if gpu and bfloat16 is not None else numpy.float32
        label = f"JAX {jax.devices()[0].platform} {numpy.dtype(jdtype).name}, jitted"
        found.append((f"{label}: cuflash.jax.attention", lambda: jax_case(jax, shape, jdtype)))
        found.append((f"{label}: jax.nn.dot_product_attention (reference)",
                      lambda: jax_reference_case(jax, shape, jdtype)))
    return shape, found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per measurement")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    gpu, reason = cuflash.gpu_available()
    shape, found = cases(gpu)
    machine = reason if gpu else f"no GPU ({reason}); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"host time to enqueue one call, median of {args.calls} (µs); {machine}")
    print(f"shape B={shape['B']} S={shape['S']} H={shape['H']} D={shape['D']}, causal"
          + ("" if gpu else "; NumPy backend: the attention itself is computed inside the call"))
    results = {"machine": machine, "shape": shape, "calls": args.calls, "timer_cost_us": timer_cost_us(), "cases": {}}
    for label, make in found:
        try:
            case = make()
        except Exception as exc:  # noqa: BLE001  (report the case as not run and go on)
            print(f"  {label}: not run ({type(exc).__name__}: {exc})")
            continue
        row = {direction: median_us(case[direction], args.calls, case["sync"]) for direction in ("forward", "backward")}
        if case["cuflash"]:
            row["profile"] = {direction: profile(case[direction], args.calls, case["sync"])
                              for direction in ("forward", "backward")}
        results["cases"][label] = row
        print(f"  {label:<70} forward {row['forward']:8.1f}   backward {row['backward']:8.1f}")
    for label, row in results["cases"].items():
        if "profile" not in row:
            continue
        forward, backward = row["profile"]["forward"], row["profile"]["backward"]
        print(f"\nprofile: {label} (median µs per call; each step counts its own time only)")
        for step in sorted(set(forward["steps"]) | set(backward["steps"])):
            print(f"  {step:<48} {forward['steps'].get(step, 0.0):8.1f} {backward['steps'].get(step, 0.0):8.1f}")
        timers = [p["timed_calls"] * results["timer_cost_us"] for p in (forward, backward)]
        rest = [p["total"] - sum(p["steps"].values()) - t for p, t in zip((forward, backward), timers)]
        print(f"  {'rest (adapter, autograd, Python glue)':<48} {rest[0]:8.1f} {rest[1]:8.1f}")
        print(f"  {'the timers themselves (estimated)':<48} {timers[0]:8.1f} {timers[1]:8.1f}")
        print(f"  {'whole call, with the timers':<48} {forward['total']:8.1f} {backward['total']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
