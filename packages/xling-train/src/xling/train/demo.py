"""``xling demo``: a Gradio page that draws a prompt in the adapter's language beside its English counterpart.

The left column is the frozen teacher on the English prompt, the right column the same teacher conditioned by
the student (the adapter) on the translated prompt, both at the same seeds and sampler settings, so any
difference between them is the student's. The page also shows the adapter's model-card facts (language,
teacher, student, recipe, head, widths, evaluation numbers when the card records them) and a gallery of example
prompt pairs (the toy grammar's held-out scenes) that fill both prompts when clicked.

Everything heavy is reused from :mod:`xling.train.evaluation`: the adapter and its recorded teacher are loaded
by ``load_adapter``, the pipeline by ``load_pipeline``, the conditioning by ``teacher_conditioning`` /
``student_conditioning``, the seeded sampler by ``sample``. Gradio is imported only by :func:`build_app` and
:func:`launch`, so importing this module (and ``xling --help``) stays fast.

Images of the toy world are 32 x 32 pixels; they are shown upscaled by :func:`upscale_factor` with
nearest-neighbour repetition (every pixel becomes a ``f x f`` block), so the page's PNG is exactly the
generated image again after ``image[::f, ::f]``. The ``N`` images of one side are laid out as one horizontal
strip, ``[H * f, N * W * f, 3]``, left to right at seeds ``seed, seed + 1, ...``.

Startup is quiet and offline: Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``),
no share link, no server-side rendering (no Node), no MCP server; the page's fonts are Gradio's bundled ones.

Example:
    >>> from xling.train import demo  # doctest: +SKIP
    >>> model = demo.load_demo()  # the toy world and its committed IAP adapter
    >>> teacher_strip, student_strip = model.generate("左边的红色圆形", "a red circle on the left", num_images=2)
    >>> teacher_strip.shape  # 32 * 8 high, 2 * 32 * 8 wide
    (256, 512, 3)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xling.train.toyworld.names import TOY, TOY_MMDIT, is_toy_teacher

if TYPE_CHECKING:
    import gradio as gr

#: The committed toy adapter (``scripts/train_toy_adapter.py``): IAP on the toy world, the demo's default.
TOY_ADAPTER_DIR = Path(__file__).resolve().parent / "toyworld" / "assets" / "adapter-iap"
#: The committed toy IAP adapter of the toy MMDiT teacher, served by ``xling demo --teacher toy-mmdit``.
TOY_MMDIT_ADAPTER_DIR = TOY_ADAPTER_DIR.with_name("adapter-iap-mmdit")

#: ``--adapter toy``: the committed toy adapter.
TOY_ADAPTER = TOY

#: Images are upscaled until their side is at least this many pixels (a toy image is 32).
MIN_DISPLAY_SIDE = 256
#: Most images per side and click (each one is a full sampler run per side).
MAX_IMAGES = 8
#: Most sampler steps the page accepts.
MAX_STEPS = 200
#: Largest guidance scale the page accepts.
MAX_GUIDANCE = 30.0
#: Seeds are ``torch.Generator().manual_seed`` values; the page keeps them in ``[0, 2**32)``.
MAX_SEED = 2**32 - 1
#: Example prompt pairs in the gallery.
NUM_EXAMPLES = 8

#: ``elem_id`` of each element a browser test drives: inputs, the button and the two image outputs.
ELEM_IDS: dict[str, str] = {
    "prompt": "xling-prompt",
    "prompt_en": "xling-prompt-en",
    "steps": "xling-steps",
    "guidance": "xling-guidance",
    "seed": "xling-seed",
    "num_images": "xling-num-images",
    "generate": "xling-generate",
    "teacher_image": "xling-teacher-image",
    "student_image": "xling-student-image",
    "facts": "xling-facts",
    "examples": "xling-examples",
}


#: How the page names a language code.
LANGUAGE_NAMES: dict[str, str] = {
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ar": "Arabic",
    "mixed": "code-switched",
}


def language_name(code: str) -> str:
    """``"zh"`` -> ``"Chinese"``, ``"zh,ja"`` -> ``"Chinese/Japanese"``; a code the page does not know, as is."""
    return "/".join(LANGUAGE_NAMES.get(c.strip(), c.strip()) for c in code.split(","))


class DemoInputError(ValueError):
    """A value typed on the page (or passed to :meth:`DemoModel.generate`) that cannot be sampled; the message
    names the field and the value."""


def upscale_factor(resolution: int) -> int:
    """The nearest-neighbour factor that makes a ``resolution``-pixel image at least :data:`MIN_DISPLAY_SIDE`
    pixels wide on the page: 8 for the 32-pixel toy world, 1 for a 512-pixel SD model."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    return max(1, math.ceil(MIN_DISPLAY_SIDE / resolution))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: every pixel becomes a ``factor x factor`` block.

    Args:
        images: ``[..., H, W, C]`` uint8.
        factor: ``f >= 1``.

    Returns:
        ``[..., H * f, W * f, C]``; ``out[..., ::f, ::f, :]`` is ``images`` again.
    """
    if factor < 1:
        raise ValueError(f"the upscaling factor must be >= 1, got {factor}")
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def strip(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` images side by side, left to right: ``[H, N * W, C]``."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {tuple(images.shape)}")
    return np.concatenate(list(images), axis=1)


def split_strip(image: np.ndarray, num_images: int, factor: int = 1) -> np.ndarray:
    """Undo :func:`strip` and :func:`upscale`: a page image ``[H * f, N * W * f, C]`` -> ``[N, H, W, C]``.

    Raises:
        ValueError: the width is not a multiple of ``num_images * factor`` or the height of ``factor``.
    """
    height, width = image.shape[:2]
    if num_images < 1 or width % (num_images * factor) or height % factor:
        raise ValueError(
            f"a {width} x {height} strip does not hold {num_images} images upscaled {factor} times"
        )
    tiles = np.stack(np.split(image, num_images, axis=1))
    return tiles[:, ::factor, ::factor]


@dataclass
class AdapterFacts:
    """What the page says about the adapter: from its model card (``README.md``) where it has one, else from
    its ``config.json``.

    Attributes:
        language: Language code of the prompts the adapter reads (``"zh"``).
        teacher: The teacher (base model) it was trained for.
        student: The student encoder it is built on.
        recipe: The training recipe (``"iap"``), ``None`` when nothing records it.
        head: The head type (``"linear"``, ``"mlp"``, ``"mixer"``), with LoRA noted.
        widths: Student width -> teacher width (and the pooled width, for SDXL).
        license: The card's license, if any.
        tags: The card's tags.
        evaluation: ``(metric, value)`` rows: the card's ``model-index`` results, else the table under its
            evaluation heading, else ``xling eval``'s ``metrics.json`` kept with the adapter.
        source: Where the facts were read: ``"model card"`` or ``"config.json"``.
    """

    language: str
    teacher: str
    student: str
    recipe: str | None
    head: str
    widths: str
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    evaluation: list[tuple[str, str]] = field(default_factory=list)
    source: str = "config.json"

    def to_markdown(self) -> str:
        """The facts as a Markdown table, then the evaluation rows (when there are any)."""
        rows = [
            ("language", self.language),
            ("teacher", self.teacher),
            ("student", self.student),
            ("recipe", self.recipe or "not recorded"),
            ("head", self.head),
            ("widths", self.widths),
        ]
        if self.license:
            rows.append(("license", self.license))
        if self.tags:
            rows.append(("tags", ", ".join(self.tags)))
        lines = [f"Read from its {self.source}:", "", "| fact | value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
        if self.evaluation:
            lines += ["", "**Evaluation**", "", "| metric | value |", "|---|---|"]
            lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in self.evaluation]
        return "\n".join(lines)


def _cell(text: object) -> str:
    """``text`` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _display_path(name: str) -> str:
    """A model name as the page shows it: a local folder by its last two parts (the rest says nothing to a
    reader and may be long), a Hub id or ``"toy"`` as is."""
    path = Path(name)
    if path.is_absolute():
        return "/".join(path.parts[-2:])
    return name


