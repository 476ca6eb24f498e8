"""The config machinery every recipe shares: the base dataclass, the data and eval sections, loading, overrides.

Each recipe module defines its own config dataclass (``xling.train.recipes.iap.IAPConfig``, ...) on top of
:class:`RecipeConfig`; the dataclass is the one home of every default and of every option's help text
(``metadata["help"]``, what ``xling train <recipe> --help`` prints). Choices are ``Literal[...]`` annotations,
from which validation reads the allowed values.

A shipped YAML (``configs/<recipe>.yaml``) holds only what differs from the dataclass: the paper's values, each
with its source, and a ``toy:`` section with the toy world's step counts and learning rates, applied when
``teacher`` is ``toy`` to every key the caller did not set.

Override scheme (one, everywhere): ``--key VALUE`` with dotted keys for the sections, e.g.
``--lr 1e-4 --data.path pairs.jsonl --eval.enabled false``. Values are parsed as YAML scalars
(``1e-4`` -> float, ``true`` -> bool, ``[0, 1]`` -> list, ``null`` -> None) and then checked against the
field's type. Programmatic callers pass the same dotted keys in a mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from xling.train.toyworld.names import TOY, is_toy_teacher

#: Directory holding one YAML per recipe (also reachable through the repository's root ``configs`` symlink).
CONFIG_DIR = Path(__file__).parent / "configs"

#: YAML section with the toy world's values (step counts, batch size, lr), applied when ``teacher == "toy"`` to
#: the keys the caller did not set; the top level holds the paper's values for real models.
TOY_SECTION = "toy"


def option(default: Any, help: str) -> Any:
    """A dataclass field with an immutable default and its help text (peft style)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where the parallel captions (and images) come from."""

    # None (not given) rather than 'toy' by default: a real teacher left without --data would otherwise train on
    # the toy world's captions without a word; `validate` turns None into 'toy' for the toy teacher only.
    path: str | None = option(
        None,
        "'toy' (generated toy-world pairs) or a JSONL/CSV/TSV/Parquet file or WebDataset shards "
        "(None: 'toy' with the toy teacher; a real teacher needs --data PATH).",
    )
    en_column: str = option("en", "Column holding the English caption.")
    zh_column: str = option("zh", "Column holding the target-language caption.")
    image_column: str = option("image", "Column holding the image path (image recipes only).")
    culture_column: str = option("culture", "Column flagging culture-only rows (pea --hybrid).")
    on_bad_row: Literal["skip", "fail"] = option(
        "skip",
        "'skip' (counted and reported) or 'fail' on a malformed row, unreadable image or empty caption.",
    )
    num_samples: int = option(512, "Toy world only: number of generated training pairs.")
    pair_fraction: float = option(
        0.0,
        "Toy world only: share of the generated rows that are two-object scenes ('a red circle left of ...').",
    )
    val_samples: int = option(16, "Rows held out for validation (toy world: held-out combinations).")
    num_workers: int = option(0, "DataLoader worker processes.")
    resolution: int | None = option(
        None,
        "Image side the corpus's images are resized and cropped to (None: the teacher's resolution; "
        "image recipes, files).",
    )
    crop: Literal["center", "random"] = option(
        "center",
        "'center' or 'random' crop of each resized image (random: seeded per row, so latents stay cacheable).",
    )
    min_image_size: int | None = option(
        None,
        "Shortest image side in pixels a row may have; a smaller image is a counted 'image_too_small' skip, "
        "not upscaled (None: an eighth of the resolution; 0: no minimum).",
    )
    latent_cache: str | None = option(
        None, "Folder of a VAE latent cache, built on first use (image recipes, files)."
    )
    embedding_cache: str | None = option(
        None, "Folder of a teacher-embedding cache, built on first use (files)."
    )


@dataclass
class EvalConfig:
    """The end-of-run evaluation (toy world: Markdown report + PNG grid)."""

    enabled: bool = option(True, "Write the report and the PNG grid at the end of training.")
    num_prompts: int = option(8, "Prompts in the PNG grid.")
    seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "Sampling seeds for the report and the grid."}
    )
    num_inference_steps: int = option(20, "Sampler steps for the report images.")
    guidance_scale: float = option(3.0, "Classifier-free guidance scale for the report images.")
    max_scenes: int | None = option(
        None, "Toy world: evaluate a fixed subset of this many scenes (None: all)."
    )
    scene_kind: Literal["single", "pair", "both"] = option(
        "single",
        "Toy world: score single-object scenes, a fixed set of two-object ones, or both (every language the "
        "adapter reads is scored, code-switched prompts too for a multilingual one).",
    )
    max_pair_scenes: int = option(
        48, "Toy world: two-object scenes scored (a fixed set) when scene_kind has pairs."
    )


@dataclass
class RecipeConfig:
    """Fields every recipe shares: models, loop, optimizer, logging, checkpoints."""

    recipe: str = option("", "Recipe name (set from the recipe that loads the config).")
    teacher: str = option(
        TOY,
        "Teacher diffusers directory or Hub id ('toy': the committed toy UNet teacher; 'toy-mmdit': the "
        "committed toy SD3-family MMDiT teacher).",
    )
    student: str = option(
        TOY,
        "Student encoder directory or Hub id ('toy': the MLM-pretrained Chinese toy student; 'toy-random', "
        "'toy-aligned'; 'toy-multilingual' and 'toy-multilingual-aligned': one student for every toy language).",
    )
    language: str = option(
        "zh",
        "Language code of the student's prompts, recorded in the adapter. On the toy world it picks the captions: "
        "'zh', 'ja', 'ko', 'es', 'ar', 'mixed' (code-switched), comma-separated codes for one adapter on a "
        "mixed-language corpus ('zh,ja'), or 'all' (every target language).",
    )
    student_max_length: int = option(
        77,
        "Tokens per student window, special tokens included (capped by the student's own limit; PEA's "
        "Chinese-CLIP student reads 52).",
    )
    variant: str | None = option(
        None,
        "Weights variant of the teacher's files ('fp16' loads *.fp16.safetensors; None: the default weights).",
    )
    output_dir: str = option(
        "", "Run directory: checkpoints/, logs/, adapter/, config.yaml, report (empty: runs/<recipe>)."
    )
    seed: int = option(0, "Seed of the data order, the noise and the initialisation.")
    max_steps: int = option(20000, "Optimizer updates to run.")
    batch_size: int = option(
        8, "Rows per process per micro-batch (global batch = batch_size * processes * accumulation)."
    )
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer update.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option(
        "no", "'no', 'fp16' or 'bf16': frozen modules run in this dtype, trainable ones stay fp32."
    )
    gradient_checkpointing: bool = option(
        False,
        "Recompute the student encoder's layer activations in the backward instead of keeping them (transformers' "
        "gradient checkpointing, non-reentrant): less activation memory for a student whose weights train "
        "(unfrozen or LoRA) at about one more student forward per step; a frozen student has nothing to save "
        "(logged, ignored). docs/scale.md.",
    )
    lr: float = option(1e-4, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    lr_scheduler: Literal["cosine", "constant", "linear", "polynomial", "step"] = option(
        "cosine",
        "'cosine', 'constant' or 'linear' (all after warmup), or 'polynomial': transformers' "
        "get_polynomial_decay_schedule_with_warmup (its own warmup from 0, then lr_end + (lr - lr_end) * "
        "(1 - progress) ** lr_power), the schedule PEA-Diffusion trains with; or 'step': the run cut into "
        "lr_decay_stages equal stages, stage k at lr * lr_decay_gamma ** k (GlueGen's StepLR over its epochs).",
    )
    lr_power: float = option(1.0, "Power of the 'polynomial' decay (transformers' default 1.0).")
    lr_end: float = option(0.0, "Learning rate the 'polynomial' decay ends at, at max_steps.")
    lr_decay_stages: int = option(4, "Stages of the 'step' schedule (GlueGen: its 4 epochs).")
    lr_decay_gamma: float = option(0.5, "Factor of the 'step' schedule at each new stage (GlueGen: 0.5).")
    warmup_steps: int = option(500, "Linear warmup steps.")
    log_with: Literal["tensorboard", "wandb", "none"] = option(
        "tensorboard", "'tensorboard', 'wandb' or 'none'."
    )
    log_every: int = option(10, "Log every loss term every N updates.")
    validate_every: int = option(1000, "Validation loss every N updates (0: only at the end).")
    checkpoint_every: int = option(1000, "Write a checkpoint every N updates (0: never).")
    keep_checkpoints: int = option(2, "Keep the last K checkpoints.")
    resume: str | None = option(
        None,
        "'latest' or a checkpoint directory to continue from; it may change only max_steps, log_every, log_with, "
        "validate_every, checkpoint_every, keep_checkpoints, data.num_workers, gradient_checkpointing and eval.* (other "
        "keys: an error).",
    )
    overwrite: bool = option(
        False,
        "Start over in a used output_dir: remove the previous run's checkpoints, adapter, logs and report first "
        "(with --resume: only take over a lock left on another host).",
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data section."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation section."})


@dataclass
class NoisedImagesConfig:
    """Options of the recipes that run the denoiser on noised images conditioned by the student (IAP, PEA,
    denoise)."""

    timestep_min: int = option(0, "Smallest training timestep sampled.")
    time_ids: Literal["square", "image"] = option(
        "square",
        "SDXL added time ids: 'square' (R, R, 0, 0, R, R) for every row, or each row's 'image' size before the "
        "resize and its crop corner (diffusers' and PEA's SDXL scripts).",
    )
    latents: Literal["mode", "sample"] = option(
        "mode",
        "Clean latents: the VAE posterior's 'mode' (deterministic; what the latent cache stores) or a 'sample' "
        "of it, one seeded generator per row (PEA's and diffusers' training scripts).",
    )
    timestep_max: int | None = option(None, "Largest training timestep sampled (None: the scheduler's last).")
    # The diffusers pipelines take `prompt_embeds` without a mask, so generation attends to every student
    # position. Training unmasked would match that, yet scored lower in the toy world (IAP 87.5% vs 95.8%,
    # PEA 8.3% vs 12.5% all-correct), so masking stays the default.
    student_padding_mask: bool = option(
        True,
        "Hide the student's padding tokens from the denoiser's cross-attention in training (false trains as "
        "the pipelines generate, unmasked; docs/toyworld.md).",
    )


C = TypeVar("C", bound=RecipeConfig)


def config_class(recipe: str) -> type[RecipeConfig]:
    """The config dataclass of ``recipe`` (defined in its recipe module)."""
    from xling.train.recipes import get_recipe

    return get_recipe(recipe).config_class


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield ``(dotted_key, field, type)`` for every leaf option of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else ``None``."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and, for strings from the command line, parse) ``value`` against the annotation ``tp``."""
    allowed = choices(tp)
    if allowed is not None:
        if value not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {value!r}")
        return value
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            value = [value]
        (item,) = typing.get_args(tp)
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config key {key!r} expects a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise TypeError(f"config key {key!r} expects an int, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; Python reads it as the float everyone means.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"config key {key!r} expects a float, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        # YAML may read a path like 123 as a number; a string field keeps its text.
        return str(value)
    return value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"path": p}}`` -> ``{"data.path": p}``."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    """Nested plain-Python view of a config (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def flat_dict(config: RecipeConfig) -> dict[str, Any]:
    """``{"lr": 5e-05, "data.path": "toy", ...}``: the dotted view used for trackers and ``--help``."""
    return flatten(to_dict(config))


def close_keys(key: str, keys: Iterable[str], n: int = 3) -> list[str]:
    """The dotted keys of ``keys`` closest to the misspelt ``key``, best first (``[]``: none is close).

    Whole keys are compared first (``max_step`` -> ``max_steps``, ``data.zh_colum`` -> ``data.zh_column``);
    when none is close, the last parts are, so a key typed without its section (``zh_column``) still finds
    ``data.zh_column``. Only the keys about as close as the best one are kept (within 0.05 of its
    :class:`difflib.SequenceMatcher` ratio): a typo has one answer, not every key that shares a suffix.

    Args:
        key: the unknown key, dotted.
        keys: the valid dotted keys.
        n: at most this many suggestions.
    """

    def best(word: str, candidates: list[str]) -> list[str]:
        found = difflib.get_close_matches(word, candidates, n=n)
        if not found:
            return []
        top = difflib.SequenceMatcher(None, word, found[0]).ratio()
        return [c for c in found if difflib.SequenceMatcher(None, word, c).ratio() >= top - 0.05]

    keys = sorted(keys)
    found = best(key, keys)
    if found:
        return found
    by_name: dict[str, list[str]] = {}
    for k in keys:
        by_name.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return [k for name in best(key.rsplit(".", 1)[-1], list(by_name)) for k in by_name[name]][:n]


def set_key(config: RecipeConfig, key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``config`` in place, parsing and checking ``value`` against its type.

    Raises:
        ValueError: ``key`` is not a key of the recipe's config: the message names the closest keys first
            (``did you mean 'max_steps'?``), then every valid key.
    """
    leaves = {k: tp for k, _, tp in iter_fields(type(config))}
    if key == "data" and isinstance(value, str):
        key = "data.path"  # `--data PATH` is the short form of `--data.path PATH`.
    if key not in leaves:
        close = close_keys(key, leaves)
        hint = f"did you mean {' or '.join(repr(k) for k in close)}? Valid keys" if close else "valid keys"
        raise ValueError(
            f"unknown config key {key!r} for recipe {config.recipe!r}; {hint}: {', '.join(sorted(leaves))}"
        )
    *parents, name = key.split(".")
    target: Any = config
    for p in parents:
        target = getattr(target, p)
    setattr(target, name, _coerce(key, value, leaves[key]))


def override_items(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[str, Any]]:
    """``(dotted_key, value)`` pairs of ``{"lr": 1e-4, "data": {"path": ...}}`` or ``["--lr", "1e-4", "k=v"]``."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(flatten(overrides).items())
    items, tokens, i = [], list(overrides), 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(tokens):
                    raise ValueError(f"override {token!r} has no value")
                k, v = body, tokens[i + 1]
                i += 1
        elif "=" in token:
            k, v = token.split("=", 1)
        else:
            raise ValueError(f"cannot parse override {token!r}; use --key VALUE")
        items.append((k.replace("-", "_"), v))
        i += 1
    return items


def apply_overrides(config: C, overrides: Mapping[str, Any] | Sequence[str] | None) -> C:
    """Apply ``{"lr": 1e-4, "data.path": "x.jsonl"}`` or ``["--lr", "1e-4", "data.path=x.jsonl"]``."""
    for key, value in override_items(overrides):
        set_key(config, key, value)
    return config


def default_config_path(recipe: str) -> Path:
    """The shipped YAML of ``recipe`` (the paper's values, the toy world's sizes)."""
    config_class(recipe)
    return CONFIG_DIR / f"{recipe}.yaml"


def shipped_yaml(recipe: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipped YAML of ``recipe`` as flat dotted keys: ``(paper values, toy section)``."""
    path = default_config_path(recipe)
    raw = dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}
    toy = raw.pop(TOY_SECTION, None) or {}
    return flatten(raw), flatten(toy)


def load_config(
    recipe: str,
    source: Mapping[str, Any] | RecipeConfig | str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> RecipeConfig:
    """Build the config of ``recipe``: its dataclass, the shipped YAML, then ``source`` (a mapping, a YAML path or
    a config), then ``overrides``; for the toy teacher, the YAML's toy section under all of these.

    Raises:
        ValueError: an unknown recipe or key (the message lists the valid ones), or a value out of range.
        TypeError: a value of the wrong type.
    """
    cls = config_class(recipe)
    if isinstance(source, RecipeConfig):
        if not isinstance(source, cls):
            raise TypeError(f"config is a {type(source).__name__}, recipe {recipe!r} needs a {cls.__name__}")
        config = dataclasses.replace(source)
        config.data = dataclasses.replace(source.data)
        config.eval = dataclasses.replace(source.eval)
        return _finish(recipe, apply_overrides(config, overrides))
    config = cls()
    paper, toy = shipped_yaml(recipe)
    apply_overrides(config, paper)
    if isinstance(source, str | Path):
        source = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
    explicit: set[str] = set()
    if source:
        if not isinstance(source, Mapping):
            raise TypeError(
                f"config must be a mapping, a YAML path or a RecipeConfig, got {type(source).__name__}"
            )
        if source.get("recipe", recipe) != recipe:
            raise ValueError(f"config is for recipe {source['recipe']!r}, not {recipe!r}")
        source = dict(source)
        toy.update(flatten(source.pop(TOY_SECTION, None) or {}))
        explicit |= {k for k, _ in override_items(source)}
        apply_overrides(config, source)
    explicit |= {k for k, _ in override_items(overrides)}
    apply_overrides(config, overrides)
    if is_toy_teacher(config.teacher):
        # The toy world's sizes and learning rates, for every key the caller did not set.
        apply_overrides(config, {k: v for k, v in toy.items() if k not in explicit})
    return _finish(recipe, config)


def _finish(recipe: str, config: C) -> C:
    config.recipe = recipe
    config.output_dir = config.output_dir or f"runs/{recipe}"
    if config.data.path is None and is_toy_teacher(config.teacher):
        # The toy teacher's own data; a real teacher's stays unset: its rows come from --data or the caller
        # (run_recipe(train_data=...)), never silently from the toy world.
        config.data.path = TOY
    validate(config)
    return config


def validate(config: RecipeConfig, *, needs_data: bool = False) -> None:
    """Raise ``ValueError`` naming the key for an option out of its choices or range.

    Args:
        config: the config to check.
        needs_data: the run reads its rows from ``config.data`` (no rows of the caller's): a real teacher then
            needs ``data.path`` set, so that it never trains on the toy world's captions unasked.
    """
    flat = flat_dict(config)
    for key, _, tp in iter_fields(type(config)):
        allowed = choices(tp)
        if allowed is not None and flat[key] not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {flat[key]!r}")
    for key in (
        "max_steps",
        "batch_size",
        "gradient_accumulation_steps",
        "log_every",
        "keep_checkpoints",
        "lr_decay_stages",
    ):
        if flat[key] < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {flat[key]}")
    for key in ("checkpoint_every", "validate_every", "warmup_steps"):
        if flat[key] < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {flat[key]}")
    for key in (
        "lr",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_decay_gamma",
    ):
        if not math.isfinite(flat[key]):
            raise ValueError(f"config key {key!r} must be a finite number, got {flat[key]}")
    if config.lr <= 0:
        raise ValueError(f"config key 'lr' must be > 0, got {config.lr}")
    # eps is the floor of AdamW's denominator sqrt(v) + eps: at 0 a parameter whose gradients were all 0 so far
    # divides 0 by 0, and its weight becomes NaN after a finite loss.
    if config.adam_epsilon <= 0:
        raise ValueError(f"config key 'adam_epsilon' must be > 0, got {config.adam_epsilon}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= flat[key] < 1:
            raise ValueError(f"config key {key!r} must be in [0, 1), got {flat[key]}")
    for key in ("weight_decay", "max_grad_norm"):
        if flat[key] < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {flat[key]}")
    if config.student_max_length < 3:
        raise ValueError(f"config key 'student_max_length' must be >= 3, got {config.student_max_length}")
    if not config.language.strip():
        raise ValueError("config key 'language' must name a language code, got an empty string")
    if config.data.path in (None, TOY) and is_toy_teacher(config.teacher):
        from xling.train.toyworld.world import parse_languages

        try:
            parse_languages(config.language)
        except ValueError as err:
            raise ValueError(f"config key 'language': {err}") from None
    if config.data.latent_cache is not None and getattr(config, "latents", None) == "sample":
        # The cache holds each image's posterior mode (docs/data.md).
        raise ValueError(
            "config key 'latents' is 'sample', which needs the images themselves, but data.latent_cache is set; "
            "drop the cache or set --latents mode"
        )
    if not 0.0 <= config.data.pair_fraction <= 1.0:
        raise ValueError(
            f"config key 'data.pair_fraction' must be in [0, 1], got {config.data.pair_fraction}"
        )
    if config.data.resolution is not None and config.data.resolution < 1:
        raise ValueError(f"config key 'data.resolution' must be >= 1 or null, got {config.data.resolution}")
    if needs_data and config.data.path is None:
        raise ValueError(
            f"teacher {config.teacher!r} needs training data and none was given (data.path is unset): pass "
            "--data PATH (a JSONL/CSV/TSV/Parquet file, a folder of them or WebDataset tar shards), or "
            "--data toy to train on the toy world's generated captions"
        )


def recorded_language(config: RecipeConfig) -> str:
    """The language code(s) an adapter of ``config`` records: on the toy world ``config.language`` spelled out
    (``"all"`` -> ``"zh,ja,ko,es,ar"``), else as given."""
    if config.data.path in (None, TOY) and is_toy_teacher(config.teacher):
        from xling.train.toyworld.world import parse_languages

        return ",".join(parse_languages(config.language))
    return config.language


def dump_yaml(config: RecipeConfig) -> str:
    """The resolved config as YAML (written next to the trained adapter)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
