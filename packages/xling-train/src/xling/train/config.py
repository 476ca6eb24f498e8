"""Recipe configs: one dataclass per recipe (peft style), YAML files with the paper defaults, overrides.

A config is flat except for two sections, ``data`` and ``eval``. Every field is documented through its
``metadata["help"]``, which is what ``xling train <recipe> --help`` prints.

The shipped YAMLs hold the paper's hyperparameters at the top level and, in a ``toy:`` section, the toy
world's step counts and learning rates, applied when ``teacher`` is ``toy`` to every key the caller did not set.

Override scheme (one, everywhere): ``--key VALUE`` with dotted keys for the sections, e.g.
``--lr 1e-4 --data.path pairs.jsonl --eval.enabled false``. Values are parsed as YAML scalars
(``1e-4`` -> float, ``true`` -> bool, ``[0, 1]`` -> list, ``null`` -> None) and then checked against the
field's type. Programmatic callers pass the same dotted keys in a mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

#: Directory holding one YAML per recipe (also reachable through the repository's root ``configs`` symlink).
CONFIG_DIR = Path(__file__).parent / "configs"

RECIPES: tuple[str, ...] = ("iap", "pea", "mtn", "align", "distill", "denoise")

#: The word that means "the built-in toy world" for ``teacher``, ``student`` and ``data.path``.
TOY = "toy"

#: The committed toy students: ``student: toy`` is ``pretrained``, ``toy-random`` and ``toy-aligned`` the others.
TOY_STUDENTS: tuple[str, ...] = ("pretrained", "random", "aligned")

#: YAML section with the toy world's values (step counts, batch size, lr), applied when ``teacher == "toy"`` to
#: the keys the caller did not set; the top level holds the paper's values for real models.
TOY_SECTION = "toy"


def _f(default: Any, help: str) -> Any:
    """A dataclass field with an immutable default and its help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where the parallel captions (and images) come from."""

    path: str = _f(
        TOY, "'toy' (generated toy-world pairs) or a JSONL/CSV/TSV/Parquet file or WebDataset shards."
    )
    en_column: str = _f("en", "Column holding the English caption.")
    zh_column: str = _f("zh", "Column holding the target-language caption.")
    image_column: str = _f("image", "Column holding the image path (image recipes only).")
    culture_column: str = _f("culture", "Column flagging culture-only rows (pea --hybrid).")
    on_bad_row: str = _f("skip", "'skip' or 'fail' on a malformed row, unreadable image or empty caption.")
    num_samples: int = _f(512, "Toy world only: number of generated training pairs.")
    val_samples: int = _f(16, "Rows held out for validation (toy world: held-out combinations).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    latent_cache: str | None = _f(
        None, "Folder of a VAE latent cache, built on first use (image recipes, files)."
    )
    embedding_cache: str | None = _f(None, "Folder of a teacher-embedding cache, built on first use (files).")


@dataclass
class EvalConfig:
    """The end-of-run evaluation (toy world: Markdown report + PNG grid)."""

    enabled: bool = _f(True, "Write the report and the PNG grid at the end of training.")
    num_prompts: int = _f(8, "Prompts in the PNG grid.")
    seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "Sampling seeds for the report and the grid."}
    )
    num_inference_steps: int = _f(20, "Sampler steps for the report images.")
    guidance_scale: float = _f(3.0, "Classifier-free guidance scale for the report images.")
    max_scenes: int | None = _f(None, "Toy world: evaluate a fixed subset of this many scenes (None: all).")


@dataclass
class RecipeConfig:
    """Fields every recipe shares: models, loop, optimizer, logging, checkpoints."""

    recipe: str = _f("iap", "Recipe name.")
    teacher: str = _f(TOY, "Teacher diffusers directory or Hub id ('toy': the committed toy teacher).")
    student: str = _f(
        TOY,
        "Student encoder directory or Hub id ('toy': the MLM-pretrained toy student; 'toy-random', 'toy-aligned').",
    )
    output_dir: str = _f("runs/iap", "Run directory: checkpoints/, logs/, adapter/, config.yaml, report.")
    seed: int = _f(0, "Seed of the data order, the noise and the initialisation.")
    max_steps: int = _f(300, "Optimizer updates to run.")
    batch_size: int = _f(
        16, "Rows per process per micro-batch (global batch = batch_size * processes * accumulation)."
    )
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    mixed_precision: str = _f(
        "no", "'no', 'fp16' or 'bf16': frozen modules run in this dtype, trainable stay fp32."
    )
    lr: float = _f(5e-5, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    lr_scheduler: str = _f("cosine", "'cosine', 'constant' or 'linear' (all after warmup).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    log_with: str = _f("tensorboard", "'tensorboard', 'wandb' or 'none'.")
    log_every: int = _f(10, "Log every loss term every N updates.")
    validate_every: int = _f(0, "Validation loss every N updates (0: only at the end).")
    checkpoint_every: int = _f(100, "save_state every N updates (0: never).")
    keep_checkpoints: int = _f(2, "Keep the last K checkpoints.")
    resume: str | None = _f(None, "'latest' or a checkpoint directory to continue from.")
    attention: str = _f(
        "auto", "Dual attention: 'fused' (Triton), 'reference' (PyTorch) or 'auto' (fused on CUDA)."
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data section."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation section."})


@dataclass
class UNetOnImages:
    """Options of the recipes that run the UNet on noised images conditioned by the student (IAP, PEA, denoise)."""

    timestep_min: int = _f(0, "Smallest training timestep sampled.")
    timestep_max: int | None = _f(None, "Largest training timestep sampled (None: the scheduler's last).")
    # The diffusers pipelines take `prompt_embeds` without a mask, so generation attends to every student
    # position. Training unmasked would match that, yet scored lower in the toy world (IAP 87.5% vs 95.8%,
    # PEA 8.3% vs 12.5% all-correct), so masking stays the default.
    student_padding_mask: bool = _f(
        True, "Hide the student's padding tokens from the UNet's cross-attention in training."
    )


@dataclass
class IAPConfig(UNetOnImages, RecipeConfig):
    """IAP, "images as pivots": the student encoder + a linear head learn to reproduce, in every cross-attention
    layer, the teacher's output for the same image query (Li et al., 2024; lr 5e-5)."""

    recipe: str = _f("iap", "Recipe name.")
    output_dir: str = _f("runs/iap", "Run directory.")
    lr: float = _f(5e-5, "Peak learning rate (IAP paper: 5e-5).")
    train_encoder: bool = _f(True, "Fine-tune the whole student encoder (IAP); false trains the head only.")


