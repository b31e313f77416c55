"""PyTorch autograd for cuflash: ``cuflash.torch.attention`` is differentiable with ``loss.backward()``.

``import cuflash`` never imports PyTorch; importing this module does, and needs it installed.

    >>> import torch, cuflash.torch
    >>> q, k, v = (torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ...            for _ in range(3))
    >>> out = cuflash.torch.attention(q, k, v, causal=True)
    >>> out.float().square().sum().backward()       # fills q.grad, k.grad, v.grad
"""

try:
    import torch
except ImportError as exc:
    raise ImportError(
        "cuflash.torch needs PyTorch (pip install torch); the rest of cuflash works without it"
    ) from exc

from . import _api

__all__ = ["attention"]


class _Attention(torch.autograd.Function):
    """cuflash's forward, saving out and lse, and its backward, which recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal, causal_alignment, scale, deterministic, backend):
        out, lse = _api.attention(q, k, v, causal=causal, causal_alignment=causal_alignment, scale=scale,
                                  return_lse=True, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(causal=causal, causal_alignment=causal_alignment, scale=scale,
                           deterministic=deterministic, backend=backend)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _api.attention_backward(dout, q, k, v, out, lse, **ctx.options)
        # The options (causal ... backend) get no gradient.
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, causal=False, causal_alignment="bottom_right", scale=None, deterministic=False):
    """``cuflash.attention`` on torch tensors, differentiable through ``torch.autograd``.

    q, k, v are BSHD tensors — (B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv) — of one dtype
    (float16, bfloat16, float32 or float64) on one device, with any strides (BHSD storage passes
    in as ``x.transpose(1, 2)``). Returns out (B, Sq, Hq, Dv), a tensor of the same dtype and
    device. CUDA tensors run on the GPU kernels, on PyTorch's current stream, reading the tensors
    in place; float64 and CPU tensors run on cuflash's NumPy backend (CPU tensors in place, CUDA
    float64 ones copied to the host and back). The options mean what they mean in
    ``cuflash.attention``; ``deterministic=True`` makes the backward bitwise reproducible on the GPU.

    The backward recomputes attention tile by tile from the saved q, k, v, out and the
    log-sum-exp of the forward, so memory stays O(sequence length). Second derivatives are not
    supported.
    """
    problems = [f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}"
                for name, x in (("q", q), ("k", k), ("v", v)) if not isinstance(x, torch.Tensor)]
    # Checked here as well as by the backward, so a bad value fails before the forward runs.
    if not isinstance(deterministic, bool):
        problems.append(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if problems:
        raise TypeError("invalid arguments to cuflash.torch.attention:\n  - " + "\n  - ".join(problems))
    # "auto" would copy CPU tensors to a GPU when one is present; CPU tensors stay on the CPU.
    backend = "numpy" if q.device.type == "cpu" else "auto"
    return _Attention.apply(q, k, v, causal, causal_alignment, scale, deterministic, backend)
