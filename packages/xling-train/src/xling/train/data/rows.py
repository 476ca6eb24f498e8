"""From a path to a corpus (:func:`load_corpus`), and from a recipe config to the rows a run trains on
(:func:`load_rows`).

Which reader a path gets is decided once, here: table files (``.jsonl``, ``.csv``, ``.tsv``,
``.parquet``) give a map-style :class:`~xling.train.data.ParallelCorpus`, tar shards (or a brace pattern of
them) a streamed :class:`~xling.train.data.TarShardCorpus`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import IterableDataset, Subset

from xling.train.data.corpus import ColumnMap, ParallelCorpus, column_names, columns_from, did_you_mean
from xling.train.data.errors import BAD_UTF8, OnBadRow
from xling.train.data.images import CropPolicy
from xling.train.data.shards import TarShardCorpus
from xling.train.toyworld.names import TOY, is_toy_teacher

if TYPE_CHECKING:
    from xling.train.config import RecipeConfig

__all__ = ["load_corpus", "load_rows"]

logger = logging.getLogger(__name__)

#: Suffixes of the table files a directory is searched for (``.json`` is read only when named).
_DIRECTORY_TABLES = (".jsonl", ".csv", ".tsv", ".parquet")


def _is_tar(path: str) -> bool:
    """Whether ``path`` names a tar shard or a brace pattern of shards (``shard-{000000..000009}.tar``)."""
    return path.endswith((".tar", ".tar.gz", ".tgz")) or "{" in path


def _corpus_files(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The files (or brace patterns) ``path`` stands for: itself, the list, or a directory's table files
    (sorted), else its tar shards when it holds no table file."""
    paths = [os.fspath(path)] if isinstance(path, str | os.PathLike) else [os.fspath(p) for p in path]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = Path(paths[0])
        tables = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in _DIRECTORY_TABLES)
        paths = tables or sorted(str(p) for p in folder.iterdir() if _is_tar(str(p)))
        if not paths:
            held = sorted(p.name for p in folder.iterdir())
            holds = (
                f"it holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}" if held else "it is empty"
            )
            json_files = [name for name in held if name.lower().endswith(".json")]
            hint = (
                f"; a .json file is read only when named, as one JSON object per line: --data {folder / json_files[0]}"
                if json_files
                else ""
            )
            raise FileNotFoundError(
                f"no corpus files (.jsonl, .csv, .tsv, .parquet, .tar) in {folder}: {holds}{hint}"
            )
    return paths


def _streams(paths: Sequence[str]) -> bool:
    """Whether ``paths`` open as tar shards (streamed); mixing shards and table files is an error."""
    if all(_is_tar(p) for p in paths):
        return True
    if any(_is_tar(p) for p in paths):
        raise ValueError(f"cannot mix tar shards and table files in one corpus: {paths}")
    return False