@dataclass
class PEAConfig(UNetOnImages, RecipeConfig):
    """PEA-Diffusion: frozen student + MLP adapter, UNet feature KD + output KD (Ma et al., 2023; lr 1e-5,
    feature weight 0.1)."""

    recipe: str = _f("pea", "Recipe name.")
    output_dir: str = _f("runs/pea", "Run directory.")
    lr: float = _f(1e-5, "Peak learning rate (PEA paper: 1e-5).")
    feature_weight: float = _f(0.1, "lambda_F, weight of the UNet feature KD (PEA paper: 0.1).")
    output_weight: float = _f(1.0, "lambda_L, weight of the noise-prediction KD.")
    hybrid: bool = _f(False, "Culture-only rows use the plain denoising loss instead of KD.")
    denoise_weight: float = _f(1.0, "Weight of the denoising loss on culture-only rows (--hybrid).")
    adapter_hidden: int | None = _f(None, "MLP adapter hidden width (None: the adapter's default).")


@dataclass
class MTNConfig(RecipeConfig):
    """MTN / GlueNet: frozen student + mixer translator with a decoder; MSE to the teacher embeddings,
    reconstruction and an adversarial term (Qin et al., 2023; lr 1e-4)."""

    recipe: str = _f("mtn", "Recipe name.")
    output_dir: str = _f("runs/mtn", "Run directory.")
    lr: float = _f(1e-4, "Peak learning rate (GlueNet: 1e-4).")
    mse_weight: float = _f(1.0, "Weight of the MSE to the teacher embeddings.")
    reconstruction_weight: float = _f(1.0, "Weight of the reconstruction through the decoder.")
    adversarial_weight: float = _f(
        0.1, "Weight of the adversarial term (gradient reversal into the translator)."
    )
    grl_scale: float = _f(1.0, "Gradient-reversal scale between the translator and the discriminator.")
    num_blocks: int | None = _f(None, "Mixer blocks (None: the translator's default).")


