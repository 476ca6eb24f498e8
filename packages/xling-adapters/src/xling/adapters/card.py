"""The model card of an adapter folder: ``README.md`` with the Hub's YAML metadata and a body saying what it is.

:func:`write_model_card` reads what the folder records about itself (``config.json``: teacher, student, language,
window; ``head/config.json``: head type and widths) and adds the :class:`ModelCardFacts` a training run knows
(recipe, config, evaluation, grid image). The metadata is built with ``huggingface_hub.ModelCardData``, so the Hub
shows it and ``huggingface_hub.ModelCard.load(folder / "README.md")`` reads it back:

``language``        the student's language and ``"en"`` (the teacher's)
``base_model``      the teacher, only when it is a Hub id (the toy teacher and local folders are not)
``library_name``    ``"xling"``
``tags``            ``xling``, ``text-to-image``, ``diffusers``, the recipe, the head type
``license``         given, or ``"apache-2.0"`` for the toy teacher and ``"other"`` otherwise (the body then says
                    that the teacher's license applies)
``pipeline_tag``    ``"text-to-image"``
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The card's file name in an adapter folder (the Hub shows this file as the repo's model card).
CARD_NAME = "README.md"
#: The grid image's file name in an adapter folder (the card links to it by this relative name).
GRID_NAME = "grid.png"
#: How the teacher of the toy world is recorded (``xling.train``'s name for it; adapters cannot import it).
TOY_TEACHER = "toy"
#: A prompt per language for the card's usage snippet (a scene the toy world can draw, too).
EXAMPLE_PROMPTS = {
    "zh": "左边的红色圆形",
    "ja": "左側の赤い円",
    "ko": "왼쪽의 빨간 원",
    "de": "ein roter Kreis links",
    "fr": "un cercle rouge à gauche",
    "es": "un círculo rojo a la izquierda",
    "ar": "دائرة حمراء على اليسار",
}


@dataclass
class ModelCardFacts:
    """What a training run knows about an adapter beyond its folder's ``config.json``; the card shows it.

    Attributes:
        recipe: the recipe that trained the adapter (``"iap"``, ``"pea"``, ...); ``None``: unknown (no
            training section, no recipe tag).
        config: the recipe's resolved config (``config.yaml`` of the run), written as a YAML block; ``None``:
            not shown.
        evaluation: Markdown of the run's evaluation (the tables of its ``report.md``); ``None``: the card says
            the adapter was not evaluated.
        grid: the run's image grid (English vs target language at the same seeds); copied into the folder as
            ``grid.png`` so the card shows it on the Hub. ``None``: a ``grid.png`` already in the folder is used.
        license: the card's ``license``; ``None``: ``"apache-2.0"`` for the toy teacher, ``"other"`` otherwise.
        repo_id: the Hub repo the adapter is pushed to, for the usage snippet; ``None``: a placeholder.
        prompt: a prompt in the adapter's language for the usage snippet; ``None``: :data:`EXAMPLE_PROMPTS`.
    """

    recipe: str | None = None
    config: Mapping[str, Any] | None = None
    evaluation: str | None = None
    grid: str | os.PathLike[str] | None = None
    license: str | None = None
    repo_id: str | None = None
    prompt: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    from xling.adapters.io import read_json_object

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} at {path}: not an adapter folder written by save_pretrained")
    return read_json_object(path)


def teacher_is_hub_id(teacher: str | None) -> bool:
    """Whether the recorded teacher is a Hub repo id (``base_model``), not the toy teacher or a local folder."""
    from xling.adapters.encoder import looks_like_local_path

    return bool(teacher) and teacher != TOY_TEACHER and not looks_like_local_path(str(teacher))


def default_license(teacher: str | None) -> str:
    """``"apache-2.0"`` for the toy teacher (xling's own), ``"other"`` for any other (its license applies)."""
    return "apache-2.0" if teacher == TOY_TEACHER else "other"


def _teacher_name(teacher: str | None) -> str:
    """How the card names the teacher: the toy teacher, a Hub id, or a local folder by its name only."""
    if not teacher:
        return "an English text-to-image model (not recorded)"
    if teacher == TOY_TEACHER:
        return "`toy` (the toy world's teacher)"
    return _local_name(str(teacher))


def _local_name(name: str) -> str:
    """``name`` in backticks when it is a Hub id; a local folder by its last part only (its path on the machine
    that saved the adapter means nothing elsewhere, and is none of the reader's business)."""
    from xling.adapters.encoder import looks_like_local_path

    if not looks_like_local_path(name):
        return f"`{name}`"
    return f"`{Path(name).name}` (a local folder)"


def _teacher_snippet(teacher: str | None) -> tuple[str, str]:
    """``(import lines, pipeline expression)`` that load the teacher in the usage snippet."""
    if teacher == TOY_TEACHER:
        return (
            "from xling.train.toyworld import teacher_path  # the toy world's teacher (pip install xling-train)\n",
            "DiffusionPipeline.from_pretrained(teacher_path())",
        )
    if teacher_is_hub_id(teacher):
        return "", f'DiffusionPipeline.from_pretrained("{teacher}")'
    name = Path(str(teacher)).name if teacher else "teacher"
    # A local folder of the machine that saved the adapter means nothing elsewhere: only its name is shown.
    return "", f'DiffusionPipeline.from_pretrained("path/to/{name}")  # the teacher\'s diffusers folder'


def _config_yaml(config: Mapping[str, Any]) -> str:
    import yaml  # a dependency of huggingface_hub

    return yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True).rstrip()


