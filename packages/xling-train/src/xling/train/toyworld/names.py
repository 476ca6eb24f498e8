"""The word ``toy`` wherever a model or a corpus is named: the committed toy teacher, students and data."""

from __future__ import annotations

#: The word that means "the built-in toy world" for ``teacher``, ``student`` and ``data.path``.
TOY = "toy"

#: The toy world's second teacher, an SD3-family MMDiT (``toyworld.mmdit``).
TOY_MMDIT = "toy-mmdit"
#: Every name of a committed toy teacher: the UNet one (``toy``) and the MMDiT one.
TOY_TEACHERS: tuple[str, ...] = (TOY, TOY_MMDIT)

#: The committed toy students: ``student: toy`` is ``pretrained``; ``toy-random`` and ``toy-aligned`` the other
#: Chinese ones; ``toy-multilingual`` (MLM on every target language) and ``toy-multilingual-aligned`` read all.
TOY_STUDENTS: tuple[str, ...] = ("pretrained", "random", "aligned", "multilingual", "multilingual-aligned")


def is_toy_teacher(name: object) -> bool:
    """Whether ``name`` names a committed toy teacher (``"toy"`` or ``"toy-mmdit"``)."""
    return isinstance(name, str) and name in TOY_TEACHERS


def teacher_options(name: object) -> dict[str, object]:
    """What ``xling.core.Teacher.from_pretrained`` (and every pipeline call) needs beside the folder of
    teacher ``name``: the toy MMDiT's T5 length (``toyworld.mmdit.PIPELINE_KWARGS``); ``{}`` for any other."""
    if name == TOY_MMDIT:
        from xling.train.toyworld.mmdit import PIPELINE_KWARGS

        return dict(PIPELINE_KWARGS)
    return {}


def teacher_record(name: str) -> str:
    """How an adapter records the teacher ``name``: ``"toy"`` / ``"toy-mmdit"`` as is (its folder is inside the installed package),
    a local folder as an absolute path (the adapter may be used from another working directory), a Hub id as
    is."""
    from pathlib import Path

    if not is_toy_teacher(name) and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def resolve_teacher(name: str) -> str:
    """``"toy"`` / ``"toy-mmdit"`` -> the committed toy teacher's directory; anything else is a path or Hub id,
    returned as is."""
    if name == TOY:
        from xling.train.toyworld.teacher import teacher_path

        return str(teacher_path())
    if name == TOY_MMDIT:
        from xling.train.toyworld.mmdit import mmdit_teacher_path

        return str(mmdit_teacher_path())
    return name


def toy_student_variant(name: str) -> str | None:
    """``"toy"`` -> ``"pretrained"``, ``"toy-<variant>"`` -> ``"<variant>"``; ``None`` for any other student."""
    if name == TOY:
        return "pretrained"
    variant = name.removeprefix(f"{TOY}-")
    return variant if variant != name and variant in TOY_STUDENTS else None


def resolve_student(name: str) -> str:
    """A committed toy student (``"toy"``, ``"toy-random"``, ``"toy-multilingual"``, ...) -> its directory; anything else
    is a path or Hub id, returned as is."""
    variant = toy_student_variant(name)
    if variant is None:
        return name
    from xling.train.toyworld.student import student_path

    return str(student_path(variant))