@dataclass
class AlignConfig(RecipeConfig):
    """Cosine alignment of student and teacher embeddings with LoRA heads (r 16, alpha 64) or the last k
    encoder layers unfrozen (the LoRA/unfreeze baselines of the IAP paper)."""

    recipe: str = _f("align", "Recipe name.")
    output_dir: str = _f("runs/align", "Run directory.")
    lr: float = _f(1e-4, "Peak learning rate.")
    method: str = _f("lora", "'lora' (LoRA heads) or 'unfreeze' (last k layers trainable).")
    lora_r: int = _f(16, "LoRA rank (paper: 16).")
    lora_alpha: int = _f(64, "LoRA alpha (paper: 64).")
    unfreeze_layers: int = _f(3, "Layers unfrozen with method=unfreeze (paper: 3).")
    pooled_weight: float = _f(1.0, "Weight of the pooled-embedding cosine (SDXL teachers only).")


@dataclass
class DistillConfig(RecipeConfig):
    """AltDiffusion stage 1: MSE between the projected student [CLS] and the teacher's pooled vector
    (Chen et al., 2022 / Ye et al., 2023)."""

    recipe: str = _f("distill", "Recipe name.")
    output_dir: str = _f("runs/distill", "Run directory.")
    lr: float = _f(1e-4, "Peak learning rate.")
    train_encoder: bool = _f(True, "Fine-tune the student encoder with the projection.")


@dataclass
class DenoiseConfig(UNetOnImages, RecipeConfig):
    """The plain denoising loss on a chosen trainable part: the student (Taiyi / "original loss" baseline),
    the cross-attention K/V (AltDiffusion stage 2) or the whole UNet."""

    recipe: str = _f("denoise", "Recipe name.")
    output_dir: str = _f("runs/denoise", "Run directory.")
    lr: float = _f(5e-5, "Peak learning rate.")
    trainable: str = _f("student", "'student', 'kv' (attn2 to_k/to_v only) or 'unet'.")
    adapter: str | None = _f(None, "Adapter directory to start from (kv/unet: the frozen stage-1 student).")
    snr_gamma: float | None = _f(None, "Min-SNR weighting gamma (None: plain MSE).")


CONFIG_CLASSES: dict[str, type[RecipeConfig]] = {
    "iap": IAPConfig,
    "pea": PEAConfig,
    "mtn": MTNConfig,
    "align": AlignConfig,
    "distill": DistillConfig,
    "denoise": DenoiseConfig,
}

C = TypeVar("C", bound=RecipeConfig)


