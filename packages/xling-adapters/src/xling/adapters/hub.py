"""Hugging Face Hub repo ids wherever an adapter folder is accepted, and uploads of adapter folders.

:func:`resolve_pretrained` turns ``name_or_path`` into a local folder: a folder on disk is used as it is; anything
else is a Hub repo id, downloaded with ``huggingface_hub`` (``hf_hub_download`` for the top ``config.json``, then
``snapshot_download`` restricted by ``allow_patterns`` to the files this load reads) into the Hub cache, laid out as
``huggingface_hub`` lays it (``blobs/``, ``refs/``, ``snapshots/<commit>/``). The caller then runs the same checks
on that snapshot as on any local folder, so every weight file is compared with the SHA-256 its config records
after the download and before a tensor is read: a cached file changed on disk is refused, naming it.

Offline use is ``huggingface_hub``'s own: with ``HF_HUB_OFFLINE=1`` (its ``constants.HF_HUB_OFFLINE``, read at
call time) or ``local_files_only=True`` nothing is requested and the cached snapshot of the revision is used. A
failure raises :class:`HubAdapterNotFoundError` (a ``FileNotFoundError``) naming the repo id, the revision and
what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The keyword arguments every loader (``LanguageEncoder.from_pretrained``, ``load_head``, ``attach``) takes
#: for a Hub repo id; a local folder ignores them (but ``subfolder``).
HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")

Patterns = Sequence[str] | Callable[[Mapping[str, Any]], Sequence[str]]


class HubAdapterNotFoundError(FileNotFoundError):
    """An adapter named by a Hub repo id could not be found or fetched; the message names the repo id, the
    revision and the fix (repo not found, revision not found, offline with nothing cached)."""


def is_hub_id(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``name_or_path`` is read from the Hub: a ``name`` or ``namespace/name`` that is not on disk."""
    from xling.adapters.encoder import looks_like_local_path

    return isinstance(name_or_path, str) and not looks_like_local_path(name_or_path)


def _offline() -> bool:
    # Read at call time (not at import): a test or a caller may switch it after huggingface_hub was imported.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _where(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    rev = revision or "main"
    return f"Hub repo {repo_id!r} (revision {rev!r}" + (f", subfolder {subfolder!r})" if subfolder else ")")


def _translate(
    err: Exception, repo_id: str, revision: str | None, subfolder: str | None, local_files_only: bool
) -> HubAdapterNotFoundError | None:
    """The clear error for a ``huggingface_hub`` failure, or ``None`` when it is not one of the known cases."""
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo_id, revision, subfolder)
    if isinstance(err, RevisionNotFoundError):
        return HubAdapterNotFoundError(
            f"{where}: the repo exists but has no revision {revision or 'main'!r}; pass an existing branch, "
            "tag or commit as revision="
        )
    if isinstance(err, RepositoryNotFoundError):  # GatedRepoError included
        return HubAdapterNotFoundError(
            f"{where}: no local folder {repo_id!r} exists and the Hub has no repo of that id you can read (it "
            "does not exist, or it is private or gated); check the id, pass token= (or log in with "
            "`hf auth login`), or pass the adapter's local folder"
        )
    if isinstance(err, RemoteEntryNotFoundError):
        target = f"{subfolder}/config.json" if subfolder else "config.json"
        return HubAdapterNotFoundError(
            f"{where} has no {target}, so it is not an xling adapter folder; pass subfolder= if the adapter "
            "lies in a folder of the repo"
        )
    if isinstance(err, LocalEntryNotFoundError):
        if local_files_only:
            why = "local_files_only=True"
            fix = "load it once without local_files_only"
        elif _offline():
            why = "HF_HUB_OFFLINE is set"
            fix = "unset HF_HUB_OFFLINE (or set it to 0) and load it once with network access"
        else:
            why = "the Hub could not be reached"
            fix = "check the network (or HF_ENDPOINT) and retry"
        return HubAdapterNotFoundError(
            f"no local folder {repo_id!r} exists, and the {where} is not (completely) in the Hub cache while "
            f"{why}: {fix}, pass cache_dir= where it was downloaded before, or pass the adapter's local folder"
        )
    return None


