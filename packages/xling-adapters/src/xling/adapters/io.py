"""The one file format of every head: ``config.json`` + ``model.safetensors`` in a directory.

Loading never unpickles: weights are read with ``safetensors`` only, and ``config.json`` records the
SHA-256 of the weights file so a tampered or truncated file fails with an error naming it, before any
tensor reaches a module. Width checks against a pipeline live here too, so training and inference raise
the same error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from xling.adapters.config import FORMAT_VERSION, HeadConfig, config_from_dict

if TYPE_CHECKING:
    from xling.adapters.head import AdapterHead

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Keys of config.json that describe the file, not the head.
_FILE_KEYS = ("weights_sha256",)


class WidthMismatchError(ValueError):
    """A head's widths do not fit the pipeline (or student) it is attached to; the message lists each."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_head(head: AdapterHead, directory: str | os.PathLike[str]) -> Path:
    """Write ``head`` to ``directory`` as ``model.safetensors`` then ``config.json``.

    Args:
        head: any :class:`~xling.adapters.head.AdapterHead`.
        directory: created if missing; existing files of the same names are replaced.

    Returns:
        The directory path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    # safetensors refuses shared or non-contiguous storage; a detached contiguous copy is always valid.
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(weights), metadata={"format": "pt", "head_type": head.config.head_type})
    payload = {**head.config.to_dict(), "format_version": FORMAT_VERSION, "weights_sha256": _sha256(weights)}
    # Written after the weights, so a directory with a config always has the weights it describes.
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return directory


def read_head_config(directory: str | os.PathLike[str]) -> tuple[HeadConfig, dict[str, Any]]:
    """Read and validate ``directory/config.json``.

    Returns:
        ``(config, file_info)`` where ``file_info`` holds the file-level keys (``weights_sha256``).

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: unparsable JSON, unknown ``head_type`` or fields, invalid values, or a
            ``format_version`` newer than this package reads; the message names the file.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no head config at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this xling-adapters reads versions <= {FORMAT_VERSION}"
        )
    file_info = {k: data.pop(k) for k in _FILE_KEYS if k in data}
    try:
        config = config_from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    return config, file_info


def load_state_into(
    module: torch.nn.Module, directory: str | os.PathLike[str], file_info: dict[str, Any]
) -> None:
    """Load ``directory/model.safetensors`` into ``module`` strictly (keys and shapes must match).

    Raises:
        FileNotFoundError: no weights file.
        ValueError: checksum mismatch, unreadable (truncated / corrupted) file, missing or unexpected
            keys, or shape mismatches; the message names the file.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no head weights at {path}")
    expected = file_info.get("weights_sha256")
    if expected is not None and _sha256(path) != expected:
        raise ValueError(
            f"{path} does not match the weights_sha256 recorded in its config.json (tampered or truncated)"
        )
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit {type(module).__name__}: missing {missing}, unexpected {unexpected}"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{path} has tensors of the wrong shape for {type(module).__name__}: {bad}")
    module.load_state_dict(state, strict=True)


def load_head(directory: str | os.PathLike[str], *, device: torch.device | str | None = None) -> AdapterHead:
    """Load any head saved with ``save_pretrained``, dispatching on its config's ``head_type``.

    Args:
        directory: a directory with ``config.json`` + ``model.safetensors``.
        device: where to put the loaded head (default CPU).

    Returns:
        An :class:`~xling.adapters.mlp.MLPAdapter`, :class:`~xling.adapters.mixer.MixerTranslator` or
        :class:`~xling.adapters.linear.LinearHead`, in eval mode.
    """
    from xling.adapters.head import head_class

    config, file_info = read_head_config(directory)
    head = head_class(config.head_type)(config)
    load_state_into(head, directory, file_info)
    if device is not None:
        head = head.to(device)
    return head.eval()


def check_widths(
    config: HeadConfig,
    *,
    cross_attention_dim: int | None = None,
    pooled_width: int | None = None,
    needs_pooled: bool = False,
    student_width: int | None = None,
    where: str = "the pipeline",
) -> None:
    """Raise :class:`WidthMismatchError` listing every width of ``config`` that does not fit.

    Args:
        config: the head's config.
        cross_attention_dim: the UNet's ``cross_attention_dim`` the head's ``teacher_width`` must equal.
        pooled_width: the pooled width the pipeline expects (SDXL: ``text_encoder_2.config.projection_dim``).
        needs_pooled: the pipeline requires pooled embeds (SDXL); a head with no pooled output then fails.
        student_width: the student encoder's hidden size the head's ``student_width`` must equal.
        where: how the error names the other side (``"the pipeline"``, ``"the student"``).
    """
    problems: list[str] = []
    if cross_attention_dim is not None and config.teacher_width != cross_attention_dim:
        problems.append(
            f"teacher_width {config.teacher_width} != unet.config.cross_attention_dim {cross_attention_dim}"
        )
    if needs_pooled and config.pooled_width is None:
        problems.append(
            f"the head has no pooled output but {where} needs pooled_prompt_embeds of width {pooled_width}"
        )
    elif needs_pooled and pooled_width is not None and config.pooled_width != pooled_width:
        problems.append(
            f"pooled_width {config.pooled_width} != pooled width {pooled_width} expected by {where}"
        )
    if student_width is not None and config.student_width != student_width:
        problems.append(f"student_width {config.student_width} != student hidden_size {student_width}")
    if problems:
        raise WidthMismatchError(
            f"{config.head_type} head ({config.teacher_family}) does not fit {where}: " + "; ".join(problems)
        )