def config_class(recipe: str) -> type[RecipeConfig]:
    """The config dataclass of ``recipe``."""
    if recipe not in CONFIG_CLASSES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    return CONFIG_CLASSES[recipe]


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield ``(dotted_key, field, type)`` for every leaf option of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and, for strings from the command line, parse) ``value`` against the annotation ``tp``."""
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
    if tp is str:
        if not isinstance(value, str):
            # YAML may read a path like 123 as a number; a string field keeps its text.
            return str(value)
        return value
    return value


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    """Nested plain-Python view of a config (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def flat_dict(config: RecipeConfig) -> dict[str, Any]:
    """``{"lr": 5e-05, "data.path": "toy", ...}``: the dotted view used for trackers and ``--help``."""
    return _flatten(to_dict(config))


def set_key(config: RecipeConfig, key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``config`` in place, parsing and checking ``value`` against its type."""
    leaves = {k: tp for k, _, tp in iter_fields(type(config))}
    if key == "data" and isinstance(value, str):
        key = "data.path"  # `--data PATH` is the short form of `--data.path PATH`.
    if key not in leaves:
        raise ValueError(
            f"unknown config key {key!r} for recipe {config.recipe!r}; valid keys: {', '.join(sorted(leaves))}"
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
        return list(_flatten(overrides).items())
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
    """The shipped YAML of ``recipe`` (paper defaults, toy-world sizes)."""
    config_class(recipe)
    return CONFIG_DIR / f"{recipe}.yaml"


def load_config(
    recipe: str,
    source: Mapping[str, Any] | RecipeConfig | str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> RecipeConfig:
    """Build the config of ``recipe``: the shipped YAML, then ``source`` (a mapping, a YAML path or a config),
    then ``overrides``. Unknown keys raise ``ValueError`` listing the valid ones.
    """
    cls = config_class(recipe)
    if isinstance(source, RecipeConfig):
        if not isinstance(source, cls):
            raise TypeError(f"config is a {type(source).__name__}, recipe {recipe!r} needs a {cls.__name__}")
        config = dataclasses.replace(source)
        config.data = dataclasses.replace(source.data)
        config.eval = dataclasses.replace(source.eval)
        return apply_overrides(config, overrides)
    config = cls()
    shipped = shipped_yaml(recipe)
    toy = dict(shipped.pop(TOY_SECTION, None) or {})
    apply_overrides(config, shipped)
    if isinstance(source, str | Path):
        source = yaml.safe_load(Path(source).read_text()) or {}
    explicit: set[str] = set()
    if source:
        if not isinstance(source, Mapping):
            raise TypeError(
                f"config must be a mapping, a YAML path or a RecipeConfig, got {type(source).__name__}"
            )
        if source.get("recipe", recipe) != recipe:
            raise ValueError(f"config is for recipe {source['recipe']!r}, not {recipe!r}")
        source = dict(source)
        toy.update(source.pop(TOY_SECTION, None) or {})
        explicit |= {k for k, _ in override_items(source)}
        apply_overrides(config, source)
    explicit |= {k for k, _ in override_items(overrides)}
    apply_overrides(config, overrides)
    if config.teacher == TOY:
        # The toy world's sizes and learning rates, for every key the caller did not set.
        apply_overrides(config, {k: v for k, v in override_items(toy) if k not in explicit})
    validate(config)
    return config


def shipped_yaml(recipe: str) -> dict[str, Any]:
    """The shipped YAML of ``recipe`` as a dict (its ``toy`` section included)."""
    path = default_config_path(recipe)
    return dict(yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


_CHOICES: dict[str, tuple[str, ...]] = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "lr_scheduler": ("cosine", "constant", "linear"),
    "log_with": ("tensorboard", "wandb", "none"),
    "attention": ("auto", "fused", "reference"),
    "data.on_bad_row": ("skip", "fail"),
    "method": ("lora", "unfreeze"),
    "trainable": ("student", "kv", "unet"),
}


def validate(config: RecipeConfig) -> None:
    """Raise ``ValueError`` naming the key for an out-of-range option."""
    flat = flat_dict(config)
    for key, choices in _CHOICES.items():
        if key in flat and flat[key] not in choices:
            raise ValueError(f"config key {key!r} must be one of {choices}, got {flat[key]!r}")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "keep_checkpoints"):
        if flat[key] < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {flat[key]}")
    for key in ("checkpoint_every", "validate_every", "warmup_steps"):
        if flat[key] < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {flat[key]}")
    if config.lr <= 0:
        raise ValueError(f"config key 'lr' must be > 0, got {config.lr}")


def dump_yaml(config: RecipeConfig) -> str:
    """The resolved config as YAML (written next to the trained adapter)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