def load_corpus(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    columns: ColumnMap | Mapping[str, str | None] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    on_bad_row: OnBadRow = "skip",
    resolution: int | None = None,
    crop: CropPolicy = "center",
    seed: int = 0,
    with_images: bool | None = None,
    **kwargs: object,
) -> ParallelCorpus | TarShardCorpus:
    """Open a parallel corpus, choosing the reader from the path.

    ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` files (or a list of them) give a map-style
    :class:`ParallelCorpus`; ``.tar`` shards or a brace pattern (``shard-{000000..000009}.tar``) give a
    streamed :class:`TarShardCorpus`; a directory gives the table files in it (sorted), or its tar
    shards when it holds no table file. Items carry ``image`` ``[3, R, R]`` in [-1, 1] when
    ``resolution`` is given (see the corpus classes).

    Args:
        path: A file, a brace pattern, a directory, or a list of files.
        columns: A :class:`ColumnMap` or a mapping such as ``{"en": "english", "target": "chinese"}``.
        image_root: Folder for relative image paths (table files only).
        on_bad_row: ``"skip"`` (count, see ``.report``) or ``"fail"`` (raise :class:`DataError`).
        resolution: Load images at this size (the teacher's resolution); ``None``: text only.
        crop: ``"center"`` or ``"random"`` (seeded per row).
        seed: Seed of random crops (and of the shard order for tar shards).
        with_images: Require images (``True``), ignore them (``False``), or decide from the data (``None``).
        **kwargs: Passed on to the corpus class (e.g. ``verify_images``, ``shuffle_buffer``,
            ``min_image_size``).

    Returns:
        The corpus.

    Raises:
        FileNotFoundError: a directory holds no corpus file, or a file is missing.
        ValueError: tar shards and table files are mixed.
    """
    column_map = columns_from(columns)
    paths = _corpus_files(path)
    # Both readers take the same options; only table files have an image root.
    options: dict[str, Any] = {
        "columns": column_map,
        "on_bad_row": on_bad_row,
        "resolution": resolution,
        "crop": crop,
        "seed": seed,
        "with_images": with_images,
        **kwargs,
    }
    if _streams(paths):
        return TarShardCorpus(paths, **options)
    return ParallelCorpus(paths, image_root=image_root, **options)


