"""The one file format of every head: ``config.json`` + ``model.safetensors`` in a directory.

Loading never unpickles: weights are read with ``safetensors`` only, and ``config.json`` records the
SHA-256 of the weights file so a tampered or truncated file fails with an error naming it, before any
tensor reaches a module. The file-level checks every weight file of an adapter directory goes through
(hash, safetensors only, readable header) live here too, as do the width checks against a pipeline, so
training and inference raise the same errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xling.adapters.config import FORMAT_VERSION, HeadConfig, config_from_dict

if TYPE_CHECKING:
    from xling.adapters.head import AdapterHead

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Keys of config.json that describe the file, not the head.
_FILE_KEYS = ("weights_sha256",)
#: Names of the weight files of a model folder (a single file, or shards with their index).
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
#: Pickle formats that are refused rather than loaded (``torch.load`` runs code a file may carry).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: How every hash error tells the owner of a hand-made folder to load it anyway.
OPT_OUT = (
    "if you made this folder by hand, load it with verify_hashes=False "
    "(LanguageEncoder.from_pretrained, load_head or attach)"
)


class WidthMismatchError(ValueError):
    """A head's widths do not fit the pipeline (or student) it is attached to; the message lists each."""


class WeightFileError(ValueError):
    """A weight file has no recorded SHA-256, does not match it, is a pickle, or is unreadable; names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of ``folder`` (not its subfolders), sorted; shard indexes included."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def record_weights(root: Path, *folders: Path) -> dict[str, str]:
    """``{path relative to root: SHA-256}`` of every weight file of ``folders`` (written at save time)."""
    return {p.relative_to(root).as_posix(): _sha256(p) for folder in folders for p in weight_files(folder)}


def check_weight_file(path: Path, expected: Any, config_path: Path, *, verify_hashes: bool = True) -> None:
    """Compare ``path`` with the SHA-256 ``expected`` recorded in ``config_path``.

    Raises:
        WeightFileError: no hash recorded (while ``verify_hashes``) or a mismatch; the message names the file.
    """
    if not verify_hashes:
        return
    if not isinstance(expected, str):
        raise WeightFileError(
            f"{path} has no SHA-256 recorded in {config_path} (key weights_sha256), so it cannot be checked; "
            + OPT_OUT
        )
    if _sha256(path) != expected:
        raise WeightFileError(
            f"{path} does not match the SHA-256 recorded for it in {config_path} (weights_sha256): "
            "the file was modified or truncated after saving"
        )


def check_model_folder(
    folder: Path,
    recorded: Mapping[str, Any] | None = None,
    *,
    root: Path | None = None,
    verify_hashes: bool = True,
) -> None:
    """Check a model folder's weight files before transformers or peft reads them.

    Every folder must hold safetensors weights (a folder with only pickles is refused, naming the file). With
    ``root`` (the adapter directory whose ``config.json`` holds ``recorded``, keyed by path relative to
    ``root``), every weight file must match its recorded SHA-256 and every recorded file of the folder must
    exist. Last, each safetensors header is read (not the tensors), so a truncated file fails here naming
    itself instead of deep inside the loader.

    Raises:
        FileNotFoundError: no weights at all, or a recorded file is gone.
        WeightFileError: only pickled weights, a missing or wrong hash, or an unreadable header.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}")
    files = weight_files(folder)
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise WeightFileError(
                f"{pickles[0]} is a pickle and xling loads only safetensors weights (a pickle can run code); "
                "convert the folder once: load it with transformers (a LoRA folder: peft) and "
                "save_pretrained(folder, safe_serialization=True)"
            )
        raise FileNotFoundError(f"no safetensors weights (model.safetensors) in {folder}")
    if root is not None:
        where = root / CONFIG_NAME
        table = recorded if isinstance(recorded, Mapping) else {}
        prefix = folder.relative_to(root).as_posix() + "/"
        for name in sorted(k for k in table if k.startswith(prefix)):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} is recorded in {where} but missing")
        for path in files:
            check_weight_file(
                path, table.get(path.relative_to(root).as_posix()), where, verify_hashes=verify_hashes
            )
    for path in files:
        if path.name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                raise WeightFileError(
                    f"{path} is not a readable safetensors file (truncated or corrupted): {e}"
                ) from e


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


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object ``path`` holds (a ``config.json``).

    Raises:
        ValueError: not valid UTF-8 JSON, or not an object; the message names the file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


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
    data = read_json_object(path)
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
    module: torch.nn.Module,
    directory: str | os.PathLike[str],
    file_info: dict[str, Any],
    *,
    verify_hashes: bool = True,
) -> None:
    """Load ``directory/model.safetensors`` into ``module`` strictly (keys and shapes must match).

    Args:
        module: the head to fill.
        directory: the head directory.
        file_info: the file-level keys of its ``config.json`` (:func:`read_head_config`).
        verify_hashes: require and compare the recorded SHA-256 (``False`` only for a hand-made folder).

    Raises:
        FileNotFoundError: no weights file.
        ValueError: no recorded checksum (:class:`WeightFileError`, with how to opt out) or a mismatch,
            unreadable (truncated / corrupted) file, missing or unexpected keys, or shape mismatches; the
            message names the file.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no head weights at {path}")
    check_weight_file(
        path, file_info.get("weights_sha256"), Path(directory) / CONFIG_NAME, verify_hashes=verify_hashes
    )
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a corrupt header
        raise WeightFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted): {e}"
        ) from e
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


def load_head(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    verify_hashes: bool = True,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> AdapterHead:
    """Load any head saved with ``save_pretrained``, dispatching on its config's ``head_type``.

    Args:
        name_or_path: a directory with ``config.json`` + ``model.safetensors``, or a Hub repo id holding one
            (``subfolder="head"`` for the head of an encoder repo), downloaded as
            :func:`xling.adapters.hub.resolve_pretrained` says; the download is checked like a local folder.
        device: where to put the loaded head (default CPU).
        verify_hashes: require the ``weights_sha256`` of ``config.json`` and compare the weights with it;
            ``False`` loads a hand-made folder that records none.
        revision: for a Hub id, the branch, tag or commit (default ``"main"``).
        subfolder: the head's folder inside the repo (or inside the local folder).
        cache_dir: for a Hub id, the cache (default ``HF_HUB_CACHE``).
        token: for a Hub id, the token of a private or gated repo.
        local_files_only: for a Hub id, read the cache only (as ``HF_HUB_OFFLINE=1`` does).
        force_download: for a Hub id, download the files again.

    Returns:
        An :class:`~xling.adapters.mlp.MLPAdapter`, :class:`~xling.adapters.mixer.MixerTranslator` or
        :class:`~xling.adapters.linear.LinearHead`, in eval mode.

    Raises:
        HubAdapterNotFoundError: a Hub id that cannot be found or is not cached while downloads are off.
        WeightFileError: the weights do not match their recorded SHA-256 (or record none).
    """
    from xling.adapters.head import head_class
    from xling.adapters.hub import is_hub_id, resolve_pretrained

    directory = resolve_pretrained(
        name_or_path,
        patterns=[WEIGHTS_NAME],
        revision=revision,
        subfolder=subfolder,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    config, file_info = read_head_config(directory)
    head = head_class(config.head_type)(config)
    try:
        load_state_into(head, directory, file_info, verify_hashes=verify_hashes)
    except WeightFileError as e:
        if not is_hub_id(name_or_path):
            raise
        raise WeightFileError(
            f"{e}. It is the cached download of the Hub repo {name_or_path!r} (revision "
            f"{revision or 'main'!r}): load it with force_download=True to download it again"
        ) from e
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
    width_key: str = "unet.config.cross_attention_dim",
    pooled_key: str | None = None,
) -> None:
    """Raise :class:`WidthMismatchError` listing every width of ``config`` that does not fit.

    Args:
        config: the head's config.
        cross_attention_dim: the denoiser's conditioning width the head's ``teacher_width`` must equal (a UNet's
            ``cross_attention_dim``, a PixArt / Sana transformer's ``caption_channels``, an SD3 / Flux
            transformer's ``joint_attention_dim``).
        pooled_width: the pooled width the pipeline expects (SDXL: ``text_encoder_2.config.projection_dim``;
            SD3 / Flux: ``transformer.config.pooled_projection_dim``).
        needs_pooled: the pipeline requires pooled embeds (SDXL, SD3, Flux); a head with no pooled output
            then fails.
        student_width: the student encoder's hidden size the head's ``student_width`` must equal.
        where: how the error names the other side (``"the pipeline"``, ``"the student"``).
        width_key: the config key ``cross_attention_dim`` was read from, named in the error
            (``"transformer.config.caption_channels"``, ``"transformer.config.joint_attention_dim"``).
        pooled_key: the config key ``pooled_width`` was read from, named in the error when given.
    """
    problems: list[str] = []
    if cross_attention_dim is not None and config.teacher_width != cross_attention_dim:
        problems.append(f"teacher_width {config.teacher_width} != {width_key} {cross_attention_dim}")
    pooled_from = f" ({pooled_key})" if pooled_key else ""
    if needs_pooled and config.pooled_width is None:
        problems.append(
            f"the head has no pooled output but {where} needs pooled_prompt_embeds of width {pooled_width}"
            + pooled_from
        )
    elif needs_pooled and pooled_width is not None and config.pooled_width != pooled_width:
        problems.append(
            f"pooled_width {config.pooled_width} != pooled width {pooled_width}{pooled_from} expected by {where}"
        )
    if student_width is not None and config.student_width != student_width:
        problems.append(f"student_width {config.student_width} != student hidden_size {student_width}")
    if problems:
        raise WidthMismatchError(
            f"{config.head_type} head ({config.teacher_family}) does not fit {where}: " + "; ".join(problems)
        )