def resolve_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    patterns: Patterns,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """The local folder ``name_or_path`` names: itself on disk, or the cached Hub snapshot of a repo id.

    Args:
        name_or_path: a folder (``RUN/adapter``) or a Hub repo id (``"org/name"``; see
            :func:`~xling.adapters.encoder.looks_like_local_path`).
        patterns: the files of the folder a load reads (globs relative to the folder, ``"head/*"``), or a
            function of the folder's ``config.json`` returning them (it is downloaded first), so that a student
            the load does not read is never downloaded.
        revision: branch, tag or commit of the repo (default ``"main"``).
        subfolder: the adapter's folder inside the repo (or inside ``name_or_path`` on disk).
        cache_dir: the Hub cache (default ``huggingface_hub``'s, ``HF_HUB_CACHE``).
        token: a Hub token (``None``: the one ``huggingface_hub`` finds, if any; ``False``: none).
        local_files_only: read the cache only, never the network (as ``HF_HUB_OFFLINE=1`` does).
        force_download: download every file again, replacing the cached copies.

    Returns:
        The folder (for a repo id, ``<cache>/models--org--name/snapshots/<commit>[/subfolder]``).

    Raises:
        HubAdapterNotFoundError: the repo, its revision or its ``config.json`` does not exist, or downloads are
            off (``HF_HUB_OFFLINE``, ``local_files_only``) or failed and the cache lacks the files; the message
            names the repo id, the revision and what to do.
        ValueError: ``force_download`` while downloads are off.
    """
    if not is_hub_id(name_or_path):
        folder = Path(name_or_path).expanduser()
        return folder / subfolder if subfolder else folder
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = str(name_or_path)
    sub = subfolder.strip("/") if subfolder else None
    # huggingface_hub checks its offline flag per request; passing it on also skips the HEAD calls it would
    # attempt (and refuse) first, so an offline load makes no request at all.
    offline = local_files_only or _offline()
    if force_download and offline:
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        raise ValueError(f"force_download=True needs the network to fetch {repo_id!r} again, but {why}")
    common: dict[str, Any] = {
        "revision": revision,
        "cache_dir": os.fspath(cache_dir) if cache_dir is not None else None,
        "token": token,
        "local_files_only": offline,
        "force_download": force_download,
        "library_name": "xling",
    }
    try:
        if callable(patterns):
            config_file = hf_hub_download(repo_id, "config.json", subfolder=sub, **common)
            try:
                config = json.loads(Path(config_file).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(
                    f"{config_file} ({_where(repo_id, revision, sub)}) is not valid JSON: {e}"
                ) from e
            wanted = list(patterns(config if isinstance(config, Mapping) else {}))
        else:
            wanted = list(patterns)
        allow = [f"{sub}/{p}" if sub else p for p in ["config.json", *wanted]]
        snapshot = snapshot_download(repo_id, allow_patterns=allow, **common)
    except Exception as err:
        clear = _translate(err, repo_id, revision, sub, local_files_only)
        if clear is None:
            raise
        raise clear from err
    folder = Path(snapshot)
    return folder / sub if sub else folder


def require_online(repo_id: str) -> None:
    """Refuse an upload while ``HF_HUB_OFFLINE`` is set, before anything is saved or sent.

    Raises:
        ConnectionError: offline mode is on; the message names the repo and the variable.
    """
    if _offline():
        raise ConnectionError(
            f"cannot push to the Hub repo {repo_id!r}: HF_HUB_OFFLINE is set; unset it (or set it to 0) to upload"
        )


def upload_adapter(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload an adapter folder to the Hub repo ``repo_id`` (created if missing), as one commit.

    The conventions of transformers' ``PushToHubMixin``: ``create_repo(exist_ok=True)``, a branch ``revision``
    created from the default branch when it does not exist, and ``create_pr`` opening a pull request instead of
    committing to the branch.

    Args:
        folder: the adapter folder (``save_pretrained`` output).
        repo_id: ``"org/name"``.
        commit_message: default ``"Upload xling adapter"``.
        private: visibility of a newly created repo (``None``: the Hub's default).
        token: a Hub token with write access (``None``: the one ``huggingface_hub`` finds).
        revision: the branch to commit to (default: the repo's default branch).
        create_pr: open a pull request with the upload.

    Returns:
        ``huggingface_hub``'s ``CommitInfo``: ``commit_url``, ``oid``, ``repo_url``, ``pr_url``.
    """
    from huggingface_hub import HfApi

    require_online(repo_id)
    api = HfApi(token=token, library_name="xling")
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message or "Upload xling adapter",
        revision=revision,
        create_pr=create_pr,
    )
