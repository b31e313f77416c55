"""The Llama-style decoder training step of ``bench_model_step.py`` as one jitted JAX function: tokens/s
of ``cuflash.jax.attention`` beside ``jax.nn.dot_product_attention`` (cuDNN and XLA), in one run.

    python bench/bench_model_step_jax.py [--shapes 4x2048,1x8192] [--attention cuflash,cudnn,xla]
                                         [--steps 30] [--json FILE]
    python bench/bench_model_step_jax.py --smoke    # tiny float32 model on the CPU: the code paths only

The model is the PyTorch script's, in plain ``jax.numpy`` (8 layers, hidden 1024, 16 query / 4
key-value heads of d = 64, SwiGLU width 2816, vocabulary 32000, rotary embeddings, RMSNorm, bf16);
a step is ``jax.value_and_grad`` of the mean cross-entropy and an AdamW update, jitted as one
program with the parameters and optimizer state donated. Every attention takes (B, S, H, D) and the
grouped key/value heads as they are.

Timing: after warm-up steps (the first compiles), each step is timed to completion
(``block_until_ready``), and the median gives tokens/s; ``pipelined`` is the same number of steps
dispatched back to back and waited for once, which hides the dispatch. cuflash runs inside the
program as ``buffer_callback``s, whose Python runs while the program executes, so its host time
is inside both figures. Attention alone: one jitted fwd + bwd at the model's shapes.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# cuflash allocates its workspaces through CuPy on the same GPU; XLA would otherwise reserve most
# of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuflash.jax  # noqa: E402

ATTENTION = ("cuflash", "cudnn", "xla")
REFERENCES = ATTENTION[1:]


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


def init(config, key, dtype):
    """Parameters as a pytree, scaled like nn.Linear's default (uniform ±1/sqrt(fan_in))."""
    def linear(key, fan_in, fan_out):
        bound = fan_in ** -0.5
        return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound).astype(dtype)

    c = config
    keys = iter(jax.random.split(key, 2 + 7 * c.layers))
    layers = [dict(attention_norm=jnp.ones(c.hidden, dtype), mlp_norm=jnp.ones(c.hidden, dtype),
                   q=linear(next(keys), c.hidden, c.heads * c.head_dim),
                   k=linear(next(keys), c.hidden, c.kv_heads * c.head_dim),
                   v=linear(next(keys), c.hidden, c.kv_heads * c.head_dim),
                   o=linear(next(keys), c.heads * c.head_dim, c.hidden),
                   gate=linear(next(keys), c.hidden, c.mlp), up=linear(next(keys), c.hidden, c.mlp),
                   down=linear(next(keys), c.mlp, c.hidden))
              for _ in range(c.layers)]
    return dict(embed=jax.random.normal(next(keys), (c.vocab, c.hidden), jnp.float32).astype(dtype),
                layers=layers, norm=jnp.ones(c.hidden, dtype), head=linear(next(keys), c.hidden, c.vocab))


def rms_norm(x, weight, eps=1e-5):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight


def rotary_tables(seq, head_dim, base, dtype):
    """cos and sin of shape (S, 1, D), for (B, S, H, D) activations (rotate-half form)."""
    inv = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.outer(jnp.arange(seq, dtype=jnp.float32), inv)
    angles = jnp.concatenate((angles, angles), axis=-1)[:, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1) * sin


def loss_fn(params, ids, targets, config, attend):
    c = config
    B, S = ids.shape
    cos, sin = rotary_tables(S, c.head_dim, c.rope_base, params["embed"].dtype)
    x = params["embed"][ids]
    for p in params["layers"]:
        h = rms_norm(x, p["attention_norm"])
        q = rotate((h @ p["q"]).reshape(B, S, c.heads, c.head_dim), cos, sin)
        k = rotate((h @ p["k"]).reshape(B, S, c.kv_heads, c.head_dim), cos, sin)
        v = (h @ p["v"]).reshape(B, S, c.kv_heads, c.head_dim)
        x = x + attend(q, k, v).reshape(B, S, c.heads * c.head_dim) @ p["o"]
        h = rms_norm(x, p["mlp_norm"])
        x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
    logits = (rms_norm(x, params["norm"]) @ params["head"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def adamw(params, grads, state, lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01):
    """One AdamW update, moments kept in the parameters' dtype (as torch.optim.AdamW does)."""
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: (b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32)).astype(m.dtype),
                     state["m"], grads)
    v = jax.tree.map(lambda v, g: (b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32))
                                   ).astype(v.dtype), state["v"], grads)

    def update(p, m, v):
        pf = p.astype(jnp.float32)
        m_hat = m.astype(jnp.float32) / (1 - b1 ** t)
        v_hat = v.astype(jnp.float32) / (1 - b2 ** t)
        return (pf - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * pf)).astype(p.dtype)

    return jax.tree.map(update, params, m, v), dict(t=t, m=m, v=v)


# --- Attention choices ----------------------------------------------------------------------------


def attend_function(name):
    if name == "cuflash":
        return lambda q, k, v: cuflash.jax.attention(q, k, v, causal=True)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=name)


def probe(name, config, dtype):
    """Raise where a choice cannot run here: one tiny jitted fwd + bwd with grouped heads."""
    attend = attend_function(name)
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, 128, config.heads, config.head_dim), dtype)
    k, v = (jax.random.normal(key, (1, 128, config.kv_heads, config.head_dim), dtype) for key in keys[1:])
    grads = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(grads(q, k, v))


# --- Timing ---------------------------------------------------------------------------------------