def load_rows(
    config: RecipeConfig,
    *,
    resolution: int | None,
    with_images: bool,
    with_english: bool = True,
    teacher: Any | None = None,
    accelerator: Any | None = None,
) -> tuple[Any, Any]:
    """``(train_rows, val_rows)``: the toy world's generated pairs, or a corpus file whose first
    ``min(val_samples, 10%)`` rows are held out; with ``data.latent_cache`` / ``data.embedding_cache`` (and a
    ``teacher``) the rows carry cached latents / teacher embeddings, built once on the main process.

    Args:
        config: The recipe config; ``config.data`` names the corpus, its columns, caches, image size
            (``data.resolution``, which wins over ``resolution``) and crop (``data.crop``).
        resolution: Image size ``R`` of the rows' ``image`` ``[3, R, R]`` (the teacher's); the toy world
            uses 32 when ``None``.
        with_images: Whether the recipe needs images (else the image column is ignored).
        with_english: Whether the recipe reads the English captions; ``False`` (``denoise``) reads no English
            column, so a corpus of target captions (and images) alone is enough.
        teacher: The frozen teacher, needed to build the caches.
        accelerator: The run's ``accelerate.Accelerator``: tar shards are split by its process index, and
            the caches are built on the main process first.

    Returns:
        Map-style training and validation rows, or a streamed corpus and ``None`` for tar shards.

    Raises:
        ValueError: a cache is asked for tar shards; ``data.path`` is unset for a real teacher; no row is
            usable because a column the recipe needs is in no row of a file (the message names both, the
            file's columns and the closest one); a file holds no row or is not readable (see the corpora).
    """
    data = config.data
    # The config's own image size wins: a user may train below (or above) the teacher's native resolution.
    resolution = data.resolution if data.resolution is not None else resolution
    if data.path is None and not is_toy_teacher(config.teacher):
        from xling.train.config import validate

        validate(config, needs_data=True)  # raises, naming the --data fix
    if data.path in (None, TOY):
        from xling.train.toyworld import ToyWorldDataset

        # Training pairs come from the training scenes; validation from the held-out combinations.
        size = int(resolution or 32)
        return (
            ToyWorldDataset(
                "train",
                size=size,
                seed=config.seed,
                length=data.num_samples,
                pair_fraction=data.pair_fraction,
                languages=config.language,
            ),
            ToyWorldDataset(
                "heldout",
                size=size,
                seed=config.seed + 1,
                length=max(1, data.val_samples),
                pair_fraction=data.pair_fraction,
                languages=config.language,
            ),
        )
    streamed_kwargs: dict[str, Any] = {}
    if accelerator is not None and _streams(_corpus_files(data.path)):
        # Each process reads its own shards; a map-style corpus is split by the batch sampler instead.
        streamed_kwargs = {"rank": accelerator.process_index, "world_size": accelerator.num_processes}
    corpus = load_corpus(
        data.path,
        columns={
            "en": data.en_column if with_english else None,
            "target": data.zh_column,
            "image": data.image_column if with_images else None,
            "culture_only": data.culture_column if getattr(config, "hybrid", False) else None,
        },
        on_bad_row=data.on_bad_row,
        resolution=resolution if with_images else None,
        crop=data.crop,
        seed=config.seed,
        with_images=with_images,
        min_image_size=getattr(data, "min_image_size", None),
        **streamed_kwargs,
    )
    if isinstance(corpus, ParallelCorpus):
        # Streamed shards are counted as they are read; the run's end reports both (xling.train.loop).
        if corpus.report.total:
            logger.warning("%s", corpus.accounting().summary())
        if not corpus.rows:
            _raise_missing_columns(corpus, data.path)
    if isinstance(corpus, IterableDataset):
        if data.latent_cache or data.embedding_cache:
            raise ValueError("data.latent_cache / data.embedding_cache need a table corpus, not tar shards")
        return corpus, None
    if (data.latent_cache or data.embedding_cache) and teacher is not None:
        corpus = _cached(corpus, config, teacher, accelerator, with_images=with_images)
    n_val = min(data.val_samples, max(0, len(corpus) // 10))
    return Subset(corpus, range(n_val, len(corpus))), Subset(corpus, range(n_val))


def _raise_missing_columns(corpus: ParallelCorpus, path: str) -> None:
    """Name the column and file behind a corpus with no usable row, when a needed column is in none of a file's
    rows (a wrong ``--data.en_column`` / ``--data.zh_column`` / ``--data.image_column``, or a file of the wrong
    language), with the columns the file has and the closest one; else give the row accounting."""
    columns = corpus.columns
    needed = [(columns.target, "data.zh_column"), (columns.en, "data.en_column")]
    needed += [(columns.image, "data.image_column")] if any(corpus.with_images.values()) else []
    for name, option in needed:
        if name is None:
            continue
        for file in corpus.paths:
            present = column_names(file)
            if name not in present:
                raise ValueError(
                    f"{file} has no column {name!r} ({option}), which this recipe reads; its columns are "
                    f"{', '.join(map(repr, present)) or 'none'}{did_you_mean(name, present)}; name the column "
                    f"with --{option} NAME"
                )
    summary = corpus.accounting().summary()
    hint = ""
    if corpus.report.counts.get(BAD_UTF8, 0) == corpus.report.total:
        hint = "; every row has bytes that are not UTF-8: convert the file (e.g. from GB18030) to UTF-8"
    raise ValueError(f"no usable row in {path}: {summary}{hint}")


def _cached(
    corpus: Any, config: RecipeConfig, teacher: Any, accelerator: Any | None, *, with_images: bool
) -> Any:
    """Wrap ``corpus`` in ``xling.train.cache.CachedDataset`` with the caches ``config.data`` names."""
    from contextlib import nullcontext

    from xling.train.cache import CachedDataset, LatentCache, TextEmbeddingCache

    first = accelerator.main_process_first() if accelerator is not None else nullcontext()
    latents = text = None
    with first:
        if config.data.latent_cache and with_images:
            latents = LatentCache.load_or_build(config.data.latent_cache, corpus, teacher)
            logger.info("latent cache %s: %s", config.data.latent_cache, latents.status)
        # No English column (a recipe that never reads English): there is nothing for the teacher to encode.
        if config.data.embedding_cache and corpus.columns.en is not None:
            text = TextEmbeddingCache.load_or_build(
                config.data.embedding_cache, corpus.captions("en"), teacher
            )
            logger.info("teacher-embedding cache %s: %s", config.data.embedding_cache, text.status)
    return CachedDataset(corpus, latents=latents, text=text)
