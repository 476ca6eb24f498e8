"""Compile every Triton kernel build of xling-kernels for an H100 (sm_90) on the CPU; hash its PTX and SASS.

A refactor of the kernel package (moving jit helpers or launch code between modules, renaming locals) must
not change the generated code. This script proves it without a GPU: it runs the package's own autograd
Functions on CPU tensors with the package's `launch` replaced by a recorder, so every kernel sees exactly the
arguments, dtypes and compile-time constants the real launch path gives it, then compiles each build with
Triton's own compiler for `GPUTarget("cuda", 90, 32)` and the `ptxas` bundled with the triton wheel, and
disassembles the cubin with the bundled `cuobjdump` (or `nvdisasm`).

Builds: for every kernel, dtype (fp16, bf16, fp32), Stable Diffusion head dim (40, 64, 80, 160), mask
(with / without) and, for the query-tiled backward, with / without dQ: the generic build (small problems,
no integer specialisation, `fixed_config(large=False)`) and the fast build (large GPU problems: specialised
on sizes and strides; the forward kernels once per autotune config left by the pruning, the others with
`fixed_config(large=True)`). Identical builds reached from several problems are compiled once.

Line info is disabled (`TRITON_DISABLE_LINE_INFO=1`): PTX `.loc` / `.file` directives name source lines and
file paths, which any move of code changes by definition; everything else must be byte-identical.

Not a test (pytest does not collect it and CI does not run it): a check for whoever edits the kernels.
Run it from the repository root, without `TRITON_INTERPRET`, on the tree before the change and after::

    cp -r packages/xling-kernels/src <scratch>/kernels-before     # before editing
    uv run python benchmarks/kernels/check_codegen.py --src <scratch>/kernels-before --out before.json --jobs 2
    # ... edit ...
    uv run python benchmarks/kernels/check_codegen.py --out after.json --compare before.json --jobs 2

`--src` puts an older copy of the package first on the import path; `--compare` prints every build whose
PTX, cubin or SASS hash differs and exits 1 if any does. A full run compiles 468 builds (about 40 minutes
with `--jobs 2` on two busy CPU cores). `--list`, `--only REGEX` and `--limit N` pick builds; `--dump DIR`
writes their PTX and SASS for a diff; `--line-info` keeps the line info (to see what a move changes there).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float16", "bfloat16", "float32")
#: (head dim, heads, query length) of Stable Diffusion cross-attention layers: SD1.5 at 512 px (d = 40 / 80 / 160),
#: SD2 / SDXL (d = 64). Every feature-tile width (64, 128, 256) and both padded and unpadded d occur.
LAYERS = ((40, 8, 4096), (64, 10, 4096), (80, 8, 1024), (160, 8, 256))
BATCH, KEYS = 2, 77


@dataclass(frozen=True)
class Build:
    """One kernel compilation: what `JITFunction.run` would compile for these arguments."""

    label: str
    kernel: str  # "<module>:<attribute of the KernelPair>.<generic|fast>"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _prepare_env(src: str | None, line_info: bool = False) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces compilation")
    os.environ["TRITON_DISABLE_LINE_INFO"] = "0" if line_info else "1"
    if src is not None:
        sys.path.insert(0, str(Path(src).resolve()))


def _kernel_modules() -> tuple[Any, Any, Any]:
    """(dual attention module, fused MSE module, the module that defines `launch`), old or new layout."""
    da = importlib.import_module("xling.kernels.dual_attention")
    mse = importlib.import_module("xling.kernels.dual_attention_mse")
    lm = sys.modules[da.launch_forward.__module__]
    return da, mse, lm


def _pair_names(*modules: Any) -> dict[int, str]:
    # id(KernelPair) -> "module:NAME", found by shape (generic / fast / tuned) so the script needs no names.
    names = {}
    for module in modules:
        for attr, value in vars(module).items():
            if all(hasattr(value, f) for f in ("generic", "fast", "tuned")):
                names.setdefault(id(value), f"{module.__name__.rsplit('.', 1)[-1]}:{attr}")
    return names


def _inputs(torch: Any, d: int, h: int, n: int, dtype: Any, grad_q: bool) -> list[Any]:
    # diffusers' layout: [B, L, H*d] projections viewed as [B, H, L, d] through transpose(1, 2).
    def make(length: int, grad: bool) -> Any:
        t = torch.empty(BATCH, length, h, d, dtype=dtype).transpose(1, 2)
        return t.requires_grad_(grad)

    return [make(n, grad_q), make(KEYS, False), make(KEYS, False), make(KEYS, True), make(KEYS, True)]


def _record(torch: Any) -> list[Build]:
    """Run both autograd Functions over every problem with `launch` recording instead of launching."""
    da, mse, lm = _kernel_modules()
    pair_name = _pair_names(da, mse, lm)
    calls: list[tuple[Any, str, Any, tuple[Any, ...], dict[str, Any]]] = []

    def fake_launch(kernels: Any, kind: str, grid: Any, ref: Any, *args: Any, **constexprs: Any) -> None:
        calls.append((kernels, kind, ref, args, constexprs))

    lm.launch = fake_launch  # the launch helpers look `launch` up in their own module at call time
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for d, h, n in LAYERS:
            for masked in (False, True):
                mask2 = torch.ones(BATCH, KEYS, dtype=torch.bool) if masked else None
                for grad_q in (True, False):
                    for fn in (da.DualAttentionFunction, mse.DualAttentionMSEFunction):
                        q, k1, v1, k2, v2 = _inputs(torch, d, h, n, dtype, grad_q)
                        _, second = fn.apply(q, k1, v1, k2, v2, mask2, d**-0.5)
                        wanted = [t for t in (q, k2, v2) if t.requires_grad]
                        torch.autograd.grad(second, wanted, torch.ones_like(second))

    builds: dict[str, Build] = {}
    for kernels, kind, ref, args, constexprs in calls:
        d, dtype = ref.shape[-1], ref.dtype
        base = dict(constexprs, PRECISION=lm.precision(dtype), BLOCK_D=lm.block_d(d))
        name = pair_name[id(kernels)]
        variants = [("generic", "generic", lm.fixed_config(kind, d, dtype, large=False))]
        if kernels.tuned:
            tuner = kernels.fast
            configs = (
                tuner.early_config_prune(tuner.configs, {}, **base)
                if tuner.early_config_prune
                else tuner.configs
            )
            for c in configs:
                meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                variants.append(("fast", "autotune " + _meta_label(meta), meta))
        else:
            variants.append(("fast", "fast", lm.fixed_config(kind, d, dtype, large=True)))
        for build, variant, meta in variants:
            kwargs = dict(base, **meta)
            label = (
                f"{kernels.generic.__name__} {variant} {str(dtype).removeprefix('torch.')} d={d} "
                + _constexpr_label(constexprs, meta)
            )
            key = _build_key(args, kwargs, label)
            builds.setdefault(key, Build(label, f"{name}.{build}", _freeze(torch, args), kwargs))
    return sorted(builds.values(), key=lambda b: b.label)


def _meta_label(meta: dict[str, Any]) -> str:
    return "/".join(f"{k}={v}" for k, v in sorted(meta.items()))


def _constexpr_label(constexprs: dict[str, Any], meta: dict[str, Any]) -> str:
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items()))
    return f"{flags} [{_meta_label(meta)}]"


def _freeze(torch: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # A tensor argument is specialised on its dtype and its pointer's alignment only (all are 16-byte aligned
    # here): it travels to a worker as its dtype and is rebuilt there as a tiny aligned tensor.
    for a in args:
        if isinstance(a, torch.Tensor) and a.data_ptr() % 16:
            raise ValueError("unaligned tensor argument")
    return tuple(
        ("tensor", str(a.dtype).removeprefix("torch.")) if isinstance(a, torch.Tensor) else a for a in args
    )


def _build_key(args: tuple[Any, ...], kwargs: dict[str, Any], label: str) -> str:
    # Integer arguments matter through their specialisation only, but keeping the values is simpler and safe.
    parts = [f"T({a.dtype})" if hasattr(a, "data_ptr") else repr(a) for a in args]
    return label + "|" + ",".join(parts) + "|" + repr(sorted(kwargs.items()))


def _thaw(torch: Any, args: tuple[Any, ...]) -> list[Any]:
    out = []
    for a in args:
        if isinstance(a, tuple) and a and a[0] == "tensor":
            out.append(torch.empty(16, dtype=torch.uint8).view(getattr(torch, a[1])))
        else:
            out.append(a)
    return out


def _jit_function(kernel: str) -> Any:
    module_name, rest = kernel.split(":")
    attr, build = rest.split(".")
    module = importlib.import_module(f"xling.kernels.{module_name}")
    from triton.runtime.autotuner import Autotuner

    fn = getattr(getattr(module, attr), build)
    return fn.fn if isinstance(fn, Autotuner) else fn  # an Autotuner wraps the JITFunction it tunes


def _tools() -> dict[str, str]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {name: str(bin_dir / name) for name in ("cuobjdump", "nvdisasm") if (bin_dir / name).exists()}


def _sass(cubin: bytes) -> str:
    tools = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        if "cuobjdump" in tools:
            cmd = [tools["cuobjdump"], "-sass", str(path)]
        elif "nvdisasm" in tools:
            cmd = [tools["nvdisasm"], "-c", str(path)]
        else:
            return ""
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    # The temporary file name is the only thing in the listing that is not the code itself.
    return text.replace(str(path), "kernel.cubin")


def _compile(build: Build, dump: str | None = None) -> dict[str, Any]:
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(build.kernel)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    # What JITFunction.run does before compiling, minus the driver (there is no GPU).
    kwargs = dict(build.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*_thaw(torch, build.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    sass = _sass(cubin)
    if dump:
        stem = Path(dump) / re.sub(r"[^A-Za-z0-9_.=-]+", "_", build.label)
        stem.with_suffix(".ptx").write_text(ptx)
        stem.with_suffix(".sass").write_text(sass)

    def digest(data: str | bytes) -> str:
        return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()

    return {
        "label": build.label,
        "name": compiled.metadata.name,
        "ptx": digest(ptx),
        "cubin": digest(cubin),
        "sass": digest(sass) if sass else None,
    }


@contextlib.contextmanager
def _cache_dir() -> Iterator[None]:
    # A fresh Triton cache: every build is really compiled, and nothing is left in the user's cache.
    with tempfile.TemporaryDirectory(prefix="xling-codegen-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp
        yield


def _worker_init(src: str | None, line_info: bool) -> None:
    _prepare_env(src, line_info)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", help="a copy of the package's src/ folder to check instead of the installed one"
    )
    parser.add_argument("--out", default="codegen.json", help="where to write the hashes (JSON)")
    parser.add_argument("--compare", help="hashes of an earlier run (JSON) to compare against")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    parser.add_argument("--limit", type=int, help="compile only the first N builds (a quick smoke run)")
    parser.add_argument("--list", action="store_true", help="list the builds and exit")
    parser.add_argument("--only", help="compile only the builds whose label matches this regular expression")
    parser.add_argument("--dump", help="also write each build's PTX and SASS listing into this folder")
    parser.add_argument(
        "--line-info",
        action="store_true",
        help="keep line info (then any moved source line changes the hashes)",
    )
    opts = parser.parse_args()

    _prepare_env(opts.src, opts.line_info)
    import torch

    import xling.kernels

    print(f"checking {Path(xling.kernels.__file__).parent}", flush=True)
    builds = _record(torch)
    if opts.only:
        builds = [b for b in builds if re.search(opts.only, b.label)]
    if opts.limit is not None:
        builds = builds[: opts.limit]
    print(f"{len(builds)} builds", flush=True)
    if opts.list:
        print("\n".join(b.label for b in builds))
        return 0
    results = []
    if opts.dump:
        Path(opts.dump).mkdir(parents=True, exist_ok=True)
    compile_one = functools.partial(_compile, dump=opts.dump)
    with _cache_dir():
        if opts.jobs > 1:
            init = (opts.src, opts.line_info)
            with ProcessPoolExecutor(opts.jobs, initializer=_worker_init, initargs=init) as pool:
                for i, r in enumerate(pool.map(compile_one, builds), 1):
                    results.append(r)
                    print(f"[{i}/{len(builds)}] {r['label']}", flush=True)
        else:
            for i, b in enumerate(builds, 1):
                results.append(r := compile_one(b))
                print(f"[{i}/{len(builds)}] {r['label']}", flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {len(results)} builds to {opts.out}")
    if not opts.compare:
        return 0
    before = {r["label"]: r for r in json.loads(Path(opts.compare).read_text())}
    subset = opts.only is not None or opts.limit is not None
    missing = [label for label in before if label not in {r["label"] for r in results} and not subset]
    bad = len(missing)
    for label in missing:
        print(f"only in {opts.compare}: {label}")
    for r in results:
        old = before.get(r["label"])
        diff = ["missing"] if old is None else [k for k in ("name", "ptx", "cubin", "sass") if old[k] != r[k]]
        if diff:
            print(f"differs ({', '.join(diff)}): {r['label']}")
            bad += 1
    print(
        f"{len(results) - bad + len(missing)} of {len(results)} builds identical (PTX, cubin, SASS); {bad} not"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
