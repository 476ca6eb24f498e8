"""Benchmark the fused dual attention against two SDPA calls at Stable Diffusion cross-attention shapes.

Usage (from the repository root):
    python benchmarks/kernels/bench_dual_attention.py            # SD1.5 + SDXL shapes on a GPU, fp16
    python benchmarks/kernels/bench_dual_attention.py --small    # tiny shapes (CPU / Triton interpreter)

Prints two Markdown tables: timings (ms, achieved GB/s, speedup over the PyTorch baseline of the same
row group, measured in the same run) and the error of the Triton forward and gradients against an fp32
reference. The byte counts are each implementation's own compulsory traffic (see `traffic_bytes`).
Also imported by tests/kernels/test_benchmark.py (pytest-benchmark), which reuses the shapes and callables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xling.kernels import (
    dual_attention,
    dual_attention_mse,
    dual_attention_mse_reference,
    dual_attention_reference,
    use_triton,
)


@dataclass(frozen=True)
class Shape:
    """One cross-attention layer: `q` `[b, h, n, d]`, both key/value sets `[b, h, m, d]`."""

    name: str
    b: int
    h: int
    n: int
    d: int
    m: int = 77

    @property
    def label(self) -> str:
        return f"{self.name} (B{self.b} H{self.h} N{self.n} d{self.d} M{self.m})"


#: SD1.5 at 512 px (8 heads) and SDXL at 1024 px (heads of 64), batch 16, text length 77.
SD_SHAPES: tuple[Shape, ...] = (
    Shape("sd15 4096x320", 16, 8, 4096, 40),
    Shape("sd15 1024x640", 16, 8, 1024, 80),
    Shape("sd15 256x1280", 16, 8, 256, 160),
    Shape("sd15 64x1280", 16, 8, 64, 160),
    Shape("sdxl 4096x640", 16, 10, 4096, 64),
    Shape("sdxl 1024x1280", 16, 20, 1024, 64),
)
#: Small enough for the Triton CPU interpreter.
SMALL_SHAPES: tuple[Shape, ...] = (Shape("small", 1, 2, 64, 40), Shape("small", 1, 2, 32, 80, 7))

#: impl name -> (is_triton, baseline impl name or None, backward included)
IMPLS: dict[str, tuple[bool, str | None, bool]] = {
    "sdpa x2": (False, None, False),
    "dual_attention": (True, "sdpa x2", False),
    "sdpa x2 + mse_loss": (False, None, False),
    "dual_attention_mse": (True, "sdpa x2 + mse_loss", False),
    "sdpa x2 + mse_loss fwd+bwd": (False, None, True),
    "dual_attention_mse fwd+bwd": (True, "sdpa x2 + mse_loss fwd+bwd", True),
}


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """q, k1, v1, k2, v2 in diffusers' layout: `view(B, L, H, d).transpose(1, 2)`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def make(length: int) -> torch.Tensor:
        return torch.randn(shape.b, length, shape.h, shape.d, generator=gen).to(device, dtype).transpose(1, 2)

    return [make(shape.n), make(shape.m), make(shape.m), make(shape.m), make(shape.m)]


