"""A Llama-style decoder's training step in plain PyTorch, with the attention pluggable: tokens/s of
cuflash beside SDPA's FlashAttention backend and SDPA's default choice, in one run.

    python bench/bench_model_step.py [--shapes 4x2048,1x8192] [--attention cuflash,sdpa-flash,sdpa-default,...]
                                     [--modes eager,compile,graphs,compile-graphs] [--steps 30] [--json FILE]
    python bench/bench_model_step.py --smoke        # tiny float32 model on the CPU: the code paths only

The model: token embedding, 8 decoder layers (RMSNorm, q/k/v projections, rotary embeddings,
causal grouped-query attention with 16 query and 4 key/value heads of d = 64, output projection;
RMSNorm, SwiGLU MLP of width 2816), final RMSNorm, LM head (vocabulary 32000) and cross-entropy,
all bf16; a step is zero_grad, forward, backward and a fused AdamW step. q, k, v stay (B, S, H, D)
as the projections make them: cuflash reads that layout and the grouped heads in place, SDPA gets
``transpose(1, 2)`` views and ``enable_gqa=True`` (or k, v repeated per query head where a backend
refuses ``enable_gqa``; the JSON says which).

Attention choices: ``cuflash`` (``cuflash.torch.attention``, causal), ``sdpa-flash`` (SDPA under
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), ``sdpa-default`` (SDPA with no restriction, as a user
gets it: cuDNN on Hopper with recent PyTorch where it takes the call; the kernel names recorded
below say what ran) and ``sdpa-cudnn`` (``SDPBackend.CUDNN_ATTENTION`` only). Modes: ``eager``;
``compile`` (``torch.compile(model, fullgraph=True)``, so a graph break fails the row);
``graphs`` (eager model under ``torch.cuda.make_graphed_callables``: forward and backward replayed
as CUDA graphs, the optimizer step outside); ``compile-graphs`` (``torch.compile(...,
mode="reduce-overhead")``). Every configuration runs eager warm-up steps first, so cuflash has
compiled its kernel variants before any capture.

Timing: CUDA events around each step after the warm-up, no synchronization between steps; the
median step gives tokens/s, and the host time to enqueue a step (``perf_counter``) is recorded
beside it. Each row gives the ratio of its tokens/s to each SDPA choice's in the same mode.

Attention alone: fwd + bwd of one attention call at the model's shapes, timed eagerly (host time
included) and, on CUDA, as a replayed CUDA graph (kernel time only). The gap lines compare, per
mode, cuflash's step time less SDPA's with the number of layers times the kernel-time difference:
where they agree, what remains of the gap is the kernels'.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash.torch  # noqa: E402

ATTENTION = ("cuflash", "sdpa-flash", "sdpa-default", "sdpa-cudnn")
REFERENCES = ATTENTION[1:]
MODES = ("eager", "compile", "graphs", "compile-graphs")


@dataclass(frozen=True)
class Config:
    layers: int = 8
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 64
    mlp: int = 2816
    vocab: int = 32000
    rope_base: float = 10000.0


SMOKE = Config(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=512, vocab=512)


# --- The model ------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In float32, as Llama does, then back to the activations' dtype.
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(seq, head_dim, base, device, dtype):
    """cos and sin of shape (S, 1, D), for (B, S, H, D) activations (rotate-half form)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config, attend):
        super().__init__()
        self.config, self.attend = config, attend
        self.q = nn.Linear(config.hidden, config.heads * config.head_dim, bias=False)
        self.k = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.v = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.o = nn.Linear(config.heads * config.head_dim, config.hidden, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        c = self.config
        q = rotate(self.q(x).view(B, S, c.heads, c.head_dim), cos, sin)
        k = rotate(self.k(x).view(B, S, c.kv_heads, c.head_dim), cos, sin)
        v = self.v(x).view(B, S, c.kv_heads, c.head_dim)
        return self.o(self.attend(q, k, v).reshape(B, S, c.heads * c.head_dim))


class Layer(nn.Module):
    def __init__(self, config, attend):
        super().__init__()
        self.attention_norm, self.mlp_norm = RMSNorm(config.hidden), RMSNorm(config.hidden)
        self.attention = Attention(config, attend)
        self.gate = nn.Linear(config.hidden, config.mlp, bias=False)
        self.up = nn.Linear(config.hidden, config.mlp, bias=False)
        self.down = nn.Linear(config.mlp, config.hidden, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    """Token ids (B, S) and next-token targets (B, S) to the mean cross-entropy."""

    def __init__(self, config, attend, seq, device, dtype):
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Layer(config, attend) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden)
        self.head = nn.Linear(config.hidden, config.vocab, bias=False)
        cos, sin = rotary_tables(seq, config.head_dim, config.rope_base, device, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids, targets):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# --- Attention choices ----------------------------------------------------------------------------


def cuflash_attend(q, k, v):
    return cuflash.torch.attention(q, k, v, causal=True)


def sdpa_attend(native_gqa):
    def attend(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if not native_gqa:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=native_gqa).transpose(1, 2)

    return attend


def backend_context(name):
    """The SDPA restriction of a choice, held around everything it runs (warm-up, tracing, capture)."""
    if name == "sdpa-flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    if name == "sdpa-cudnn":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return contextlib.nullcontext()


def resolve(name, config, device, dtype):
    """(attend function, description) for a choice, or a reason it cannot run here: one tiny call
    with grouped heads decides whether SDPA takes ``enable_gqa`` under the choice's backend."""
    q = torch.randn(1, 128, config.heads, config.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, 128, config.kv_heads, config.head_dim, device=device, dtype=dtype)
    if name == "cuflash":
        cuflash_attend(q, k, k)
        return cuflash_attend, "cuflash.torch.attention (BSHD, grouped heads in place)"
    errors = []
    for native in (True, False):
        try:
            with backend_context(name):
                sdpa_attend(native)(q, k, k)
        except RuntimeError as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        return sdpa_attend(native), "enable_gqa=True" if native else "k, v repeated per query head"
    raise RuntimeError("; ".join(dict.fromkeys(errors)))


# --- Steps and timing -----------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(mode, model, optimizer, ids, targets, warmup):
    """The step function of a mode, after ``warmup`` eager steps (cuflash compiles its kernel
    variants on first use, which no capture may contain)."""
    def eager_step(forward):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = forward(ids, targets)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return step

    for _ in range(warmup):
        eager_step(model)()
    if mode == "eager":
        return eager_step(model)
    if mode == "compile":
        return eager_step(torch.compile(model, fullgraph=True))
    if mode == "graphs":
        return eager_step(torch.cuda.make_graphed_callables(model, (ids, targets)))
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    inner = eager_step(compiled)

    def step():
        # CUDA-graph trees reuse a step's output memory at the next replay: each step opens a new
        # generation, and the loss handed back is a copy.
        torch.compiler.cudagraph_mark_step_begin()
        return inner().clone()

    return step


def time_steps(step, device, warmup, steps):
    """Per-step GPU time (CUDA events; CPU: wall time), host time to enqueue, in ms, and the last
    loss (read once, after the timing: a check that every choice trains the same model)."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = device.type == "cuda"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)] \
        if cuda else []
    host = []
    for i in range(steps):
        if cuda:
            events[i][0].record()
        start = time.perf_counter()
        loss = step()
        host.append((time.perf_counter() - start) * 1e3)
        if cuda:
            events[i][1].record()
    sync(device)
    gpu = [a.elapsed_time(b) for a, b in events] if cuda else host
    return statistics.median(gpu), statistics.median(host), float(loss)


def run_step(name, attend, mode, config, batch, seq, device, dtype, args):
    torch._dynamo.reset()  # each configuration compiles afresh, clear of the cache-size limit
    torch.manual_seed(0)
    model = Decoder(config, attend, seq, device, dtype).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(config.vocab, (batch, seq + 1), device=device)
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with backend_context(name):
        step = make_step(mode, model, optimizer, ids, targets, args.warmup)
        step_ms, host_ms, loss = time_steps(step, device, args.warmup, args.steps)
    row = {"step_ms": step_ms, "host_ms": host_ms, "tokens_per_s": batch * seq / step_ms * 1e3, "final_loss": loss}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_calls(call, device, warmup, reps):
    """Median time of ``call()`` in ms, synchronized after each (CUDA events; CPU: wall time)."""
    for _ in range(warmup):
        call()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_kernels(call):
    """The CUDA kernels one call runs, with their total time (µs), longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us()
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def attention_alone(name, attend, config, batch, seq, device, dtype, args):
    """fwd + bwd of one attention call at the model's shapes: eager (host time included) and, on
    CUDA, replayed as a CUDA graph (the kernels alone)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(heads):
        return torch.randn(batch, seq, heads, config.head_dim, device=device, dtype=dtype, generator=g)

    q, k, v = (rand(h).requires_grad_() for h in (config.heads, config.kv_heads, config.kv_heads))
    dout = rand(config.heads)

    def call():
        return torch.autograd.grad(attend(q, k, v), (q, k, v), dout)

    row = {}
    with backend_context(name):
        row["eager_ms"] = time_calls(call, device, args.warmup, args.steps)
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            row["kernel_ms"] = time_calls(graph.replay, device, args.warmup, args.steps)
            try:
                row["kernels_us"] = cuda_kernels(call)
            except Exception as exc:  # noqa: BLE001  (the names are a diagnostic; the times stand without them)
                row["kernels_us"] = {f"profiler failed: {type(exc).__name__}: {exc}": 0.0}
    row["per_step_ms"] = config.layers * row.get("kernel_ms", row["eager_ms"])
    return row


# --- Report ---------------------------------------------------------------------------------------


def parse_shapes(text):
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]


def ratios(rows, mode, name):
    mine = rows.get(mode, {}).get(name)
    out = {}
    for other in REFERENCES:
        theirs = rows.get(mode, {}).get(other)
        if mine and theirs and "tokens_per_s" in mine and "tokens_per_s" in theirs:
            out[f"vs_{other}"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
    return out


def ratio_text(row, other):
    value = row.get(f"vs_{other}")
    return f"{'—':>10}" if value is None else f"{value:9.2f}x"


def gaps(steps, alone):
    """Per mode and SDPA choice: cuflash's step time less SDPA's, beside the layers times the
    attention kernel-time difference."""
    out = {}
    for mode, rows in steps.items():
        for other in REFERENCES:
            mine, theirs = rows.get("cuflash", {}), rows.get(other, {})
            if "step_ms" in mine and "step_ms" in theirs and "cuflash" in alone and other in alone:
                out[f"{mode} vs {other}"] = {
                    "step_gap_ms": mine["step_ms"] - theirs["step_ms"],
                    "kernel_gap_ms": alone["cuflash"]["per_step_ms"] - alone[other]["per_step_ms"]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x2048,1x8192", help="B x S pairs, comma-separated")
    parser.add_argument("--attention", default=",".join(ATTENTION))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps before capture and before timing")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny float32 model (2 layers, B x S = 2 x 64) on the CPU: exercises the code paths")
    args = parser.parse_args()

    if args.smoke:
        config, device, dtype, shapes = SMOKE, torch.device("cpu"), torch.float32, [(2, 64)]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --smoke for the CPU run of the code paths)")
        config, device, dtype, shapes = Config(), torch.device("cuda"), torch.bfloat16, parse_shapes(args.shapes)
    names = [n for n in args.attention.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    for value, known in ((names, ATTENTION), (modes, MODES)):
        unknown = set(value) - set(known)
        if unknown:
            parser.error(f"unknown {sorted(unknown)}; choose from {', '.join(known)}")

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    results = {"machine": machine, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
               "config": asdict(config), "steps": args.steps, "warmup": args.warmup, "attention": {}, "shapes": {}}
    attends = {}
    for name in names:
        try:
            attends[name], how = resolve(name, config, device, dtype)
            results["attention"][name] = how
        except Exception as exc:  # noqa: BLE001  (a choice this machine lacks: reported, not run)
            results["attention"][name] = f"not run: {type(exc).__name__}: {exc}"
        print(f"{name}: {results['attention'][name]}")

    print(f"{machine}; torch {torch.__version__}; {results['dtype']}; {config.layers} layers, hidden "
          f"{config.hidden}, {config.heads}/{config.kv_heads} heads of d = {config.head_dim}; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    for batch, seq in shapes:
        label = f"{batch}x{seq}"
        steps, alone = {}, {}
        results["shapes"][label] = {"tokens_per_step": batch * seq, "steps": steps, "attention_alone": alone}
        print(f"\nB x S = {label} ({batch * seq} tokens per step)")
        print(f"  {'mode':<15} {'attention':<13} {'ms/step':>9} {'host ms':>9} {'tokens/s':>11}   "
              + " ".join(f"{'vs ' + other.removeprefix('sdpa-'):>10}" for other in REFERENCES) + f"  {'last loss':>9}")
        for mode in modes:
            steps[mode] = {}
            for name, attend in attends.items():
                if mode in ("graphs", "compile-graphs") and device.type != "cuda":
                    steps[mode][name] = {"not_run": "CUDA graphs need a GPU"}
                    continue
                try:
                    steps[mode][name] = run_step(name, attend, mode, config, batch, seq, device, dtype, args)
                except Exception as exc:  # noqa: BLE001  (one configuration failing does not stop the others)
                    steps[mode][name] = {"not_run": f"{type(exc).__name__}: {str(exc)[:500]}"}
            for name in attends:
                row = steps[mode][name]
                if "not_run" in row:
                    print(f"  {mode:<15} {name:<13} not run: {row['not_run'][:100]}")
                    continue
                row.update(ratios(steps, mode, name))
                print(f"  {mode:<15} {name:<13} {row['step_ms']:9.2f} {row['host_ms']:9.2f} "
                      f"{row['tokens_per_s']:11.0f}   " + " ".join(ratio_text(row, other) for other in REFERENCES)
                      + f"  {row['final_loss']:9.4f}")
        print(f"  attention alone, fwd + bwd of one call ({config.layers} per step):")
        for name, attend in attends.items():
            try:
                alone[name] = attention_alone(name, attend, config, batch, seq, device, dtype, args)
            except Exception as exc:  # noqa: BLE001
                alone[name] = {"not_run": f"{type(exc).__name__}: {str(exc)[:500]}"}
                print(f"    {name:<13} not run: {alone[name]['not_run'][:100]}")
                continue
            row = alone[name]
            kernel = f"kernels {row['kernel_ms']:.3f} ms, " if "kernel_ms" in row else ""
            top = ", ".join(list(row.get("kernels_us", {}))[:2])
            print(f"    {name:<13} {kernel}eager {row['eager_ms']:.3f} ms; {row['per_step_ms']:.2f} ms per step"
                  + (f"  [{top}]" if top else ""))
        results["shapes"][label]["gaps"] = found = gaps(steps, alone)
        for key, gap in found.items():
            print(f"  gap {key:<30} step {gap['step_gap_ms']:+8.2f} ms   "
                  f"{config.layers} x attention kernels {gap['kernel_gap_ms']:+8.2f} ms")
        if args.json:  # after every shape, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
