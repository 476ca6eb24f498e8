"""Evaluation of a trained student: alignment, paired-generation agreement, toy-world accuracy, CLIP score.

Everything compares the student with the teacher it was trained to imitate, at identical seeds:

- **alignment** (no sampling): token cosine between the student's ``prompt_embeds`` and the teacher's for
  parallel captions (where both have the same length; otherwise the cosine of their token means), and the
  attention MSE through :class:`xling.core.PivotTap`: for noised latents of the scene's image, the sum over
  every cross-attention layer of ``mean((Attn(Q, K_en, V_en) - Attn(Q, K_zh, V_zh))^2)`` (IAP eq. 3);
- **agreement**: images generated from the student's conditioning and from the teacher's conditioning on the
  parallel English caption, same seeds and sampler: latent MSE and PSNR of the decoded images;
- **accuracy** (toy world): the checker's verdict per attribute on every generated image, for the student on
  Chinese prompts, for the teacher on the parallel English captions ("perfect translation", the student's
  upper bound) and for the teacher on canonical English captions (its own accuracy);
- **CLIP score** with transformers' ``CLIPModel`` from a local CLIP folder (``xling eval --clip-model DIR``), of
  the student's and the teacher's images against the English captions.

:func:`evaluate_toy` runs all of it on the toy world, :func:`evaluate_pairs` on any teacher and any list of
parallel prompts; :func:`write_report` writes ``report.md``, ``metrics.json`` and ``grid.png``;
:func:`evaluate_adapter`, :func:`write_run_report` and :func:`generate_images` start from an adapter directory.

Modules: ``results`` (what an evaluation returns), ``metrics``, ``sampling`` (pipeline, conditioning,
seeded sampling), ``pairs`` (the path both evaluations share, and :func:`evaluate_pairs`), ``toy``,
``report`` (writers) and ``runs`` (adapter-directory entry points).
"""

from xling.core import Conditioning
from xling.train.evaluation.metrics import (
    agreement,
    attention_alignment,
    bootstrap_interval,
    clip_score,
    embedding_alignment,
    latent_mse,
    psnr,
)
from xling.train.evaluation.pairs import evaluate_pairs
from xling.train.evaluation.report import (
    format_interval,
    format_percent,
    group_label,
    group_table,
    report_markdown,
    write_grid,
    write_images,
    write_report,
)
from xling.train.evaluation.results import ATTRIBUTES, EvalResult, Samples
from xling.train.evaluation.runs import (
    adapter_teacher,
    evaluate_adapter,
    generate_images,
    prompt_pairs_from_rows,
    read_prompt_pairs,
    write_run_report,
)
from xling.train.evaluation.sampling import (
    check_fits,
    load_pipeline,
    pipeline_teacher,
    pipeline_text_options,
    sample,
    sampler_defaults,
    student_conditioning,
    teacher_conditioning,
    toy_sampler_defaults,
)
from xling.train.evaluation.toy import evaluate_toy, group_summary, student_languages

__all__ = [
    "ATTRIBUTES",
    "Conditioning",
    "EvalResult",
    "Samples",
    "adapter_teacher",
    "agreement",
    "attention_alignment",
    "bootstrap_interval",
    "check_fits",
    "clip_score",
    "embedding_alignment",
    "evaluate_adapter",
    "evaluate_pairs",
    "evaluate_toy",
    "format_interval",
    "format_percent",
    "generate_images",
    "group_label",
    "group_summary",
    "group_table",
    "latent_mse",
    "load_pipeline",
    "pipeline_teacher",
    "pipeline_text_options",
    "prompt_pairs_from_rows",
    "psnr",
    "read_prompt_pairs",
    "report_markdown",
    "sample",
    "sampler_defaults",
    "student_conditioning",
    "student_languages",
    "teacher_conditioning",
    "toy_sampler_defaults",
    "write_grid",
    "write_images",
    "write_report",
    "write_run_report",
]
