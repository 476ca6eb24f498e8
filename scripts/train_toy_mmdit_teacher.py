"""Train the toy world's MMDiT teacher and save it as a ``StableDiffusion3Pipeline`` directory.

    uv run python scripts/train_toy_mmdit_teacher.py --out runs/teacher-mmdit --steps 200       # smoke run
    uv run python scripts/train_toy_mmdit_teacher.py --out runs/teacher-mmdit --time-budget-s 3600

An ``SD3Transformer2DModel`` (``toyworld.mmdit``) learns rectified flow on 32x32 pixels: ``x_t = (1 - s) x0 +
s noise`` with ``s`` uniform on the scheduler's grid ``(t + 1) / 1000`` (what ``xling.core.Teacher.add_noise``
draws), target ``noise - x0``, the transformer called as ``StableDiffusion3Pipeline`` calls it (timestep ``1000
s``, prompt = both CLIPs' penultimate states side by side + the zero T5 tokens, pooled = both projections).
Both CLIP encoders train jointly; 10% of captions are the empty prompt (classifier-free guidance); EMA
weights are saved. Images and captions are those of the UNet teacher's script (a bank of jittered renders of
every single-object scene, every English paraphrase). With ``--time-budget-s`` the step count is fixed after
timing steps 10-40, so ``--steps N`` with the N the log reports reproduces a run (same seed and device kind).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_toy_teacher import build_bank, caption_ids, draw_batch, ema_update, learning_rate, run_steps

from xling.train.toyworld import mmdit
from xling.train.toyworld.sampling import evaluate_teacher, image_grid
from xling.train.toyworld.teacher import build_identity_vae, write_tokenizer


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
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--cond-dropout", type=float, default=0.1, help="probability of training on the empty prompt"
    )
    p.add_argument(
        "--renders-per-scene", type=int, default=256, help="jittered renders per scene in the bank"
    )
    p.add_argument("--layers", type=int, default=mmdit.MMDiTConfig.layers)
    p.add_argument("--heads", type=int, default=mmdit.MMDiTConfig.heads)
    p.add_argument("--patch-size", type=int, default=mmdit.MMDiTConfig.patch_size)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--eval-seeds", type=int, default=4, help="seeds per scene in the final evaluation (0: none)"
    )
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[mmdit.DEFAULT_GUIDANCE])
    p.add_argument("--eval-steps", type=int, default=mmdit.DEFAULT_STEPS)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument(
        "--eval-every", type=int, default=0, help="score the EMA weights on one seed every N steps (0: never)"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from this saved teacher's weights (fresh optimizer, warm-up and EMA) instead of random ones",
    )
    return p.parse_args(argv)


def encode(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``StableDiffusion3Pipeline.encode_prompt`` without T5: ``[B, L + T5_TOKENS, 2W]`` and ``[B, 2W]``."""
    hidden, pooled = [], []
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    zeros = embeds.new_zeros(embeds.shape[0], mmdit.T5_TOKENS, embeds.shape[-1])
    return torch.cat([embeds, zeros], dim=1), torch.cat(pooled, dim=-1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diffusers import StableDiffusion3Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    config = mmdit.MMDiTConfig(layers=args.layers, heads=args.heads, patch_size=args.patch_size)
    tokenizer = write_tokenizer(args.out / "tokenizer", config.max_length)
    encoders = list(mmdit.build_text_encoders(tokenizer, config))
    transformer = mmdit.build_transformer(config)
    if args.init_from is not None:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        transformer = SD3Transformer2DModel.from_pretrained(args.init_from, subfolder="transformer")
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(args.init_from, subfolder=name)
            for name in ("text_encoder", "text_encoder_2")
        ]
    encoders = [e.to(device) for e in encoders]
    transformer = transformer.to(device)
    sampler = mmdit.build_flow_scheduler()
    n_train = sampler.config.num_train_timesteps

    bank, scenes = build_bank(args.renders_per_scene, config.resolution, args.seed)
    bank = bank.to(device)  # [S, R, 3, H, W]
    ids, empty = caption_ids(tokenizer, scenes, args.seed)
    ids, empty = ids.to(device), empty.to(device)  # [S, K, L], [L]

    models = [transformer, *encoders]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    ema_pairs = [
        (e, p)
        for em, m in zip(ema, models, strict=True)
        for e, p in zip(em.parameters(), m.parameters(), strict=True)
    ]
    gen = torch.Generator(device).manual_seed(args.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    print(
        f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M, text "
        f"{sum(p.numel() for e in encoders for p in e.parameters()) / 1e6:.2f}M, bank {tuple(bank.shape)}, "
        f"captions {tuple(ids.shape)}, device {device}, threads {torch.get_num_threads()}",
        flush=True,
    )

    def train_step(step: int, total: int) -> float:
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, total, args.lr, args.warmup)
        b = args.batch_size
        x0, tok = draw_batch(gen, bank, ids, empty, b, args.cond_dropout)  # [B, 3, H, W], [B, L]
        t = torch.randint(0, n_train, (b,), device=device, generator=gen)
        sigma = ((t + 1).float() / n_train).view(b, 1, 1, 1)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        x_t = (1 - sigma) * x0 + sigma * noise
        with autocast:
            embeds, pooled = encode(encoders, tok)
            pred = transformer(
                hidden_states=x_t,
                timestep=sigma.flatten() * n_train,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_pairs, step, args.ema_decay)
        return loss.item() if step % args.log_every == 0 else float("nan")

    def pipeline() -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(
            transformer=ema[0],
            scheduler=sampler,
            vae=build_identity_vae(shift_factor=0.0).to(device),
            text_encoder=ema[1],
            tokenizer=tokenizer,
            text_encoder_2=ema[2],
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    def score(pipe: StableDiffusion3Pipeline, seeds: range, guidance: float) -> tuple[dict, np.ndarray]:
        pipe.set_progress_bar_config(disable=True)
        return evaluate_teacher(
            pipe,
            seeds=seeds,
            steps=args.eval_steps,
            guidance=guidance,
            batch_size=192,
            call_kwargs=mmdit.PIPELINE_KWARGS,
        )

    def after_step(step: int) -> dict | None:
        if not (args.eval_every and step and step % args.eval_every == 0):
            return None
        acc, _ = score(pipeline(), range(1), mmdit.DEFAULT_GUIDANCE)
        return {"step": step, "ema_accuracy_seed0": acc}

    total, log, train_time = run_steps(train_step, args, device, after_step)

    pipe = pipeline().to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # keep vocab.json/merges.txt beside tokenizer.json
        write_tokenizer(args.out / name, config.max_length)
    record = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": total,
        "train_time_s": round(train_time, 1),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "log": log,
        "eval": [],
    }
    if args.eval_seeds > 0:
        pipe = pipe.to(device)
        for guidance in args.eval_guidance:
            t0 = time.time()
            acc, images = score(pipe, range(args.eval_seeds), guidance)
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
    (args.out.parent / f"{args.out.name}_log.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