def run_step(name, config, batch, seq, dtype, args):
    attend = attend_function(name)
    params = init(config, jax.random.key(0), dtype)
    state = dict(t=jnp.zeros((), jnp.int32), m=jax.tree.map(jnp.zeros_like, params),
                 v=jax.tree.map(jnp.zeros_like, params))
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, config.vocab)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    def train_step(params, state, ids, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, targets, config, attend)
        params, state = adamw(params, grads, state)
        return params, state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    start = time.perf_counter()
    params, state, loss = jax.block_until_ready(step(params, state, ids, targets))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        params, state, loss = step(params, state, ids, targets)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, state, loss = jax.block_until_ready(step(params, state, ids, targets))
        times.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    for _ in range(args.steps):
        params, state, loss = step(params, state, ids, targets)
    jax.block_until_ready(loss)
    pipelined = (time.perf_counter() - start) * 1e3 / args.steps
    step_ms = statistics.median(times)
    return {"step_ms": step_ms, "tokens_per_s": batch * seq / step_ms * 1e3, "pipelined_step_ms": pipelined,
            "pipelined_tokens_per_s": batch * seq / pipelined * 1e3, "first_call_s": compile_s,
            "final_loss": float(loss)}


def attention_alone(name, config, batch, seq, dtype, args):
    """Median time of one jitted fwd + bwd of the attention at the model's shapes, in ms."""
    attend = attend_function(name)
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (batch, seq, config.heads, config.head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq, config.kv_heads, config.head_dim), dtype) for key in keys[1:3])
    dout = jax.random.normal(keys[3], q.shape, dtype)

    @jax.jit
    def fwd_bwd(q, k, v, dout):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(dout)

    for _ in range(args.warmup + 1):
        jax.block_until_ready(fwd_bwd(q, k, v, dout))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(fwd_bwd(q, k, v, dout))
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {"fwd_bwd_ms": ms, "per_step_ms": config.layers * ms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4x2048,1x8192", help="B x S pairs, comma-separated")
    parser.add_argument("--attention", default=",".join(ATTENTION))
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny float32 model (2 layers, B x S = 2 x 64) on the CPU: exercises the code paths")
    args = parser.parse_args()

    device = jax.devices()[0]
    if args.smoke:
        config, dtype, shapes = SMOKE, jnp.float32, [(2, 64)]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        device = jax.devices("cpu")[0]
    else:
        if device.platform != "gpu":
            parser.error("needs a GPU JAX (use --smoke for the CPU run of the code paths)")
        config, dtype = Config(), jnp.bfloat16
        shapes = [tuple(int(n) for n in item.split("x")) for item in args.shapes.split(",")]
    names = [n for n in args.attention.split(",") if n]
    unknown = set(names) - set(ATTENTION)
    if unknown:
        parser.error(f"unknown {sorted(unknown)}; choose from {', '.join(ATTENTION)}")

    machine = getattr(device, "device_kind", device.platform) if device.platform == "gpu" else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    results = {"machine": machine, "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "config": asdict(config),
               "steps": args.steps, "warmup": args.warmup, "attention": {}, "shapes": {}}
    runnable = []
    for name in names:
        try:
            probe(name, config, dtype)
            runnable.append(name)
            results["attention"][name] = "runs"
        except Exception as exc:  # noqa: BLE001  (a choice this machine lacks: reported, not run)
            results["attention"][name] = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"{name}: {results['attention'][name]}")
    print(f"{machine}; jax {jax.__version__}; {results['dtype']}; {config.layers} layers, hidden {config.hidden}, "
          f"{config.heads}/{config.kv_heads} heads of d = {config.head_dim}; median of {args.steps} steps")
    with jax.default_device(device):
        run_shapes(results, shapes, runnable, config, dtype, args)


def run_shapes(results, shapes, runnable, config, dtype, args):
    for batch, seq in shapes:
        label = f"{batch}x{seq}"
        steps, alone = {}, {}
        results["shapes"][label] = {"tokens_per_step": batch * seq, "steps": steps, "attention_alone": alone}
        print(f"\nB x S = {label} ({batch * seq} tokens per step)")
        print(f"  {'attention':<9} {'ms/step':>9} {'tokens/s':>11} {'pipelined':>11}   "
              + " ".join(f"{'vs ' + other:>9}" for other in REFERENCES)
              + f"   {'attention fwd+bwd ms':>20} {'x layers':>9} {'last loss':>9}")
        for name in runnable:
            try:
                steps[name] = run_step(name, config, batch, seq, dtype, args)
                alone[name] = attention_alone(name, config, batch, seq, dtype, args)
            except Exception as exc:  # noqa: BLE001  (one configuration failing does not stop the others)
                steps[name] = {"not_run": f"{type(exc).__name__}: {str(exc)[:500]}"}
        for name in runnable:
            row = steps[name]
            if "not_run" in row:
                print(f"  {name:<9} not run: {row['not_run'][:100]}")
                continue
            for other in REFERENCES:
                if "tokens_per_s" in steps.get(other, {}):
                    row[f"vs_{other}"] = row["tokens_per_s"] / steps[other]["tokens_per_s"]
            print(f"  {name:<9} {row['step_ms']:9.2f} {row['tokens_per_s']:11.0f} {row['pipelined_tokens_per_s']:11.0f}"
                  "   " + " ".join(f"{'—':>9}" if row.get(f"vs_{other}") is None else f"{row[f'vs_{other}']:8.2f}x"
                                 for other in REFERENCES)
                  + f"   {alone[name]['fwd_bwd_ms']:20.3f} {alone[name]['per_step_ms']:9.2f} {row['final_loss']:9.4f}")
        if args.json:  # after every shape, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