def traffic_bytes(impl: str, shape: Shape, dtype: torch.dtype) -> int:
    """Compulsory DRAM traffic of one call of `impl`, in bytes.

    Two SDPA calls read q twice and write two outputs; `mse_loss` reads both back; the dual kernel reads q
    once and writes both outputs plus the fp32 LSE; the fused MSE kernel writes only o1 and the LSE.
    The backward (fwd+bwd rows) adds, for the fused kernel, reading q, o1, lse and the keys again, writing
    and re-reading dO, and the dK/dV partials; for the baseline, SDPA's backward reads q, k2, v2, o2, dO2
    and writes dK2, dV2 (q needs no grad).
    """
    e = torch.tensor([], dtype=dtype).element_size()
    qo = shape.b * shape.h * shape.n * shape.d * e  # one [B, H, N, d] tensor
    kv = 4 * shape.b * shape.h * shape.m * shape.d * e  # k1, v1, k2, v2
    lse = shape.b * shape.h * shape.n * 4
    forward = {
        "sdpa x2": 2 * qo + kv + 2 * qo,
        "dual_attention": qo + kv + 2 * qo + lse,
        "sdpa x2 + mse_loss": 2 * qo + kv + 2 * qo + 2 * qo,
        "dual_attention_mse": qo + kv + qo + lse,
    }
    if impl in forward:
        return forward[impl]
    if impl == "sdpa x2 + mse_loss fwd+bwd":
        # fwd (+ fp32 LSE) + mse backward (read o1, o2, write dO2) + SDPA backward (read q, o2, dO2, LSE, kv2).
        return forward["sdpa x2 + mse_loss"] + lse + 3 * qo + (3 * qo + lse + kv // 2) + kv // 2
    if impl == "dual_attention_mse fwd+bwd":
        # fwd + dq kernel (read q, o1, lse; write dO, delta) + dK/dV kernel (read q, dO, lse, delta).
        return forward["dual_attention_mse"] + (2 * qo + lse + qo + lse) + (2 * qo + 2 * lse) + kv
    raise KeyError(impl)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_callable(impl: str, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A zero-argument callable running `impl` once and synchronising the device (for timing)."""
    q, k1, v1, k2, v2 = inputs
    device = q.device.type

    if impl == "sdpa x2":

        def run() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k1, v1)
                F.scaled_dot_product_attention(q, k2, v2)
            _sync(device)

    elif impl == "dual_attention":

        def run() -> None:
            with torch.no_grad():
                dual_attention(q, k1, v1, k2, v2)
            _sync(device)

    elif impl == "sdpa x2 + mse_loss":

        def run() -> None:
            with torch.no_grad():
                o1 = F.scaled_dot_product_attention(q, k1, v1)
                o2 = F.scaled_dot_product_attention(q, k2, v2)
                F.mse_loss(o2, o1)
            _sync(device)

    elif impl == "dual_attention_mse":

        def run() -> None:
            with torch.no_grad():
                dual_attention_mse(q, k1, v1, k2, v2)
            _sync(device)

    elif impl in ("sdpa x2 + mse_loss fwd+bwd", "dual_attention_mse fwd+bwd"):
        # IAP's training step: q from a frozen pass (no grad), gradients for the student's k2, v2.
        k2g, v2g = k2.detach().requires_grad_(), v2.detach().requires_grad_()
        fused = impl.startswith("dual")

        def run() -> None:
            if fused:
                _, loss = dual_attention_mse(q, k1, v1, k2g, v2g)
            else:
                with torch.no_grad():
                    o1 = F.scaled_dot_product_attention(q, k1, v1)
                loss = F.mse_loss(F.scaled_dot_product_attention(q, k2g, v2g), o1)
            loss.backward()
            k2g.grad = v2g.grad = None
            _sync(device)

    else:
        raise KeyError(impl)
    return run


def time_ms(fn: Callable[[], None], device: str) -> float:
    """Median wall time of `fn` in ms (`triton.testing.do_bench` on CUDA, which also flushes L2)."""
    if device == "cuda":
        import triton.testing

        fn()  # compile and autotune before do_bench sizes its repetitions
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # Max-abs error over max(max-abs of the reference, 1), as in tests/kernels.
    return (
        (actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1.0)
    ).item()


def errors(shape: Shape, dtype: torch.dtype, device: str) -> dict[str, float]:
    """Errors of both Triton ops (forward and grads of q, k2, v2) against the fp32 reference on the same inputs."""
    inputs = make_inputs(shape, dtype, device, seed=1)
    out: dict[str, float] = {}
    for mse in (False, True):
        results = []
        for fn, cast in (
            (dual_attention_mse if mse else dual_attention, False),
            (dual_attention_mse_reference if mse else dual_attention_reference, True),
        ):
            q, k1, v1, k2, v2 = (t.detach().float() if cast else t.detach() for t in inputs)
            for t in (q, k2, v2):
                t.requires_grad_()
            o1, second = fn(q, k1, v1, k2, v2)
            if mse:
                (second * o1.numel()).backward()  # a sum of squares: keeps fp16 grads off the underflow floor
            else:
                gen = torch.Generator(device="cpu").manual_seed(2)
                (second.float() * torch.randn(second.shape, generator=gen).to(device)).sum().backward()
            results.append((o1.detach(), second.detach(), q.grad, k2.grad, v2.grad))
        (o1, second, dq, dk, dv), (r1, rsecond, rq, rk, rv) = results
        op = "mse" if mse else "dual"
        out[f"{op} o1"] = _rel(o1, r1)
        out[f"{op} {'loss' if mse else 'o2'}"] = (
            abs(second.item() - rsecond.item()) / abs(rsecond.item()) if mse else _rel(second, rsecond)
        )
        out[f"{op} dq"], out[f"{op} dk2"], out[f"{op} dv2"] = _rel(dq, rq), _rel(dk, rk), _rel(dv, rv)
        del results
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU / interpreter)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = SMALL_SHAPES if args.small or device == "cpu" else SD_SHAPES
    probe = make_inputs(shapes[0], dtype, device)[0]
    triton_ok = use_triton(probe)

    if device == "cuda":
        import triton

        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{args.dtype}, diffusers layout (transposed q/k/v)\n"
        )
    print("| shape | impl | ms | GB/s | speedup vs baseline |")
    print("|---|---|---:|---:|---:|")
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        times: dict[str, float] = {}
        for impl, (is_triton, baseline, _) in IMPLS.items():
            if is_triton and not triton_ok:
                continue
            ms = time_ms(make_callable(impl, inputs), device)
            times[impl] = ms
            gbps = traffic_bytes(impl, shape, dtype) / (ms * 1e-3) / 1e9
            speedup = f"{times[baseline] / ms:.3g}x" if baseline in times else "1.00x (baseline)"
            print(f"| {shape.label} | {impl} | {ms:.4g} | {gbps:.4g} | {speedup} |", flush=True)
        del inputs
    if not triton_ok:
        print("\n(Triton rows skipped: no CUDA device and TRITON_INTERPRET is not set)")
        return
    print("\nMax-abs error / max(|fp32 reference|, 1); MSE grads from loss * numel:\n")
    print(
        "| shape | dual o1 | dual o2 | dual dq | dual dk2 | dual dv2 | mse o1 | mse loss (rel) | mse dq | mse dk2 | mse dv2 |"
    )
    print("|---|" + "---:|" * 10)
    for shape in shapes:
        err = errors(shape, dtype, device)
        print(f"| {shape.label} | " + " | ".join(f"{v:.1e}" for v in err.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
