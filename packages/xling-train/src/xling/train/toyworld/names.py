"""The word ``toy`` wherever a model or a corpus is named: the committed toy teacher, students and data."""

from __future__ import annotations

#: The word that means "the built-in toy world" for ``teacher``, ``student`` and ``data.path``.
TOY = "toy"

#: The committed toy students: ``student: toy`` is ``pretrained``; ``toy-random`` and ``toy-aligned`` the others.
TOY_STUDENTS: tuple[str, ...] = ("pretrained", "random", "aligned")


def teacher_record(name: str) -> str:
    """How an adapter records the teacher ``name``: ``"toy"`` as is (its folder is inside the installed package),
    a local folder as an absolute path (the adapter may be used from another working directory), a Hub id as
    is."""
    from pathlib import Path

    if name != TOY and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def resolve_teacher(name: str) -> str:
    """``"toy"`` -> the committed toy teacher's directory; anything else is a path or Hub id, returned as is."""
    if name == TOY:
        from xling.train.toyworld.teacher import teacher_path

        return str(teacher_path())
    return name


def toy_student_variant(name: str) -> str | None:
    """``"toy"`` -> ``"pretrained"``, ``"toy-<variant>"`` -> ``"<variant>"``; ``None`` for any other student."""
    if name == TOY:
        return "pretrained"
    variant = name.removeprefix(f"{TOY}-")
    return variant if variant != name and variant in TOY_STUDENTS else None


def resolve_student(name: str) -> str:
    """A committed toy student (``"toy"``, ``"toy-random"``, ``"toy-aligned"``) -> its directory; anything else
    is a path or Hub id, returned as is."""
    variant = toy_student_variant(name)
    if variant is None:
        return name
    from xling.train.toyworld.student import student_path

    return str(student_path(variant))
