"""Train the toy world's tiny English teacher and save it as a ``StableDiffusionPipeline`` directory.

    uv run python scripts/train_toy_teacher.py --out runs/teacher --steps 300          # CPU smoke run
    uv run python scripts/train_toy_teacher.py --out runs/teacher2 --init-from TEACHER --pair-fraction 0.5 \
        --lr 2e-4 --warmup 20 --batch-size 64 --time-budget-s 1800 --device cpu   # two-object fine-tune
    python scripts/train_toy_teacher.py --out $OUT/teacher --time-budget-s 420 --device cuda

The UNet diffuses 32x32 pixels (the VAE is an exact identity, see ``toyworld.teacher``) with v-prediction on
a zero-terminal-SNR cosine schedule; the CLIP text encoder trains jointly; 10% of captions are dropped to the
empty prompt for classifier-free guidance; EMA weights are saved. Images come from a pre-rendered bank of
jittered renders of every single-object scene, captions from every English paraphrase of each scene;
``--pair-fraction`` puts that share of each batch on two-object scenes (a bank of their own) and
``--init-from`` fine-tunes a saved teacher instead of training one from its seeded initialisation. With
``--time-budget-s`` the step count is fixed after timing the first steps, so ``--steps N`` with the N the log
reports reproduces a run exactly (same seed, same device kind).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xling.train.toyworld import world
from xling.train.toyworld.sampling import evaluate_teacher, image_grid
from xling.train.toyworld.teacher import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    TeacherConfig,
    build_identity_vae,
    build_scheduler,
    build_text_encoder,
    build_unet,
    write_tokenizer,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="pipeline directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", type=int, default=20_000, help="optimizer steps (an upper bound with --time-budget-s)"
    )
    p.add_argument(
        "--time-budget-s", type=float, default=None, help="fit the step count into this many seconds"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--cond-dropout", type=float, default=0.1, help="probability of training on the empty prompt"
    )
    p.add_argument(
        "--renders-per-scene", type=int, default=256, help="jittered renders per scene in the bank"
    )
    p.add_argument(
        "--pair-fraction", type=float, default=0.0, help="share of each batch drawn from two-object scenes"
    )
    p.add_argument("--pair-renders", type=int, default=16, help="jittered renders per two-object scene")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a saved toy teacher to fine-tune (its architecture wins)",
    )
    p.add_argument(
        "--eval-pairs", type=int, default=48, help="two-object scenes in the final evaluation (0: none)"
    )
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--eval-seeds", type=int, default=4, help="seeds per scene in the final evaluation (0: none)"
    )
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    p.add_argument("--eval-steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    return p.parse_args(argv)


def build_bank(
    renders: int, size: int, seed: int, scenes: list[world.Scene] | None = None
) -> tuple[torch.Tensor, list[world.Scene]]:
    """Pre-rendered images ``[S, R, 3, H, W]`` in [-1, 1] of ``scenes`` (default: every single-object scene)."""
    scenes = world.all_single_scenes() if scenes is None else scenes
    rng = np.random.default_rng(seed)
    bank = np.stack([np.stack([world.render(s, size, rng) for _ in range(renders)]) for s in scenes])
    images = torch.from_numpy(bank).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
    return images, scenes


def caption_ids(tokenizer, scenes: list[world.Scene], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[S, K, L]`` of K distinct English paraphrases per scene, and of the empty prompt ``[L]``."""
    rng = np.random.default_rng(seed)
    per_scene = []
    for s in scenes:
        caps = {world.caption_en(s): None}
        for _ in range(200):
            caps[world.caption_en(s, rng)] = None
        per_scene.append(sorted(caps))
    k = min(len(c) for c in per_scene)

    def enc(texts: list[str]) -> torch.Tensor:
        kw = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
        return tokenizer(texts, return_tensors="pt", **kw).input_ids

    ids = torch.stack([enc(c[:k]) for c in per_scene])
    return ids, enc([""])[0]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` down to 10% of it at ``total``."""
    if step < warmup:
        return peak * min(1.0, (step + 1) / warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def draw_batch(
    gen: torch.Generator,
    bank: torch.Tensor,
    ids: torch.Tensor,
    empty: torch.Tensor,
    batch_size: int,
    cond_dropout: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: images ``[B, 3, H, W]`` of the bank ``[S, R, 3, H, W]`` and the token ids ``[B, L]`` of one
    of each image's scene's captions ``[S, K, L]``, a ``cond_dropout`` share of them the empty prompt ``[L]``."""
    device, b = bank.device, batch_size
    si = torch.randint(bank.shape[0], (b,), device=device, generator=gen)
    ri = torch.randint(bank.shape[1], (b,), device=device, generator=gen)
    ki = torch.randint(ids.shape[1], (b,), device=device, generator=gen)
    drop = torch.rand(b, device=device, generator=gen) < cond_dropout
    return bank[si, ri], torch.where(drop[:, None], empty[None], ids[si, ki])


def ema_update(pairs: list[tuple[torch.Tensor, torch.Tensor]], step: int, decay: float) -> None:
    """``ema <- lerp(ema, weight, 1 - d)`` for each ``(ema, weight)`` pair, with ``d`` warmed up to ``decay``."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1 - d)


def run_steps(
    train_step: Callable[[int, int], float],
    args: argparse.Namespace,
    device: torch.device,
    after_step: Callable[[int], dict | None] | None = None,
) -> tuple[int, list[dict], float]:
    """Run ``train_step(step, total)`` ``args.steps`` times, or as many as fit ``args.time_budget_s``.

    With a time budget, steps 10..40 are timed (the first ones pay for allocator warm-up and cuDNN autotuning)
    and the count is fixed from them, so ``--steps N`` with the N the log reports reproduces the run. Every
    ``args.log_every`` steps the loss is logged; ``after_step(step)`` may add a record of its own.

    Returns:
        ``(steps run, log records, wall time in seconds)``.
    """
    total, first = args.steps, 0
    start = time.time()
    log: list[dict] = []
    if args.time_budget_s is not None:
        first = 40
        for i in range(first):
            if i == 10:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t10 = time.time()
            train_step(i, total)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.time() - t10) / (first - 10)
        left = args.time_budget_s - (time.time() - start)
        total = max(first + 1, min(args.steps, int(left / per_step) + first))
        print(f"{per_step * 1000:.1f} ms/step -> {total} steps", flush=True)
    for step in range(first, total):
        loss = train_step(step, total)
        if step % args.log_every == 0:
            log.append({"step": step, "loss": round(loss, 5), "time_s": round(time.time() - start, 1)})
            print(log[-1], flush=True)
        record = after_step(step) if after_step is not None else None
        if record:
            log.append(record)
            print(record, flush=True)
    return total, log, time.time() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config = TeacherConfig(block_out_channels=tuple(args.channels), text_width=args.text_width)
    tokenizer = write_tokenizer(args.out / "tokenizer", config.max_length)
    if args.init_from is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet").to(device)
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder").to(device)
    else:
        text_encoder = build_text_encoder(tokenizer, config).to(device)
        unet = build_unet(config).to(device)
    sampler = build_scheduler()
    noise_sched = DDPMScheduler.from_config(sampler.config)
    alphas = noise_sched.alphas_cumprod.to(device)  # [T]

    bank, scenes = build_bank(args.renders_per_scene, config.resolution, args.seed)
    bank = bank.to(device)  # [S, R, 3, H, W]
    ids, empty = caption_ids(tokenizer, scenes, args.seed)
    ids, empty = ids.to(device), empty.to(device)  # [S, K, L], [L]
    n_pairs = round(args.batch_size * args.pair_fraction)
    if n_pairs:
        # The training split only: held-out pair combinations stay unseen, so the teacher's pair accuracy on
        # them measures composition rather than memory.
        pair_bank, pair_scenes = build_bank(
            args.pair_renders, config.resolution, args.seed + 1, world.all_pair_scenes("train")
        )
        pair_bank = pair_bank.to(device)
        pair_ids, _ = caption_ids(tokenizer, pair_scenes, args.seed + 1)
        pair_ids = pair_ids.to(device)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    ema_pairs = list(zip(ema_unet.parameters(), unet.parameters())) + list(
        zip(ema_text.parameters(), text_encoder.parameters())
    )
    gen = torch.Generator(device).manual_seed(args.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    print(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, "
        f"bank {tuple(bank.shape)}, captions {tuple(ids.shape)}, device {device}",
        flush=True,
    )

    def train_step(step: int, total: int) -> float:
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, total, args.lr, args.warmup)
        b = args.batch_size
        x0, tok = draw_batch(gen, bank, ids, empty, b - n_pairs, args.cond_dropout)  # [B, 3, H, W], [B, L]
        if n_pairs:
            x0_pair, tok_pair = draw_batch(gen, pair_bank, pair_ids, empty, n_pairs, args.cond_dropout)
            x0, tok = torch.cat([x0, x0_pair]), torch.cat([tok, tok_pair])
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = alphas[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        with autocast:
            emb = text_encoder(tok)[0]  # [B, L, D]
            pred = unet(x_t, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_pairs, step, args.ema_decay)
        return loss.item() if step % args.log_every == 0 else float("nan")

    total, log, train_time = run_steps(train_step, args, device)

    tokenizer_dir = args.out / "tokenizer"
    pipe = StableDiffusionPipeline(
        unet=ema_unet.float().cpu(),
        vae=build_identity_vae(),
        text_encoder=ema_text.float().cpu(),
        tokenizer=tokenizer,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    write_tokenizer(tokenizer_dir, config.max_length)  # keep vocab.json/merges.txt beside tokenizer.json
    record = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": total,
        "train_time_s": round(train_time, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "log": log,
        "eval": [],
    }
    if args.eval_seeds > 0:
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for guidance in args.eval_guidance:
            t0 = time.time()
            acc, images = evaluate_teacher(
                pipe, seeds=range(args.eval_seeds), steps=args.eval_steps, guidance=guidance, batch_size=192
            )
            record["eval"].append(
                {
                    "guidance": guidance,
                    "steps": args.eval_steps,
                    "seeds": args.eval_seeds,
                    **acc,
                    "time_s": round(time.time() - t0, 1),
                }
            )
            print(record["eval"][-1], flush=True)
            from PIL import Image

            grid = image_grid(images[: 2 * len(scenes)], columns=12)  # two seeds, 12 scenes a row
            Image.fromarray(grid).save(args.out.parent / f"{args.out.name}_grid_g{guidance}.png")
            if args.eval_pairs > 0:
                t0 = time.time()
                chosen = world.pair_eval_scenes(args.eval_pairs)
                acc, images = evaluate_teacher(
                    pipe, chosen, seeds=range(args.eval_seeds), steps=args.eval_steps, guidance=guidance
                )
                record["eval"].append(
                    {
                        "guidance": guidance,
                        "kind": "pair",
                        "scenes": len(chosen),
                        "seeds": args.eval_seeds,
                        **acc,
                    }
                )
                record["eval"][-1]["time_s"] = round(time.time() - t0, 1)
                print(record["eval"][-1], flush=True)
                grid = image_grid(images[: 2 * len(chosen)], columns=12)
                Image.fromarray(grid).save(args.out.parent / f"{args.out.name}_pairs_grid_g{guidance}.png")
    (args.out.parent / f"{args.out.name}_log.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