def card_text(directory: str | os.PathLike[str], facts: ModelCardFacts | None = None) -> str:
    """The card :func:`write_model_card` writes for ``directory`` (metadata block and body), as a string.

    Raises:
        FileNotFoundError: ``directory`` has no ``config.json`` or no head config.
        ValueError: either is not valid JSON.
    """
    from huggingface_hub import ModelCard, ModelCardData

    directory = Path(directory)
    facts = facts or ModelCardFacts()
    payload = _read_json(directory / "config.json")
    encoder = payload.get("encoder") or {}
    layout = payload.get("layout") or {}
    head = _read_json(directory / (layout.get("head") or "head") / "config.json")
    teacher_record = payload.get("teacher") or {}
    teacher = teacher_record.get("name_or_path")
    language = encoder.get("language") or head.get("language") or "zh"
    head_type = str(head.get("head_type", "head"))
    license_ = facts.license or default_license(teacher)

    tags = ["xling", "text-to-image", "diffusers"]
    tags += [t for t in (facts.recipe, head_type) if t and t not in tags]
    data = ModelCardData(
        # A multilingual adapter records its languages comma-separated; the card lists each (the Hub's form).
        language=[*dict.fromkeys([*(c.strip() for c in language.split(",")), "en"])],
        base_model=str(teacher) if teacher_is_hub_id(teacher) else None,
        library_name="xling",
        tags=tags,
        license=license_,
        pipeline_tag="text-to-image",
    )

    teacher_name = _teacher_name(teacher)
    family = teacher_record.get("family") or head.get("teacher_family")
    student_model = str(encoder.get("student_model", "?"))
    student = _local_name(student_model)
    weights = encoder.get("student_weights", "frozen")
    held = [k for k in ("student", "student_lora", "student_merged") if layout.get(k)]
    student_line = {
        "frozen": "frozen (its own weights unchanged)",
        "lora": "LoRA heads trained on it (`student_lora/`, merged copy in `student_merged/`)",
        "unfrozen": "trained (its weights are in `student/`)",
    }.get(weights, weights)
    if weights == "frozen" and not held:
        student_line += (
            "; not included: loading reads it from its folder (pass student_path= where it lies)"
            if "(a local folder)" in student
            else "; not included: loading downloads it"
        )
    pooled = head.get("pooled_width")
    widths = f"student width {head.get('student_width')} -> teacher width {head.get('teacher_width')}" + (
        f", pooled width {pooled}" if pooled else ""
    )
    lines = [
        f"# xling adapter: `{language}` prompts for {teacher_name}",
        "",
        f"An xling adapter: a student text path (a `{language}` "
        f"text encoder and a `{head_type}` head) that turns prompts in `{language}` into the `prompt_embeds` of "
        f"the frozen English text-to-image model {teacher_name}. The teacher's denoiser, VAE and text encoders "
        "are not changed, so its LoRAs, ControlNets and schedulers keep working with the new language.",
        "",
        "## Model",
        "",
        "| part | |",
        "|---|---|",
        f"| teacher | {teacher_name}" + (f"; family `{family}`" if family else "") + " |",
        f"| student | {student}: {student_line} |",
        f"| head | `{head_type}`: {widths} |",
        f"| language | `{language}`, windows of {encoder.get('max_length', '?')} tokens |",
        "",
    ]
    if facts.recipe or facts.config:
        lines += ["## Training", ""]
        if facts.recipe:
            lines += [f"Recipe `{facts.recipe}` (`xling train {facts.recipe}`).", ""]
        if facts.config:
            lines += ["Config:", "", "```yaml", _config_yaml(facts.config), "```", ""]
    lines += ["## Evaluation", ""]
    lines += [facts.evaluation.strip(), ""] if facts.evaluation else ["Not evaluated.", ""]
    if facts.grid is not None or (directory / GRID_NAME).is_file():
        lines += [f"![English (top) vs {language} (bottom) at the same seeds]({GRID_NAME})", ""]
    imports, pipe = _teacher_snippet(teacher)
    repo = facts.repo_id or "<org>/<name>"
    first = language.split(",")[0].strip()
    prompt = facts.prompt or EXAMPLE_PROMPTS.get(first, f"<a prompt in {first}>")
    lines += [
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "from xling.adapters import attach  # pip install xling-adapters[diffusers]",
        imports.rstrip("\n"),
        "",
        f"pipe = {pipe}",
        f'pipe = attach(pipe, "{repo}")  # downloads and checks the adapter; widths checked against the UNet',
        f'image = pipe(prompt="{prompt}").images[0]',
        "```",
        "",
        "## License",
        "",
        f"`{license_}`."
        + (
            ""
            if teacher == TOY_TEACHER
            else " The adapter conditions the teacher model, so the teacher's own license applies to its use "
            "and to the images it generates."
        ),
        "",
    ]
    body = "\n".join(lines)
    while "\n\n\n" in body:  # an empty import line of the snippet, or an empty optional part
        body = body.replace("\n\n\n", "\n\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def write_model_card(directory: str | os.PathLike[str], facts: ModelCardFacts | None = None) -> Path:
    """Write (or rewrite) ``directory/README.md``, the adapter's Hub model card.

    The grid image of ``facts`` is copied into the folder as ``grid.png`` first, so the card's relative image
    link works on the Hub and in the folder alike.

    Args:
        directory: an adapter folder written by ``LanguageEncoder.save_pretrained``.
        facts: what the run knows (recipe, config, evaluation, grid, license, repo id); ``None``: the card says
            only what the folder records.

    Returns:
        The card's path.

    Raises:
        FileNotFoundError: not an adapter folder, or the grid image of ``facts`` is not there.
        ValueError: the folder's configs are not valid JSON.
    """
    directory = Path(directory)
    if facts is not None and facts.grid is not None:
        grid = Path(facts.grid)
        if not grid.is_file():
            raise FileNotFoundError(f"the grid image {grid} of the model card does not exist")
        target = directory / GRID_NAME
        if grid.resolve() != target.resolve():
            shutil.copyfile(grid, target)
    text = card_text(directory, facts)
    path = directory / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path
