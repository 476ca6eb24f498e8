"""``xling import``: turn a checkpoint a paper's team released into an xling adapter directory.

Each source is one module here (listed in :data:`IMPORTERS` with the line ``xling import --help`` shows)
with ``convert(source, *, teacher, output, student)``, which reads the public state-dict layout
(key names and shapes as in the public code), checks it (:func:`~xling.train.importers.state.check_layout`
names the wrong key), builds the head with the settings that make it compute what the public model computes,
and writes the adapter with :meth:`xling.adapters.LanguageEncoder.save_pretrained` (so ``attach`` loads it).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = ["IMPORTERS", "get_importer", "import_checkpoint"]

#: Source name -> (module, what SRC is); the order is the one ``xling import --help`` lists.
IMPORTERS: dict[str, tuple[str, str]] = {
    "pea": ("xling.train.importers.pea", "PEA-Diffusion's MLP adapter (OPPO-Mente-Lab/PEA-Diffusion)"),
    "gluegen": ("xling.train.importers.gluegen", "GlueGen's GlueNet translator (salesforce/GlueGen)"),
    "altclip": ("xling.train.importers.altclip", "an AltCLIP text tower (FlagAI-Open/FlagAI, BAAI/AltCLIP)"),
}


def get_importer(name: str) -> ModuleType:
    """The module that converts checkpoints of source ``name``."""
    if name not in IMPORTERS:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(IMPORTERS)}")
    return importlib.import_module(IMPORTERS[name][0])


def import_checkpoint(
    name: str, source: str | Path, *, teacher: str, output: str | Path, student: str | None = None
) -> Path:
    """Convert the released checkpoint ``source`` of ``name`` into an adapter directory ``output``.

    Args:
        name: ``"pea"``, ``"gluegen"`` or ``"altclip"``.
        source: the released file or directory.
        teacher: the teacher the checkpoint was trained for (diffusers directory, Hub id or ``"toy"``).
        output: the adapter directory to write (must not exist or be empty).
        student: the student encoder the checkpoint was trained on, where the source does not hold it.

    Returns:
        The adapter directory.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty directory; choose another --output")
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    return get_importer(name).convert(source, teacher=teacher, output=output, student=student)