def _adapter_name(name: str) -> str:
    """What the page and the console call the adapter ``name``."""
    if Path(name) in (TOY_ADAPTER_DIR, TOY_MMDIT_ADAPTER_DIR):
        return "toy (the committed IAP adapter)"
    return _display_path(name)


def read_adapter_facts(directory: str | os.PathLike[str]) -> AdapterFacts:
    """The facts the page shows about an adapter directory (a ``LanguageEncoder.save_pretrained`` folder).

    The model card's YAML metadata (``language``, ``base_model``, ``license``, ``tags``, ``model-index``) is read
    with ``huggingface_hub.ModelCard`` when ``README.md`` exists; ``config.json`` always gives the student, the
    head and the widths and, without a card, the language and the teacher. The recipe comes from the card's
    tags or ``config.json["recipe"]``, else from the ``run.json`` of the run folder the adapter sits in. The
    evaluation numbers are the card's; without any, those of ``eval.json`` beside the adapter or of the run
    folder's ``metrics.json`` (both written by xling's evaluation).

    Args:
        directory: The adapter directory.

    Raises:
        FileNotFoundError: no ``config.json`` in ``directory``.
        ValueError: ``config.json`` or ``head/config.json`` is not valid JSON, or the card cannot be parsed;
            the message names the file.
    """
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    encoder = config.get("encoder") or {}
    teacher_record = config.get("teacher") or {}
    head_dir = directory / str((config.get("layout") or {}).get("head") or "head")
    head = _read_json(head_dir / "config.json") if (head_dir / "config.json").is_file() else {}
    head_type = str(head.get("head_type", "unknown"))
    if (config.get("layout") or {}).get("student_lora"):
        head_type += " + LoRA student"
    widths = f"student {head.get('student_width', '?')} -> teacher {head.get('teacher_width', '?')}"
    if head.get("pooled_width"):
        widths += f" (pooled {head['pooled_width']})"
    family = teacher_record.get("family") or head.get("teacher_family")
    teacher = _display_path(str(teacher_record.get("name_or_path", TOY)))
    if family:
        teacher += f" ({family})"
    recipe = config.get("recipe") or _run_recipe(directory)
    facts = AdapterFacts(
        language=str(encoder.get("language", head.get("language", "zh"))),
        teacher=teacher,
        student=_display_path(str(encoder.get("student_model", "unknown"))),
        recipe=str(recipe) if recipe else None,
        head=head_type,
        widths=widths,
    )
    card_path = directory / "README.md"
    if card_path.is_file():
        _apply_card(facts, card_path, _recipe_names(), encoder.get("language"))
    if not facts.evaluation:
        facts.evaluation = _metrics_rows(directory)
    return facts


