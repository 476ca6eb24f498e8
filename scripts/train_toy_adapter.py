"""Write the committed toy adapter ``toyworld/assets/adapter-iap/``: the one ``xling demo`` serves by default.

With ``--teacher toy-mmdit`` it writes ``toyworld/assets/adapter-iap-mmdit/`` from ``xling train iap --teacher
toy-mmdit`` instead, the adapter ``xling demo --teacher toy-mmdit`` serves.

It is the adapter the shipped toy config trains: ``xling train iap`` with no other option (the toy teacher,
the MLM-pretrained toy student, the ``toy:`` section of the shipped ``iap.yaml``: 300 steps, seed 0; about seven
minutes on two shared CPU cores, plus the end-of-run evaluation), run into a temporary folder, whose ``adapter/``
is then copied into the package::

    uv run python scripts/train_toy_adapter.py                  # trains, then replaces assets/adapter-iap/
    uv run python scripts/train_toy_adapter.py --out runs/adapter-iap --keep-run runs/iap-toy
    uv run xling train iap --output_dir runs/iap-toy && \
        uv run python scripts/train_toy_adapter.py --from-run runs/iap-toy   # package a run made by hand

The copy keeps every weight file byte for byte (so the SHA-256 that ``config.json`` and ``head/config.json``
record for them stay valid) and changes only those two JSON files: the student's folder they record (a path
of this machine, inside the installed package) becomes the name that means the same anywhere, ``toy`` (the
adapter holds the trained student's weights, so the name is a record, never loaded), and ``config.json``
records the recipe (``"recipe": "iap"``). The run's evaluation (``metrics.json``) is copied beside the adapter
as ``eval.json``, so the numbers the committed adapter reached stay on record and ``xling demo`` lists them.

The committed adapter was written with ``--from-run`` on a run of ``uv run xling train iap --output_dir RUN``
(training 7 minutes, the end-of-run evaluation 6 more, on two shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from xling.adapters.encoder import LanguageEncoder
from xling.train.cli import main as xling
from xling.train.demo import TOY_ADAPTER_DIR, TOY_MMDIT_ADAPTER_DIR
from xling.train.toyworld.names import TOY, TOY_MMDIT, TOY_STUDENTS, TOY_TEACHERS, resolve_student


def _portable(adapter: Path) -> None:
    """Replace the toy student's absolute folder in the adapter's and its head's ``config.json`` by its toy
    name (neither file is covered by a recorded hash: those are of the weight files)."""
    names = {str(Path(resolve_student(f"{TOY}-{v}")).resolve()): f"{TOY}-{v}" for v in TOY_STUDENTS}
    names[str(Path(resolve_student(TOY)).resolve())] = TOY  # the default student's shortest name wins
    for config_path, key in ((adapter / "config.json", "encoder"), (adapter / "head" / "config.json", None)):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        record = config[key] if key else config
        student = record.get("student_model") or ""
        if student in names:
            record["student_model"] = names[student]
        elif Path(student).is_absolute():
            raise SystemExit(f"{config_path} records a local student {student}; it would not exist elsewhere")
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    card = adapter / "README.md"  # a model card, where save_pretrained writes one: text, not hashed
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
            text = text.replace(path, name)
        card.write_text(text, encoding="utf-8")


def _check_portable(adapter: Path, *roots: Path) -> None:
    """Refuse to write an adapter whose text files still name a folder of this machine."""
    for path in sorted(adapter.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".md", ".txt", ".yaml"}:
            text = path.read_text(encoding="utf-8")
            for root in roots:
                if str(root) in text:
                    raise SystemExit(f"{path} names {root}, a folder of this machine; it cannot be committed")


def _check_run(run: Path, teacher: str = TOY) -> str:
    """The run's recipe; a run of another recipe, teacher or student than the toy IAP default is refused."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    expected = {"recipe": "iap", "teacher": teacher, "student": TOY}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        command = "xling train iap" + ("" if teacher == TOY else f" --teacher {teacher}")
        raise SystemExit(f"{run} is not a toy IAP run ({wrong}); train it with `{command}` alone")
    return str(config["recipe"])


def _record_recipe(adapter: Path, recipe: str) -> None:
    """``config.json["recipe"]``: what ``xling demo`` lists (the run folder's ``run.json`` is not copied)."""
    config_path = adapter / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("recipe", recipe)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Train (or take ``--from-run``) the toy IAP run and write its adapter to ``--out``; returns the status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=TOY_TEACHERS, default=TOY, help="the toy teacher (default: toy)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="adapter folder to write (default: the package asset of --teacher)",
    )
    parser.add_argument("--keep-run", type=Path, default=None, help="train into this run folder and keep it")
    parser.add_argument(
        "--from-run",
        type=Path,
        default=None,
        help="do not train: package this finished run of `xling train iap` (no other option given)",
    )
    args = parser.parse_args(argv)
    args.out = args.out or (TOY_MMDIT_ADAPTER_DIR if args.teacher == TOY_MMDIT else TOY_ADAPTER_DIR)

    with tempfile.TemporaryDirectory(prefix="xling-toy-adapter-") as tmp:
        if args.from_run is not None:
            run = args.from_run
        else:
            run = args.keep_run or Path(tmp) / "run"
            status = xling(
                ["train", "iap", "--teacher", args.teacher, "--output_dir", str(run), "--overwrite"]
            )
            if status:
                return status
        recipe = _check_run(run, args.teacher)
        staged = Path(tmp) / "adapter"
        shutil.copytree(run / "adapter", staged)
        _portable(staged)
        _record_recipe(staged, recipe)
        if (run / "metrics.json").is_file():
            shutil.copyfile(run / "metrics.json", staged / "eval.json")
        _check_portable(staged, Path(__file__).resolve().parents[1], run.resolve(), Path(tmp).resolve())
        LanguageEncoder.from_pretrained(staged)  # every recorded hash still matches, and it loads
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staged, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
