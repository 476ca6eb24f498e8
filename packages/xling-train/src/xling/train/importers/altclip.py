"""``xling import altclip``: a released AltCLIP text tower, or AltDiffusion's text encoder, as an xling adapter.

SRC is a directory with ``config.json`` and one weights file, in one of the public layouts (``R`` is an
XLM-R: ``embeddings.*``, ``encoder.layer.{i}.*``, as transformers' ``XLMRobertaModel``):

- transformers' ``AltCLIPModel`` (``model_type: altclip``, the BAAI/AltCLIP release):
  ``text_model.roberta.R``, ``text_model.pre_LN.{weight,bias} [d]``,
  ``text_model.transformation.weight [D, d]`` / ``.bias [D]``; the vision tower, ``visual_projection``,
  ``text_projection`` and ``logit_scale`` are not part of the text path and are dropped.
- transformers' ``AltCLIPTextModel`` (``model_type: altclip_text_model``): the same keys without
  ``text_model.``. Both compute ``transformation(pre_LN(h_last))`` on every token (pooled: its [CLS] row).
- AltDiffusion's ``text_encoder`` folder (diffusers' ``RobertaSeriesModelWithTransformation``):
  ``roberta.R`` and ``transformation.*``, whose tokens the UNet reads as ``transformation(h_last)``; with
  ``has_pre_transformation`` (AltDiffusion-m18) ``transformation_pre(pre_LN(h_{-2}))`` instead, from the
  penultimate layer.

The student is the XLM-R inside SRC, written into the adapter (safetensors); the head is a
:class:`~xling.adapters.LinearHead` holding ``transformation`` (``pre_norm`` with ``pre_LN``). The tokenizer
comes from SRC, else from the pipeline's ``tokenizer/`` beside a ``text_encoder/`` SRC, else from
``--student`` (a directory or Hub id with the XLM-R tokenizer).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xling.train.importers.state import LayoutError, check_layout, read_state_dict, teacher_widths
from xling.train.toyworld.names import teacher_record

__all__ = ["convert"]

#: The XLM-R fields of a released text config (the rest are AltCLIP's or the pipeline's).
_XLMR_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
#: Buffers and heads a released file may hold beside the text path (older transformers saved
#: ``position_ids``; FlagAI's KD model has an MLM ``lm_head``; diffusers ignores ``pooler`` / ``logit_scale``).
_ALWAYS_IGNORED = (
    "roberta.pooler.",
    "roberta.embeddings.position_ids",
    "roberta.embeddings.token_type_ids",
    "lm_head.",
    "logit_scale",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class _Layout:
    """Which public model SRC is and what its text path computes."""

    name: str
    prefix: str  # of the text tower's keys (``text_model.`` in an AltCLIPModel)
    projection: str  # the Linear whose output the UNet reads
    pre_norm: bool
    hidden_layer: int
    ignore: tuple[str, ...]  # key prefixes of the file (with ``prefix``) outside the UNet's text path


def _layout(raw: dict[str, Any], config_path: Path) -> tuple[_Layout, dict[str, Any]]:
    """The layout ``config.json`` describes and its text config (a dict of XLM-R fields + ``project_dim``)."""
    from transformers import AltCLIPConfig, AltCLIPTextConfig

    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type == "altclip":
        text = AltCLIPConfig.from_dict(raw).text_config.to_dict()
        dropped = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")
        return _Layout("AltCLIPModel", "text_model.", "transformation", True, -1, dropped), text
    if model_type == "altclip_text_model":
        text = AltCLIPTextConfig.from_dict(raw).to_dict()
        return _Layout("AltCLIPTextModel", "", "transformation", True, -1, ()), text
    if "RobertaSeriesModelWithTransformation" in architectures or "project_dim" in raw:
        if "project_dim" not in raw:
            raise LayoutError(
                f"{config_path}: a RobertaSeriesModelWithTransformation config needs `project_dim`"
            )
        if raw.get("has_pre_transformation"):
            # m18: the UNet reads transformation_pre(pre_LN(penultimate)); `transformation` serves CLIP only
            layout = _Layout(
                "RobertaSeriesModelWithTransformation",
                "",
                "transformation_pre",
                True,
                -2,
                ("transformation.",),
            )
        else:
            # diffusers builds no pre_LN here, so a FlagAI file's pre_LN.* is unused, as when diffusers loads it
            layout = _Layout(
                "RobertaSeriesModelWithTransformation", "", "transformation", False, -1, ("pre_LN.",)
            )
        return layout, dict(raw)
    raise LayoutError(
        f"{config_path}: model_type {model_type!r} / architectures {architectures} is not an AltCLIP text tower; "
        "expected transformers' AltCLIPModel or AltCLIPTextModel ('altclip', 'altclip_text_model') or "
        "AltDiffusion's text_encoder (RobertaSeriesModelWithTransformation)"
    )


def _tokenizer(source: Path, student: str | None) -> Any:
    from transformers import AutoTokenizer

    if student is not None:
        return AutoTokenizer.from_pretrained(student)
    for folder in (source, source.parent / "tokenizer"):
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(folder))
    raise FileNotFoundError(
        f"no tokenizer in {source} or {source.parent / 'tokenizer'}; pass --student with the directory or Hub "
        "id of the XLM-R tokenizer the checkpoint was trained with"
    )


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def convert(source: Path, *, teacher: str, output: Path, student: str | None = None) -> Path:
    """Write the AltCLIP / AltDiffusion text tower in ``source`` as an adapter directory ``output``.

    Args:
        source: the released directory (``config.json`` + one ``.safetensors`` / ``.bin`` file).
        teacher: the SD 1.x / 2.x teacher whose ``cross_attention_dim`` equals the tower's ``project_dim``.
        output: the adapter directory to write.
        student: where the XLM-R tokenizer is when ``source`` (and its pipeline's ``tokenizer/``) has none.

    Returns:
        ``output``.

    Raises:
        LayoutError: ``config.json`` is not one of the layouts above, or the weights miss a key, hold an
            unexpected one or a wrong shape (each named).
        ValueError: the teacher is SDXL (the tower has no pooled projection for it) or its width differs
            from ``project_dim``.
        FileNotFoundError: no ``config.json``, or no tokenizer.
    """
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig

    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{source}: expected a directory with config.json (the released model folder)"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{config_path} is not valid JSON: {e}") from e
    layout, text = _layout(raw, config_path)
    xlmr = XLMRobertaConfig(**{k: text[k] for k in _XLMR_FIELDS if k in text})
    d, width = xlmr.hidden_size, int(text["project_dim"])

    with torch.device("meta"):
        shapes = {
            f"roberta.{k}": tuple(v.shape)
            for k, v in XLMRobertaModel(xlmr, add_pooling_layer=False).state_dict().items()
        }
    shapes.update({f"{layout.projection}.weight": (width, d), f"{layout.projection}.bias": (width,)})
    if layout.pre_norm:
        shapes.update({"pre_LN.weight": (d,), "pre_LN.bias": (d,)})
    # transformers >= 5 saves a bare AltCLIPTextModel with `encoder.layers.{i}`; the releases have `encoder.layer.{i}`
    state = {
        k.replace("roberta.encoder.layers.", "roberta.encoder.layer."): v
        for k, v in read_state_dict(source).items()
    }
    prefixed = {layout.prefix + k: s for k, s in shapes.items()}
    ignore = layout.ignore + tuple(layout.prefix + p for p in _ALWAYS_IGNORED)
    check_layout(state, prefixed, source=f"{source} ({layout.name})", ignore=ignore)
    state = _sub(state, layout.prefix) if layout.prefix else state

    widths = teacher_widths(teacher)
    if widths["pooled_width"] is not None:
        raise ValueError(
            f"teacher {teacher} is SDXL; an AltCLIP text tower has no projection to its pooled embedding "
            "(AltDiffusion is built on SD 1.x / 2.x)"
        )
    if widths["teacher_width"] != width:
        raise ValueError(
            f"{source}: {layout.projection}.weight projects to {width} (project_dim) but teacher {teacher} "
            f"has cross_attention_dim {widths['teacher_width']}"
        )

    model = XLMRobertaModel(xlmr)  # its own pooler stays as initialised: the head reads hidden states only
    missing, unexpected = model.load_state_dict(_sub(state, "roberta."), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    head = LinearHead(
        LinearHeadConfig(
            student_width=d,
            teacher_width=width,
            teacher_family=widths["teacher_family"],  # type: ignore[arg-type]
            pooled_width=None,
            pre_norm=layout.pre_norm,
            layer_norm_eps=xlmr.layer_norm_eps,
            student_model=str(source),
        )
    )
    with torch.no_grad():
        head.proj.weight.copy_(state[f"{layout.projection}.weight"])
        head.proj.bias.copy_(state[f"{layout.projection}.bias"])
        if head.norm is not None:
            head.norm.weight.copy_(state["pre_LN.weight"])
            head.norm.bias.copy_(state["pre_LN.bias"])
    tokenizer = _tokenizer(source, student)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        encoder = LanguageEncoder.from_student(tmp, head, hidden_layer=layout.hidden_layer, pooling="cls")
        encoder.config.student_model = str(source)  # the temporary folder goes; the adapter holds the weights
        return encoder.save_pretrained(output, include_student=True, teacher=teacher_record(teacher))