def _read_json(path: Path) -> dict[str, Any]:
    from xling.adapters.io import read_json_object

    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    return read_json_object(path)


def _metrics_rows(directory: Path) -> list[tuple[str, str]]:
    """Evaluation rows from ``xling eval``'s ``metrics.json`` kept beside the adapter (``eval.json``, as the
    committed toy adapter has it) or written by ``xling train`` into the run folder holding it."""
    candidates = [directory / "eval.json"]
    if (directory.parent / "run.json").is_file():
        candidates.append(directory.parent / "metrics.json")
    for path in candidates:
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(metrics, dict) and ("accuracy" in metrics or "alignment" in metrics):
            return _metric_table(metrics)
    return []


def _metric_table(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of an ``EvalResult`` dict (``metrics.json``)."""
    from xling.train.evaluation.report import format_percent

    rows: list[tuple[str, str]] = []
    settings = metrics.get("settings") or {}
    where = ""
    if "scenes" in settings:
        where = f" ({settings['scenes']} scenes x {len(settings.get('seeds') or [0])} seeds)"
    accuracy = metrics.get("accuracy") or {}
    heldout = metrics.get("heldout_accuracy") or {}
    for label, table, key in (
        (f"checker accuracy, student on Chinese{where}", accuracy, "zh_student"),
        ("checker accuracy, student, held-out scenes", heldout, "zh_student"),
        ("checker accuracy, teacher on English", accuracy, "en_teacher"),
    ):
        value = (table.get(key) or {}).get("all")
        if value is not None:
            rows.append((label, format_percent(float(value))))
    alignment = metrics.get("alignment") or {}
    agreement = metrics.get("agreement") or {}
    for label, value in (
        ("attention MSE (sum over layers)", alignment.get("attention_mse")),
        ("mean-token cosine", alignment.get("mean_cosine")),
        ("PSNR student vs teacher (dB)", agreement.get("psnr")),
    ):
        if value is not None:
            rows.append((label, _format_value(float(value))))
    return rows


def _run_recipe(directory: Path) -> str | None:
    """The recipe ``xling train`` wrote into ``run.json`` of the run folder holding ``directory``."""
    run = directory.parent / "run.json"
    try:
        return str(json.loads(run.read_text(encoding="utf-8"))["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recipe_names() -> tuple[str, ...]:
    from xling.train.recipes import RECIPES

    return tuple(RECIPES)


def _apply_card(
    facts: AdapterFacts, path: Path, recipe_names: Sequence[str], prompt_language: str | None
) -> None:
    """Overwrite ``facts`` with what the model card at ``path`` records (``prompt_language``: the language
    ``config.json`` records, which the card's list of languages does not override)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)
    except Exception as err:  # the card parser raises ValueError, yaml errors and more; name the file
        raise ValueError(f"{path} is not a readable model card: {err}") from err
    data = card.data
    facts.source = "model card"
    language = data.language
    if language and not prompt_language:
        # The card lists the student's language and "en" (the teacher's); config.json says which one prompts use.
        facts.language = ", ".join(language) if isinstance(language, list) else str(language)
    base = data.to_dict().get("base_model")
    if base:
        facts.teacher = ", ".join(base) if isinstance(base, list) else str(base)
    if data.license:
        facts.license = str(data.license)
    facts.tags = [str(t) for t in (data.tags or [])]
    if facts.recipe is None:
        facts.recipe = next((t for t in facts.tags if t in recipe_names), None)
    for result in data.eval_results or []:
        name = result.metric_name or result.metric_type
        where = f" ({result.dataset_name})" if result.dataset_name else ""
        facts.evaluation.append((f"{name}{where}", _format_value(result.metric_value)))
    if not facts.evaluation:
        facts.evaluation = _evaluation_table(card.text)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_HEADING = re.compile(r"^(#+)\s*(.*)$")


_VALUE = re.compile(r"^([-+]?[\d.]+(e[-+]?\d+)?%?|n/a|inf|nan)$", re.IGNORECASE)


def _evaluation_table(text: str) -> list[tuple[str, str]]:
    """``(name, value)`` rows of the tables under the card's first heading that mentions "evaluation" (its
    subsections included), as ``xling train`` writes them from ``report.md``.

    A row whose first cell is a label is one entry, its values named by the header (``color 100.0%, shape
    95.8%``; a two-column table gives the value alone); a row of values only (a one-row table of metrics) gives
    one entry per column, named by its header cell.
    """
    rows: list[tuple[str, str]] = []
    inside = False
    level = 0
    table: list[list[str]] = []

    def flush() -> None:
        if len(table) >= 3 and all(c and set(c) <= set("-: ") for c in table[1]):
            header, body = table[0], table[2:]
            for cells in body:
                if _VALUE.match(cells[0]):
                    rows.extend((h, c) for h, c in zip(header, cells, strict=False) if h)
                elif len(cells) == 2:
                    rows.append((cells[0], cells[1]))
                else:
                    named = zip(header[1:], cells[1:], strict=False)
                    rows.append((cells[0], ", ".join(f"{h} {c}".strip() for h, c in named)))
        table.clear()

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            if inside and len(heading.group(1)) <= level:
                break
            if not inside and "evaluation" in heading.group(2).lower():
                inside, level = True, len(heading.group(1))
            continue
        if inside and line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        else:
            flush()
    flush()
    return rows


@dataclass
class DemoModel:
    """The loaded adapter, its teacher's pipeline and what the page needs to draw both sides.

    Attributes:
        encoder: The student (``xling.adapters.LanguageEncoder``), in eval mode.
        pipe: The teacher's diffusers pipeline.
        teacher: The teacher's name (``"toy"``, a folder or a Hub id).
        adapter: The adapter's name as given (a folder or a Hub id).
        facts: What the page says about the adapter.
        resolution: Side of a generated image in pixels.
        factor: Nearest-neighbour upscaling factor of the page's images (:func:`upscale_factor`).
        default_steps: Sampler steps the page starts with (the toy world's, or 30).
        default_guidance: Guidance scale the page starts with (the toy world's, or 7.5).
        examples: ``(prompt, English prompt)`` pairs of the example gallery.
        load_seconds: Time it took to load the adapter and the pipeline.
    """

    encoder: Any
    pipe: Any
    teacher: str
    adapter: str
    facts: AdapterFacts
    resolution: int
    factor: int
    default_steps: int
    default_guidance: float
    examples: list[tuple[str, str]]
    load_seconds: float = 0.0

    @property
    def language(self) -> str:
        """The adapter's prompt language (``"zh"``)."""
        return str(getattr(getattr(self.encoder, "config", None), "language", self.facts.language))

    def check_inputs(
        self, prompt: Any, prompt_en: Any, steps: Any, guidance: Any, seed: Any, num_images: Any
    ) -> tuple[str, str, int, float, int, int]:
        """Validate the page's values (strings and numbers as Gradio sends them; ``None`` for a cleared box).

        Returns:
            ``(prompt, prompt_en, steps, guidance, seed, num_images)``, stripped and typed.

        Raises:
            DemoInputError: a value is empty, not a number, not whole where it must be, or out of range; the
                message names the field, the value and the range.
        """
        prompt = _text(prompt, f"the {language_name(self.language)} prompt")
        prompt_en = _text(prompt_en, "the English prompt")
        steps = _whole(steps, "steps", 1, MAX_STEPS)
        guidance = _number(guidance, "guidance", 0.0, MAX_GUIDANCE)
        seed = _whole(seed, "seed", 0, MAX_SEED)
        num_images = _whole(num_images, "number of images", 1, MAX_IMAGES)
        if seed + num_images - 1 > MAX_SEED:
            raise DemoInputError(
                f"seed {seed} with {num_images} images runs past the largest seed {MAX_SEED}; pick a smaller seed"
            )
        return prompt, prompt_en, steps, guidance, seed, num_images

    def generate(
        self,
        prompt: Any,
        prompt_en: Any,
        steps: Any = None,
        guidance: Any = None,
        seed: Any = 0,
        num_images: Any = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The teacher on ``prompt_en`` and the student on ``prompt``, at seeds ``seed .. seed + N - 1``.

        Args:
            prompt: The prompt in the adapter's language.
            prompt_en: Its English counterpart.
            steps: Sampler steps (``None``: :attr:`default_steps`).
            guidance: Classifier-free guidance scale (``None``: :attr:`default_guidance`).
            seed: The first seed; image ``i`` of both sides starts from the noise of seed ``seed + i``.
            num_images: ``N`` images per side.

        Returns:
            ``(teacher, student)`` strips, each ``[H * f, N * W * f, 3]`` uint8 (:func:`strip` of the upscaled
            images, ``f`` = :attr:`factor`).

        Raises:
            DemoInputError: see :meth:`check_inputs`.
        """
        from xling.train.evaluation.sampling import sample, student_conditioning, teacher_conditioning

        steps = self.default_steps if steps is None else steps
        guidance = self.default_guidance if guidance is None else guidance
        prompt, prompt_en, steps, guidance, seed, n = self.check_inputs(
            prompt, prompt_en, steps, guidance, seed, num_images
        )
        seeds = [seed + i for i in range(n)]
        rows = [0] * n
        sampler = dict(num_inference_steps=steps, guidance_scale=guidance, rows=rows)
        t_cond, t_uncond = teacher_conditioning(self.pipe, [prompt_en])
        s_cond, s_uncond = student_conditioning(self.encoder, [prompt])
        teacher = sample(self.pipe, t_cond, t_uncond, seeds, **sampler).images  # [N, H, W, 3]
        student = sample(self.pipe, s_cond, s_uncond, seeds, **sampler).images
        return strip(upscale(teacher, self.factor)), strip(upscale(student, self.factor))


def _text(value: Any, name: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise DemoInputError(f"{name} is empty; type a prompt or click an example")
    return text


def _bound(x: float) -> str:
    """``4294967295`` and ``0``, not ``4.29497e+09``; ``0.5`` as is."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(value: Any, name: str, low: float, high: float) -> float:
    span = f"from {_bound(low)} to {_bound(high)}"
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise DemoInputError(f"{name} is empty; give a number {span}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number {span}, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise DemoInputError(f"{name} must be {span}, got {value!r}")
    return number


def _whole(value: Any, name: str, low: int, high: int) -> int:
    number = _number(value, name, low, high)
    if number != int(number):
        raise DemoInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def resolve_adapter(
    adapter: str | os.PathLike[str] | None, teacher: str | os.PathLike[str] | None = None
) -> str:
    """The adapter to load: ``None`` or ``"toy"`` -> the committed toy adapter of ``teacher`` (the toy MMDiT
    one's for ``"toy-mmdit"``, else the UNet one's); a folder or Hub id as is.

    Raises:
        FileNotFoundError: the toy adapter was asked for and is missing from the installed package.
    """
    if adapter is None or os.fspath(adapter) == TOY_ADAPTER:
        mmdit = teacher is not None and os.fspath(teacher) == TOY_MMDIT
        directory = TOY_MMDIT_ADAPTER_DIR if mmdit else TOY_ADAPTER_DIR
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"the committed toy adapter is missing at {directory}; write it with "
                f"scripts/train_toy_adapter.py{' --teacher toy-mmdit' if mmdit else ''}, or pass --adapter "
                "with a trained adapter folder"
            )
        return str(directory)
    return os.fspath(adapter)


def example_pairs(language: str, limit: int = NUM_EXAMPLES) -> list[tuple[str, str]]:
    """``(prompt, English prompt)`` pairs for the example gallery: the toy grammar's held-out scenes (plain
    scene descriptions any SD model can draw) in the adapter's language, taking turns between the languages of
    a multilingual adapter; none for a language the toy grammars do not write."""
    from xling.train.evaluation.toy import heldout_caption_pairs
    from xling.train.toyworld.world import parse_languages

    try:
        codes = parse_languages(language)
    except ValueError:
        return []
    by_language = {code: heldout_caption_pairs(limit, language=code) for code in codes}
    return [
        (by_language[codes[i % len(codes)]][1][i], by_language[codes[i % len(codes)]][0][i])
        for i in range(len(by_language[codes[0]][0]))
    ]


def load_demo(
    adapter: str | os.PathLike[str] | None = None,
    teacher: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    student_path: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> DemoModel:
    """Load what the page runs: the adapter, its teacher's pipeline, the facts and the examples.

    Args:
        adapter: An adapter folder or Hub id; ``None`` or ``"toy"``: the committed toy adapter (of the toy
            MMDiT teacher for ``teacher="toy-mmdit"``).
        teacher: ``"toy"``, ``"toy-mmdit"``, a diffusers folder or Hub id; ``None``: the teacher the adapter
            records.
        device: Torch device of the student and the pipeline.
        student_path: Where the adapter's base student lives now, when it moved (frozen and LoRA adapters).
        variant: Teacher weight-file variant (``"fp16"``).

    Raises:
        FileNotFoundError: no adapter there (or a run folder instead of its ``adapter/``).
        xling.adapters.WidthMismatchError: the adapter does not fit the teacher (a ``ValueError``).
    """
    from xling.train.evaluation.runs import load_adapter
    from xling.train.evaluation.sampling import (
        check_fits,
        load_pipeline,
        native_resolution,
        sampler_defaults,
    )

    start = time.perf_counter()
    name = resolve_adapter(adapter, teacher)
    encoder, teacher_name = load_adapter(name, teacher, student_path=student_path, device=device)
    pipe = load_pipeline(teacher_name, device=device, variant=variant)
    check_fits(encoder, pipe, teacher_name)
    # A Hub id resolves to a downloaded folder; the encoder knows which.
    source = getattr(encoder, "source", None) or name
    facts = read_adapter_facts(source)
    resolution = native_resolution(pipe)[0]
    steps, guidance = sampler_defaults(teacher_name, None, None)
    language = str(getattr(encoder.config, "language", facts.language))
    return DemoModel(
        encoder=encoder,
        pipe=pipe,
        teacher=teacher_name,
        adapter=name,
        facts=facts,
        resolution=resolution,
        factor=upscale_factor(resolution),
        default_steps=steps,
        default_guidance=guidance,
        examples=example_pairs(language),
        load_seconds=time.perf_counter() - start,
    )


def generate_callback(model: DemoModel) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The function behind the Generate button: :meth:`DemoModel.generate`, with bad input raised as a
    ``gr.Error`` (shown on the page as a message, not a traceback)."""
    import gradio as gr

    def on_generate(
        prompt: str, prompt_en: str, steps: float, guidance: float, seed: float, num_images: float
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            # Checked before generate() fills in defaults: on the page, a cleared box is a mistake.
            checked = model.check_inputs(prompt, prompt_en, steps, guidance, seed, num_images)
            return model.generate(*checked)
        except DemoInputError as err:
            raise gr.Error(str(err), title="Check the inputs") from None

    return on_generate


def build_app(model: DemoModel) -> gr.Blocks:
    """The page: both prompts, the sampler inputs, Generate, the two image columns, examples and facts.

    Args:
        model: What :func:`load_demo` returns.

    Returns:
        A ``gr.Blocks``, not launched (see :func:`launch`).
    """
    _quiet_gradio_env()
    import gradio as gr

    language = language_name(model.language)
    first = model.examples[0] if model.examples else ("", "")
    side = model.resolution * model.factor
    with gr.Blocks(title="xling demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"# xling demo\nThe frozen English teacher draws the English prompt (left); the same teacher, "
            f"conditioned by the {language} student, draws the {language} prompt (right). Both sides start "
            f"from the same noise (seeds `seed`, `seed + 1`, ...), so any difference is the student's. "
            f"Images are {model.resolution} px, shown {model.factor}x (nearest neighbour)."
        )
        with gr.Row():
            prompt = gr.Textbox(
                value=first[0], label=f"{language} prompt (student)", elem_id=ELEM_IDS["prompt"]
            )
            prompt_en = gr.Textbox(
                value=first[1], label="English prompt (teacher)", elem_id=ELEM_IDS["prompt_en"]
            )
        with gr.Row():
            steps = gr.Slider(
                1, MAX_STEPS, value=model.default_steps, step=1, label="steps", elem_id=ELEM_IDS["steps"]
            )
            guidance = gr.Slider(
                0.0,
                MAX_GUIDANCE,
                value=model.default_guidance,
                step=0.5,
                label="guidance",
                elem_id=ELEM_IDS["guidance"],
            )
            seed = gr.Number(
                value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id=ELEM_IDS["seed"]
            )
            num_images = gr.Slider(
                1, MAX_IMAGES, value=2, step=1, label="images", elem_id=ELEM_IDS["num_images"]
            )
        button = gr.Button("Generate", variant="primary", elem_id=ELEM_IDS["generate"])
        with gr.Row(equal_height=True):
            # PNG, not Gradio's default WebP: lossy compression would blur the pixels the toy checker reads.
            teacher_image = gr.Image(
                label="teacher on the English prompt",
                format="png",
                type="numpy",
                interactive=False,
                height=side + 60,
                buttons=["download", "fullscreen"],
                elem_id=ELEM_IDS["teacher_image"],
            )
            student_image = gr.Image(
                label=f"student on the {language} prompt",
                format="png",
                type="numpy",
                interactive=False,
                height=side + 60,
                buttons=["download", "fullscreen"],
                elem_id=ELEM_IDS["student_image"],
            )
        with gr.Row():
            if model.examples:
                with gr.Column(scale=3):
                    gr.Examples(
                        examples=[list(pair) for pair in model.examples],
                        inputs=[prompt, prompt_en],
                        label="Examples: held-out scenes of the toy grammar (click one to fill both prompts)",
                        examples_per_page=NUM_EXAMPLES,
                        elem_id=ELEM_IDS["examples"],
                        cache_examples=False,
                    )
            with gr.Column(scale=2):
                gr.Markdown(
                    f"### Adapter: {_adapter_name(model.adapter)}\n\n{model.facts.to_markdown()}",
                    elem_id=ELEM_IDS["facts"],
                )
        button.click(
            generate_callback(model),
            inputs=[prompt, prompt_en, steps, guidance, seed, num_images],
            outputs=[teacher_image, student_image],
            api_name="generate",
        )
    return app


def _quiet_gradio_env() -> None:
    """Gradio reads these when imported and when it launches: no analytics, no version check (both reach the
    network), no share link, no Node server-side rendering."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SHARE", "False")
    os.environ.setdefault("GRADIO_SSR_MODE", "False")


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start serving ``app`` in the background (the call returns once the page answers).

    Args:
        app: What :func:`build_app` returns.
        host: Address to bind; ``127.0.0.1`` keeps the page on this machine.
        port: Port to bind (``None``: the first free one from 7860).

    Returns:
        The page's URL. Stop it with ``app.close()``.

    Raises:
        OSError: the port is taken (the message names it).
    """
    _quiet_gradio_env()
    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            share=False,
            inbrowser=False,
            quiet=True,
            show_error=True,
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            footer_links=[],
            run_history=False,
        )
    except OSError as err:
        raise OSError(f"cannot serve the demo on {host}:{port}: {err}") from err
    return str(url)


def serve(
    adapter: str | os.PathLike[str] | None = None,
    teacher: str | os.PathLike[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "cpu",
    student_path: str | os.PathLike[str] | None = None,
    variant: str | None = None,
    threads: int | None = None,
    print_fn: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Load, build and launch the page, print its URL, then serve until Ctrl-C (what ``xling demo`` runs).

    Args:
        adapter: See :func:`load_demo`.
        teacher: See :func:`load_demo`.
        host: Address to bind.
        port: Port to bind (``None``: the first free one from 7860).
        device: Torch device.
        student_path: See :func:`load_demo`.
        variant: See :func:`load_demo`.
        threads: Torch CPU threads while serving (``None``: 1 for the toy teacher on CPU, whose tensors are so
            small that more threads only add synchronisation, 20x slower on a busy two-core machine; else
            torch's default). The previous setting is restored when the server stops.
        print_fn: Where xling's lines go (the URL among them).
        stop: Serve until this event is set (as well as until Ctrl-C); for a caller running it in a thread.

    Returns:
        0 once the server has been stopped.
    """
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    print_fn("xling demo: loading the adapter and the teacher ...")
    model = load_demo(adapter, teacher, device=device, student_path=student_path, variant=variant)
    if threads is None and is_toy_teacher(model.teacher) and torch.device(device).type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        app = build_app(model)
        url = launch(app, host=host, port=port)
    except BaseException:
        torch.set_num_threads(previous_threads)
        raise
    print_fn(
        f"xling demo: adapter {_adapter_name(model.adapter)}, teacher {model.teacher}; "
        f"ready in {time.perf_counter() - start:.1f} s"
    )
    print_fn(f"xling demo: open {url} (Ctrl-C stops it)")
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        print_fn("xling demo: stopped")
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # Gradio's own "Closing server ..." line
            app.close()
        torch.set_num_threads(previous_threads)
    return 0
