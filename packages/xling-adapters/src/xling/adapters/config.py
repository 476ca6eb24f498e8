"""One dataclass config per head, peft-style: every field documented, validated on construction.

A config is the whole description of a head: ``save_pretrained`` writes it as ``config.json`` beside the
weights and ``from_pretrained`` rebuilds the module from it. ``head_type`` selects the class on load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

#: Version of the on-disk layout written by this package; readers refuse newer versions.
FORMAT_VERSION = 1

TeacherFamily = Literal["sd1", "sd2", "sdxl", "pixart", "sana", "sd3", "flux"]
TEACHER_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "pixart", "sana", "sd3", "flux")
#: Families whose pipelines need ``pooled_prompt_embeds`` (SDXL's UNet added conditions, the MMDiTs' AdaLN).
POOLED_FAMILIES: tuple[str, ...] = ("sdxl", "sd3", "flux")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


@dataclass
class HeadConfig:
    """Fields shared by every head.

    Attributes:
        student_width: width ``d`` of the student encoder's hidden states fed to the head.
        teacher_width: width ``D`` of the teacher's ``prompt_embeds``, the denoiser's conditioning width: the
            UNet's ``cross_attention_dim`` (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL), the transformer's
            ``caption_channels`` (4096 for PixArt-α/Σ's T5, 2304 for Sana's Gemma-2) or its
            ``joint_attention_dim`` (4096 for SD3 and Flux, their T5 width).
        teacher_family: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"pixart"`` (PixArt-α and PixArt-Σ), ``"sana"``,
            ``"sd3"`` or ``"flux"``; documents which teacher the head was trained for.
        pooled_width: width ``P`` of the pooled embedding the head also returns, or ``None`` for a head that
            returns no pooled vector. Required for the families whose pipelines need ``pooled_prompt_embeds``
            (:data:`POOLED_FAMILIES`): SDXL (1280, CLIP-G's projection), SD3 (2048, CLIP-L's 768 and CLIP-G's
            1280 projections side by side; ``transformer.config.pooled_projection_dim``) and Flux (768,
            CLIP-L's pooler output; ``pooled_projection_dim`` too). Optional elsewhere (the [EOS] projection
            AltDiffusion distils on SD 1.x); PixArt and Sana pipelines take no pooled vector and ignore one.
        student_model: name or path of the student encoder the head was trained on (informational,
            and the default student of ``LanguageEncoder.from_pretrained`` for a frozen student).
        language: language code of the prompts the head was trained on (``"zh"``).
        format_version: on-disk format version this config was written with.
    """

    head_type: ClassVar[str] = ""

    student_width: int = 1024
    teacher_width: int = 768
    teacher_family: TeacherFamily = "sd1"
    pooled_width: int | None = None
    student_model: str | None = None
    language: str = "zh"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_positive("student_width", self.student_width)
        _check_positive("teacher_width", self.teacher_width)
        if self.pooled_width is not None:
            _check_positive("pooled_width", self.pooled_width)
        if self.teacher_family not in TEACHER_FAMILIES:
            raise ValueError(
                f"`teacher_family` must be one of {TEACHER_FAMILIES}, got {self.teacher_family!r}"
            )
        if self.teacher_family in POOLED_FAMILIES and self.pooled_width is None:
            raise ValueError(
                f"`pooled_width` is required when `teacher_family` is {self.teacher_family!r}: its pipeline needs "
                "pooled_prompt_embeds (SDXL's UNet added conditions, SD3's and Flux's AdaLN)"
            )
        if not isinstance(self.language, str) or not self.language:
            raise ValueError(f"`language` must be a non-empty string, got {self.language!r}")
        if self.student_model is not None and not isinstance(self.student_model, str):
            raise TypeError(f"`student_model` must be a str or None, got {type(self.student_model).__name__}")
        _check_positive("format_version", self.format_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, ``head_type`` first."""
        return {"head_type": self.head_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        """Build from a dict written by :meth:`to_dict`; unknown keys or a wrong ``head_type`` raise."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        data = dict(data)
        head_type = data.pop("head_type", cls.head_type)
        if head_type != cls.head_type:
            raise ValueError(
                f"config has head_type {head_type!r}, expected {cls.head_type!r} for {cls.__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


@dataclass
class MLPAdapterConfig(HeadConfig):
    """PEA-Diffusion's adapter: LayerNorm, bias-free Linear/GELU stack, output projection.

    The defaults are the SDXL adapter of the PEA-Diffusion code for a 1024-wide student
    (``MLP(1024, 1280, 1024, 2048)``): 1024 -> 1024 -> 1024 -> 1280 (bias-free), pooled = token mean of
    that 1280-wide output, tokens = ``Linear(1280, 2048)(GELU(.))``; 6,033,408 parameters. For SD 1.x / 2.x
    set ``teacher_width=768`` / ``1024`` and ``pooled_width=None``: the stack then ends at the teacher width;
    likewise for PixArt / Sana (``teacher_width`` = ``caption_channels``). For SD3 / Flux set
    ``teacher_width`` = ``joint_attention_dim`` (4096) and ``pooled_width`` = ``pooled_projection_dim``
    (2048 / 768): the stack ends at the pooled width, as for SDXL.

    Attributes:
        hidden_width: width of the hidden Linear layers (1024 gives PEA's 6.0M SDXL adapter).
        num_layers: number of bias-free Linear layers in the stack (>= 2; GELU between them).
        layer_norm_eps: epsilon of the input LayerNorm.
        pooled: SDXL's pooled vector, the token mean of the stack output over ``"all"`` positions of the
            padded window (padding included, as the PEA code's ``torch.mean(x, 1)``; what a PEA checkpoint
            was trained with) or over the ``"masked"`` real tokens only (xling's rule: it does not depend on
            how far a prompt was padded). ``"masked"`` is the default so that adapters saved before this
            field existed load as they were trained.
    """

    head_type: ClassVar[str] = "mlp"

    student_width: int = 1024
    teacher_width: int = 2048
    teacher_family: TeacherFamily = "sdxl"
    pooled_width: int | None = 1280
    hidden_width: int = 1024
    num_layers: int = 3
    layer_norm_eps: float = 1e-5
    pooled: Literal["all", "masked"] = "masked"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("hidden_width", self.hidden_width)
        _check_positive("num_layers", self.num_layers)
        if self.num_layers < 2:
            raise ValueError(f"`num_layers` must be >= 2 (input and output Linear), got {self.num_layers}")
        if self.pooled not in ("all", "masked"):
            raise ValueError(f"`pooled` must be 'all' or 'masked', got {self.pooled!r}")


@dataclass
class MixerTranslatorConfig(HeadConfig):
    """GlueNet's translator: residual mixer blocks plus a decoder, in GlueGen's layout or xling's.

    ``translator="gluenet"`` with ``positions="all"``, ``input_scale=1/3`` and ``output_scale`` = GlueGen's
    per-position norms / 2 (:data:`xling.adapters.mixer.GLUEGEN_OUTPUT_SCALE`) computes what GlueGen's
    multilingual ``Translator_noln`` computes, and its checkpoints load into it key for key. The defaults are
    xling's translator, so that adapters saved before these fields existed load as they were trained.

    Attributes:
        source_length: token count ``S`` the token mixers are built for (the student's padded window,
            e.g. 77, 128 or 256). Shorter inputs are zero-padded to it (mask 0); longer inputs raise.
        target_length: token count ``T`` of the produced ``prompt_embeds`` (77 for every SD teacher).
        depth: number of residual mixer blocks in the encoder (and in the decoder).
        mult: expansion factor of the hidden layer of each token / channel MLP (GlueNet uses 2).
        with_decoder: build the decoder used by the reconstruction loss (not needed at inference).
        layer_norm_eps: epsilon of every LayerNorm.
        translator: ``"gluenet"``: GlueGen's post-norm blocks (``Linear -> LayerNorm -> GELU``, twice, then
            ``Linear -> LayerNorm``; each block wrapped as ``GELU(block(x) + x)``), a LayerNorm-free transition,
            and a decoder of ``depth`` blocks at the teacher's width before the transition back. ``"xling"``:
            pre-norm MLPs (``LayerNorm -> Linear -> GELU -> Linear -> GELU -> Linear``), plain residual blocks
            and a mirror decoder (transition first); the variant that reached 100% in the toy world.
        positions: ``"all"``: every position of the padded window is translated as the student produced it
            (padding states included, as GlueGen pads to 77 and reads all of them); ``"masked"``: padded
            positions are zeroed first, so what a tokenizer put there does not matter.
        input_scale: factor on the student's hidden states before the translator (GlueGen: 1/3).
        output_scale: ``T`` per-position factors on the translator's output (GlueGen: its 77 norms of the
            CLIP ViT-L/14 embeddings divided by 2); ``None``: no scaling.
    """

    head_type: ClassVar[str] = "mixer"

    student_width: int = 1024
    teacher_width: int = 768
    source_length: int = 77
    target_length: int = 77
    depth: int = 5
    mult: float = 2.0
    with_decoder: bool = True
    layer_norm_eps: float = 1e-5
    translator: Literal["gluenet", "xling"] = "xling"
    positions: Literal["all", "masked"] = "masked"
    input_scale: float = 1.0
    output_scale: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.translator not in ("gluenet", "xling"):
            raise ValueError(f"`translator` must be 'gluenet' or 'xling', got {self.translator!r}")
        if self.positions not in ("all", "masked"):
            raise ValueError(f"`positions` must be 'all' or 'masked', got {self.positions!r}")
        if isinstance(self.input_scale, bool) or not isinstance(self.input_scale, int | float):
            raise ValueError(f"`input_scale` must be a number, got {self.input_scale!r}")
        if self.output_scale is not None:
            if not isinstance(self.output_scale, list | tuple) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in self.output_scale
            ):
                raise ValueError(
                    f"`output_scale` must be a list of numbers or None, got {self.output_scale!r}"
                )
            if len(self.output_scale) != self.target_length:
                raise ValueError(
                    f"`output_scale` has {len(self.output_scale)} values; one per output position "
                    f"(target_length {self.target_length}) is needed"
                )
            self.output_scale = [float(v) for v in self.output_scale]
        _check_positive("source_length", self.source_length)
        _check_positive("target_length", self.target_length)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"`depth` must be an int >= 0, got {self.depth!r}")
        if not isinstance(self.mult, int | float) or self.mult <= 0:
            raise ValueError(f"`mult` must be a positive number, got {self.mult!r}")
        if not isinstance(self.with_decoder, bool):
            raise TypeError(f"`with_decoder` must be a bool, got {type(self.with_decoder).__name__}")


@dataclass
class LinearHeadConfig(HeadConfig):
    """The linear projection IAP and AltDiffusion put after the student encoder.

    Attributes:
        bias: whether the token and pooled projections have a bias.
        pre_norm: a trainable LayerNorm on the student's states before both projections (every token and the
            pooled vector): AltCLIP's ``pre_LN``, which it trains with the projection whose [CLS] output
            regresses CLIP's pooled vector, so an AltCLIP text tower computes its outputs only with it.
            ``False`` (the plain projection of IAP and of AltDiffusion's text encoder as diffusers ships it)
            is the default, so adapters saved before this field existed load as they were trained.
        layer_norm_eps: epsilon of that LayerNorm (the student's ``layer_norm_eps``, 1e-5 for XLM-R).
    """

    head_type: ClassVar[str] = "linear"

    bias: bool = True
    pre_norm: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pre_norm, bool):
            raise ValueError(f"`pre_norm` must be a bool, got {self.pre_norm!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, int | float):
            raise ValueError(f"`layer_norm_eps` must be a number, got {self.layer_norm_eps!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")


@dataclass
class LoraHeadConfig:
    """LoRA on the student encoder's attention projections (peft), the cosine-alignment recipe's default.

    Attributes:
        r: LoRA rank.
        alpha: LoRA scaling numerator (``scale = alpha / r``).
        dropout: dropout on the LoRA branch input.
        target_modules: module-name suffixes to adapt; ``None`` picks the attention projections of the
            student's architecture (see :func:`xling.adapters.lora.default_lora_targets`).
        bias: peft's bias mode (``"none"``, ``"all"`` or ``"lora_only"``).
    """

    r: int = 16
    alpha: int = 64
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        _check_positive("r", self.r)
        if not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"`alpha` must be positive, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and (
            not isinstance(self.target_modules, list | tuple)
            or not self.target_modules
            or not all(isinstance(t, str) for t in self.target_modules)
        ):
            raise ValueError(
                f"`target_modules` must be a non-empty list of str or None, got {self.target_modules!r}"
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}")


#: ``head_type`` -> config class, for :func:`config_from_dict`.
CONFIG_CLASSES: dict[str, type[HeadConfig]] = {
    cls.head_type: cls for cls in (MLPAdapterConfig, MixerTranslatorConfig, LinearHeadConfig)
}


def config_from_dict(data: dict[str, Any]) -> HeadConfig:
    """Dispatch on ``data["head_type"]`` to the matching config class.

    Raises:
        ValueError: missing or unknown ``head_type``, unknown fields, invalid values.
    """
    if not isinstance(data, dict):
        raise TypeError(f"config must be a dict, got {type(data).__name__}")
    head_type = data.get("head_type")
    if head_type not in CONFIG_CLASSES:
        raise ValueError(f"unknown head_type {head_type!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[head_type].from_dict(data)
