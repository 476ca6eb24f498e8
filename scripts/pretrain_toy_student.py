"""Write the toy world's two Chinese students: ``student-random`` and ``student-pretrained``.

Both share the architecture and the seeded initialisation (``ToyStudentConfig``); the second is pretrained
with masked-language modelling on the world's Chinese captions of the training split. CPU, about a minute,
reproducible from ``--seed``::

    uv run python scripts/pretrain_toy_student.py            # writes into toyworld/assets/
    uv run python scripts/pretrain_toy_student.py --out runs/students --mlm-steps 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from xling.train.toyworld import student as toy


def main(argv: list[str] | None = None) -> None:
    defaults = toy.ToyStudentConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(toy.__file__).resolve().parent / "assets",
        help="directory that receives student-random/ and student-pretrained/ (default: the package assets)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_hidden_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_attention_heads)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--mlm-steps", type=int, default=defaults.mlm_steps)
    parser.add_argument("--mlm-batch-size", type=int, default=defaults.mlm_batch_size)
    parser.add_argument("--mlm-lr", type=float, default=defaults.mlm_lr)
    parser.add_argument("--variants", type=int, default=8, help="paraphrase draws per scene for the corpus")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on a shared CPU)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = toy.ToyStudentConfig(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_length=args.max_length,
        seed=args.seed,
        mlm_steps=args.mlm_steps,
        mlm_batch_size=args.mlm_batch_size,
        mlm_lr=args.mlm_lr,
    )
    # The vocabulary covers every split (held-out combinations reuse the same characters); the MLM corpus is
    # the training split only, so held-out combinations stay unseen by the pretrained student too.
    vocabulary_text = toy.world_chinese_captions("all", variants=args.variants, seed=args.seed)
    corpus = toy.world_chinese_captions("train", variants=args.variants, seed=args.seed)
    tokenizer = toy.build_student_tokenizer(vocabulary_text, max_length=config.max_length)
    print(f"vocabulary {len(tokenizer)} tokens; MLM corpus {len(corpus)} captions")

    common = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "script": "scripts/pretrain_toy_student.py",
    }
    random_model = toy.build_student_model(tokenizer, config)
    path = toy.save_student(
        args.out / "student-random", random_model, tokenizer, config, {"variant": "random", **common}
    )
    print(f"wrote {path}")

    model, stats = toy.pretrain_mlm(tokenizer, corpus, config)
    meta = {"variant": "pretrained", "corpus_captions": len(corpus), "mlm": stats, **common}
    path = toy.save_student(args.out / "student-pretrained", model, tokenizer, config, meta)
    print(f"wrote {path}")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
