"""Write the toy world's students: ``student-random``, ``student-pretrained``, ``student-aligned`` (Chinese) and
``student-multilingual``, ``student-multilingual-aligned`` (every target language).

All share the architecture and the seeded initialisation (``ToyStudentConfig``). ``student-pretrained`` is
pretrained with masked-language modelling on the world's Chinese captions of the training split;
``student-aligned`` continues from it with xling's own ``distill`` recipe against the committed toy teacher
(AltCLIP's teacher learning: the student's ``[CLS]`` regressed onto the teacher's pooled text embedding,
parallel captions only, no images), a toy "multilingual CLIP". The multilingual pair is the same with the
character tokenizer over every script (``build_multilingual_tokenizer``), MLM on the training-split captions
of every target language (``--multilingual-mlm-steps``) and ``distill --language all``. CPU, reproducible
from ``--seed``::

    uv run python scripts/pretrain_toy_student.py            # writes into toyworld/assets/
    uv run python scripts/pretrain_toy_student.py --out runs/students --mlm-steps 200
    uv run python scripts/pretrain_toy_student.py --stages aligned   # only re-align the committed student
    uv run python scripts/pretrain_toy_student.py --stages multilingual multilingual-aligned
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xling.train.toyworld import TOY_STUDENTS
from xling.train.toyworld import student as toy
from xling.train.toyworld.world import MIXED, TARGET_LANGUAGES

if TYPE_CHECKING:
    from transformers import BertModel


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
    parser.add_argument(
        "--multilingual-mlm-steps",
        type=int,
        default=1600,
        help="MLM steps of student-multilingual (its corpus is five languages, ~5x the Chinese one)",
    )
    parser.add_argument("--variants", type=int, default=8, help="paraphrase draws per scene for the corpus")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=TOY_STUDENTS,
        default=list(TOY_STUDENTS),
        help="which students to write (aligned starts from the pretrained one in --out)",
    )
    parser.add_argument("--align-steps", type=int, default=1500, help="distill updates for student-aligned")
    parser.add_argument("--align-lr", type=float, default=1e-3)
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
    common = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "script": "scripts/pretrain_toy_student.py",
    }
    for family in (CHINESE, MULTILINGUAL):
        stages = [stage for stage in family.stages if stage in args.stages]
        if stages:
            write_family(family, stages, config, args, common)


@dataclass(frozen=True)
class Family:
    """Students that share a tokenizer and a corpus: the random, MLM and aligned variants' folder names."""

    languages: tuple[str, ...]
    random: str | None
    pretrained: str
    aligned: str
    multilingual: bool

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in (self.random, self.pretrained, self.aligned) if s is not None)


CHINESE = Family(("zh",), "random", "pretrained", "aligned", multilingual=False)
MULTILINGUAL = Family(TARGET_LANGUAGES, None, "multilingual", "multilingual-aligned", multilingual=True)


def write_family(
    family: Family, stages: list[str], config: toy.ToyStudentConfig, args: argparse.Namespace, common: dict
) -> None:
    """Write ``stages`` of one family of students into ``args.out``."""
    # The vocabulary covers every split (held-out combinations reuse the same characters); the MLM corpus is
    # the training split only, so held-out combinations stay unseen by the pretrained student too.
    # The multilingual vocabulary also holds what code-switched prompts write, so scoring them needs no [UNK].
    vocabulary_languages = (*family.languages, MIXED) if family.multilingual else family.languages
    vocabulary_text = toy.world_captions("all", args.variants, args.seed, languages=vocabulary_languages)
    corpus = toy.world_captions("train", args.variants, args.seed, languages=family.languages)
    build = toy.build_multilingual_tokenizer if family.multilingual else toy.build_student_tokenizer
    tokenizer = build(vocabulary_text, max_length=config.max_length)
    print(f"{family.pretrained}: vocabulary {len(tokenizer)} tokens; MLM corpus {len(corpus)} captions")
    if family.multilingual:
        config = dataclasses.replace(config, mlm_steps=args.multilingual_mlm_steps)
    facts = {**common, "languages": list(family.languages)}
    if family.random in stages:
        random_model = toy.build_student_model(tokenizer, config)
        meta = {"variant": family.random, **facts}
        print(
            f"wrote {toy.save_student(args.out / f'student-{family.random}', random_model, tokenizer, config, meta)}"
        )

    if family.pretrained in stages:
        model, stats = toy.pretrain_mlm(tokenizer, corpus, config)
        meta = {"variant": family.pretrained, "corpus_captions": len(corpus), "mlm": stats, **facts}
        out = args.out / f"student-{family.pretrained}"
        print(f"wrote {toy.save_student(out, model, tokenizer, config, meta)}")
        print(json.dumps(stats, indent=2))

    if family.aligned in stages:
        source = args.out / f"student-{family.pretrained}"
        language = ",".join(family.languages)
        model, stats = align(source, args.align_steps, args.align_lr, args.seed, language)
        meta = {"variant": family.aligned, "from": source.name, "distill": stats, **facts}
        print(
            f"wrote {toy.save_student(args.out / f'student-{family.aligned}', model, tokenizer, config, meta)}"
        )
        print(json.dumps(stats, indent=2))


def align(
    pretrained: Path, steps: int, lr: float, seed: int, language: str = "zh"
) -> tuple[BertModel, dict[str, float]]:
    """The ``distill`` recipe from ``pretrained`` against the toy teacher on ``language``'s captions; its student
    and the run's figures."""
    from transformers import BertModel

    from xling.train.recipes import run_recipe

    with tempfile.TemporaryDirectory(prefix="xling-align-") as tmp:
        config = {
            "teacher": "toy",  # the toy section supplies the batch size and warm-up
            "student": str(pretrained),
            "language": language,
            "max_steps": steps,
            "lr": lr,
            "seed": seed,
            # the head and dropout student-aligned was made with (before distill took AltCLIP's preset)
            "pre_norm": False,
            "student_dropout": True,
            "output_dir": tmp,
            "checkpoint_every": 0,
            "log_with": "none",
            "eval": {"enabled": False},
        }
        result = run_recipe("distill", config)
        model = BertModel.from_pretrained(result.adapter_dir / "student")
    stats = {
        "steps": result.steps,
        "lr": lr,
        "first_loss": result.losses[0],
        "final_loss": result.losses[-1],
        **{k.removeprefix("val/"): v for k, v in result.val_logs.items()},
        "seconds": result.wall_time_s,
    }
    return model, stats


if __name__ == "__main__":
    main()
