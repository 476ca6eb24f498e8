"""One IAP training step: pivot tap + fused kernel against the naive second UNet pass, same batch, one run.

pivot: one UNet forward conditioned on E_en under ``no_grad``; in every cross-attention layer the
  PivotTap computes the student's K/V from E_zh with the frozen projections and calls the fused
  ``dual_attention_mse`` (teacher output flows on, the MSE to the student output is returned);
  backward reaches the student only, never the UNet.
naive: a teacher UNet pass (no_grad) and a second UNet pass conditioned on E_zh, cross-attention
  outputs captured by forward pre-hooks on every ``attn2.to_out[0]`` (the same tensor the tap
  compares), loss = sum of per-layer MSE, back-propagated through the whole UNet into the student.

Both steps include the student forward, backward and an AdamW step; the UNet is frozen in both.
E_en is a fixed tensor (a cached teacher embedding: identical work for both methods).

Timing: ``--iters`` rounds, each running one step of every method in turn, so load from other jobs on
a shared machine falls on both methods alike; the ratio of the two is the number to read.
Peak memory: a separate pass of two steps per method. CUDA ``torch.cuda.max_memory_allocated``
(absolute, and above what was allocated before them). CPU: process RSS sampled every 0.5 ms by a
thread, peak above the RSS before the steps, with glibc's mmap threshold pinned to 64 KiB
(``mallopt``) so freed tensors go back to the OS and RSS follows live memory; tracemalloc does not
see torch's allocations.

``--family pixart|sana|sd3|flux`` times the same two steps on a random transformer of that family
(``benchmarks/train/_families.py``; ``--size cpu`` or the released widths at reduced depth, ``--size full``):
pivot = ``PivotTap`` after the frozen caption projection (PixArt, Sana) or the teacher-forced joint-attention
``JointPivotTap`` (SD3, Flux); naive = a second full transformer pass on the student's conditioning,
back-propagated, MSE on every tapped layer's image-token attention output.

Usage::

    uv run python benchmarks/train/bench_iap_step.py --config toy             # CPU, the toy teacher
    uv run python benchmarks/train/bench_iap_step.py --config toy-mmdit       # CPU, the toy MMDiT teacher
    python benchmarks/train/bench_iap_step.py --config sd15 --device cuda     # SD1.5 UNet, fp16, random
    uv run python benchmarks/train/bench_iap_step.py --family sd3             # CPU, a small random SD3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _families as families

# The SD 1.5 UNet layout (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# A tiny random UNet for smoke tests when no teacher directory is given.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


#: Steps per method in the memory pass (the peak is reached in every step; timing has its own rounds).
MEMORY_STEPS = 2


@dataclass
class Result:
    method: str
    samples_per_s: float
    step_ms: float
    peak_mb: float
    step_peak_mb: float
    loss: float


class Student(nn.Module):
    """A BERT encoder plus a linear head to the teacher width: E_zh = head(bert(ids))."""

    def __init__(self, bert: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, out_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, w]
        return self.head(hidden)  # [B, L, D]


def build_student(config: str, width: int | None, layers: int | None, out_dim: int) -> Student:
    """The committed toy student for ``--config toy`` (what ``xling train iap`` trains), else a random BERT
    (vocabulary 21128, as bert-base-chinese) of the given size."""
    from transformers import BertConfig, BertModel

    if config == "toy" and width is None and layers is None:
        from xling.train.toyworld.student import student_path

        return Student(BertModel.from_pretrained(student_path(), add_pooling_layer=False), out_dim)
    width = width or (768 if config == "sd15" else 64)
    bert_config = BertConfig(
        vocab_size=21128,
        hidden_size=width,
        num_hidden_layers=layers or (12 if config == "sd15" else 2),
        num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width,
        max_position_embeddings=512,
    )
    return Student(BertModel(bert_config, add_pooling_layer=False), out_dim)


def build_unet(config: str, teacher: str | None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if teacher is not None:
        return UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    if config == "toy":
        from xling.train.toyworld import teacher_path

        return UNet2DConditionModel.from_pretrained(teacher_path(), subfolder="unet")
    return UNet2DConditionModel(**(SD15_UNET if config == "sd15" else TINY_UNET))


class RssPeak:
    """Peak resident memory of this process above a baseline, sampled by a thread (CPU runs)."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.peak = self.base = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssPeak:
        self.base = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def pin_glibc_mmap_threshold() -> bool:
    """Make glibc return freed blocks >= 64 KiB to the OS at once, so RSS tracks live tensors."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 65536)) and bool(libc.mallopt(m_trim_threshold, 65536))
    except OSError:
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        choices=["toy", "toy-mmdit", "sd15", "tiny"],
        default="toy",
        help="toy: the committed toy UNet teacher; toy-mmdit: the committed toy SD3-family teacher (its joint "
        "attention pivot); sd15 / tiny: a random UNet",
    )
    parser.add_argument(
        "--family",
        choices=["pixart", "sana", "sd3", "flux"],
        help="a random transformer teacher of this family instead of a UNet (--config is then ignored)",
    )
    parser.add_argument(
        "--size", choices=["cpu", "full"], default="cpu", help="--family: small, or the released widths"
    )
    parser.add_argument(
        "--latent", type=int, default=None, help="--family: latent side (default: 16 for cpu, 64 for full)"
    )
    parser.add_argument(
        "--teacher", help="a diffusers model dir whose unet/ to load (overrides --config's UNet)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="UNet dtype")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--text-len", type=int, default=None, help="student tokens (default: 77, toy: 64)")
    parser.add_argument("--student-width", type=int, default=None)
    parser.add_argument("--student-layers", type=int, default=None)
    parser.add_argument(
        "--attention",
        choices=["kernel", "reference"],
        default="kernel",
        help="fused kernel (xling.kernels, Triton on CUDA) or core's SDPA reference",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--methods", default="pivot,naive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from xling.core import JointPivotTap, PivotTap, caption_context_module, dual_attention_mse_sdpa

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sd15 = args.config == "sd15"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if cuda else "fp32")
    ]
    batch = args.batch_size or (8 if sd15 else 4)
    pinned = False if cuda else pin_glibc_mmap_threshold()

    torch.manual_seed(args.seed)
    family = args.family
    toy_mmdit = args.config == "toy-mmdit" and family is None
    if toy_mmdit:
        from diffusers import SD3Transformer2DModel

        from xling.train.toyworld import mmdit

        family = "sd3"
        unet = SD3Transformer2DModel.from_pretrained(mmdit.mmdit_teacher_path(), subfolder="transformer")
    elif family is None:
        unet = build_unet(args.config, args.teacher)
    else:
        unet = families.build(family, args.size)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    cfg = unet.config
    if family is None:
        latent, channels, pooled_width = int(cfg.sample_size), int(cfg.in_channels), None
        width = int(cfg.cross_attention_dim)
        teacher_len = 77
    elif toy_mmdit:  # pixel space; the teacher's prompt is its CLIP tokens + the zero T5 ones
        latent, channels = int(cfg.sample_size), int(cfg.in_channels)
        width, pooled_width = families.widths(family, unet)
        teacher_len = mmdit.MMDiTConfig().max_length + mmdit.T5_TOKENS
    else:
        latent, channels = args.latent or families.LATENT[args.size], families.latent_channels(family, unet)
        width, pooled_width = families.widths(family, unet)
        teacher_len = families.TEXT[family]
    student_kind = "toy" if toy_mmdit else "tiny" if family else args.config
    student = build_student(student_kind, args.student_width, args.student_layers, width)
    student = student.to(device)  # fp32 trainable
    vocab, positions = student.bert.config.vocab_size, student.bert.config.max_position_embeddings
    text_len = args.text_len or min(77, positions)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    g = torch.Generator().manual_seed(args.seed)
    z_t = torch.randn(batch, channels, latent, latent, generator=g).to(device, dtype)  # [B, C, h, w]
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    e_en = torch.randn(batch, teacher_len, width, generator=g).to(device, dtype)  # [B, L_en, D]
    # PixArt / Sana attend with the T5 / Gemma padding mask; SD3 / Flux condition on a pooled vector too
    en_mask = torch.ones(batch, teacher_len, dtype=torch.long, device=device)
    pooled = None if pooled_width is None else torch.randn(batch, pooled_width, generator=g).to(device, dtype)
    ids = torch.randint(vocab // 20, vocab, (batch, text_len), generator=g).to(device)  # [B, L], no specials
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=g)
    mask = (torch.arange(text_len)[None] < lengths[:, None]).to(device)  # [B, L] True = token

    joint = family in ("sd3", "flux")
    if joint:
        from xling.kernels import joint_dual_attention_mse, joint_dual_attention_mse_reference

        attention_fn = (
            joint_dual_attention_mse if args.attention == "kernel" else joint_dual_attention_mse_reference
        )
    elif args.attention == "kernel":
        from xling.kernels import dual_attention_mse as attention_fn
    else:
        attention_fn = dual_attention_mse_sdpa
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def student_embeds() -> torch.Tensor:
        with autocast:
            return student(ids, mask.long()).to(dtype)  # [B, L, D]

    if joint:
        tap = JointPivotTap(unet, attention_fn=attention_fn, fused=True)
    elif family is not None:
        tap = PivotTap(
            unet,
            attention_fn=attention_fn,
            fused=True,
            context_module=caption_context_module(unet),
            conditioning_dim=width,
        )
    else:
        tap = PivotTap(unet, attention_fn=attention_fn, fused=True)

    def denoise(embeds: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if family is None:
            return unet(z_t, t, encoder_hidden_states=embeds, encoder_attention_mask=key_mask)
        return families.call(family, unet, z_t, t, embeds, pooled, key_mask)

    def pivot_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with tap:
            tap.set_student(student_embeds(), mask)
            with torch.no_grad():
                denoise(e_en, en_mask if family in ("pixart", "sana") else None)
            loss = torch.stack(tap.losses).sum()
            tap.clear()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    captured: list[torch.Tensor] = []
    if family is None:
        hooks = [
            module.to_out[0].register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
            for name, module in unet.named_modules()
            if name.endswith("attn2")
        ]
    else:
        hooks = families.capture_image_outputs(family, unet, captured)
    tapped_layers = len(tap.layers)

    def naive_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        captured.clear()
        with torch.no_grad():
            denoise(e_en, en_mask if family in ("pixart", "sana") else None)
        teacher_out = list(captured)
        captured.clear()
        denoise(student_embeds(), mask)
        loss = sum(torch.mean((o_t.float() - o_s.float()) ** 2) for o_t, o_s in zip(teacher_out, captured))
        captured.clear()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    steps: dict[str, Callable[[], float]] = {"pivot": pivot_step, "naive": naive_step}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # Warm up every method before timing any, so lazy initialisation (Triton compiles, cuDNN) is excluded.
    for method in methods:
        for _ in range(args.warmup):
            steps[method]()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Memory: a few steps per method in a block of their own, the peak over them.
    memory: dict[str, tuple[float, float, float]] = {}  # method -> (peak, base, loss of its first step)
    for method in methods:
        gc.collect()
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            losses = [steps[method]() for _ in range(MEMORY_STEPS)]
            sync()
            peak = torch.cuda.max_memory_allocated()
        else:
            with RssPeak() as rss:
                losses = [steps[method]() for _ in range(MEMORY_STEPS)]
            base, peak = rss.base, rss.peak
        memory[method] = (peak, base, losses[0])
    # Time: rounds that alternate the methods, so what other jobs on a shared machine cost hits both alike.
    elapsed = dict.fromkeys(methods, 0.0)
    for _ in range(args.iters):
        for method in methods:
            sync()
            start = time.perf_counter()
            steps[method]()
            sync()
            elapsed[method] += time.perf_counter() - start
    results = [
        Result(
            method,
            batch * args.iters / elapsed[method],
            1000 * elapsed[method] / args.iters,
            memory[method][0] / 2**20,
            (memory[method][0] - memory[method][1]) / 2**20,
            memory[method][2],
        )
        for method in methods
    ]
    for hook in hooks:
        hook.remove()

    info = {
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "config": (args.config if toy_mmdit else f"{family} ({args.size})" if family else args.config)
        if args.teacher is None
        else f"unet from {args.teacher}",
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
        "cross_attention_layers": tapped_layers,
        "batch": batch,
        "latent": f"{cfg.in_channels}x{latent}x{latent}",
        "dtype": str(dtype).removeprefix("torch."),
        "attention": "joint_dual_attention_mse (merged)"
        if joint and args.attention == "kernel"
        else "joint_dual_attention_mse_reference (concatenated)"
        if joint
        else args.attention
        if not (args.attention == "kernel" and not cuda and os.environ.get("TRITON_INTERPRET") != "1")
        else "kernel (reference fallback on CPU)",
        "memory": "cuda max_memory_allocated"
        if cuda
        else f"RSS peak sampled at 0.5 ms (mallopt pinned: {pinned})",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "iters": args.iters,
        "warmup": args.warmup,
        "results": [asdict(r) for r in results],
    }
    by = {r.method: r for r in results}
    if "pivot" in by and "naive" in by:
        info["speedup"] = by["pivot"].samples_per_s / by["naive"].samples_per_s
        info["peak_ratio"] = by["pivot"].peak_mb / by["naive"].peak_mb
        info["step_peak_ratio"] = by["pivot"].step_peak_mb / max(by["naive"].step_peak_mb, 1e-9)
    print(markdown(info))
    if args.json is not None:
        args.json.write_text(json.dumps(info, indent=1))
    return info


def markdown(info: dict[str, Any]) -> str:
    """The results as a Markdown table with the setup above it."""
    lines = [
        f"{info['device']} | {info['config']} | denoiser {info['unet_params_m']}M params, "
        f"{info['cross_attention_layers']} tapped attention layers, {info['dtype']} | student {info['student_params_m']}M | batch {info['batch']}, latent "
        f"{info['latent']} | attention: {info['attention']} | memory: {info['memory']} | torch {info['torch']} | "
        f"{info['iters']} interleaved timed rounds after {info['warmup']} warm-up steps",
        "",
        "| method | samples/s | ms/step | peak MiB | peak above start MiB | loss (1st measured step) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in info["results"]:
        lines.append(
            f"| {r['method']} | {r['samples_per_s']:.2f} | {r['step_ms']:.1f} | {r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | {r['loss']:.4g} |"
        )
    if "speedup" in info:
        lines += [
            "",
            f"pivot / naive: **{info['speedup']:.2f}x samples/s**, peak memory {info['peak_ratio']:.2f}x "
            f"(above start: {info['step_peak_ratio']:.2f}x)",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
