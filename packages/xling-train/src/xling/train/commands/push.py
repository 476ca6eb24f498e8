"""``xling push RUN_DIR REPO_ID``: upload a trained adapter, with its model card, to the Hugging Face Hub.

RUN_DIR is a run folder (the output of ``xling train``: its ``adapter/`` is pushed, with a card carrying the run's
recipe, config, evaluation tables and grid) or an adapter folder (inside a run folder it gets the run's card too).
The adapter is loaded first, so its weight files are checked against their recorded SHA-256 before anything is
uploaded; then it is saved again with the card into a temporary folder and uploaded as one commit. Prints the
commit URL (and the pull request's with ``--create-pr``). The token is ``--token``, else ``HF_TOKEN`` or the one
``hf auth login`` stored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``xling push``."""
    parser = subparsers.add_parser(
        "push",
        help="upload a trained adapter and its model card to the Hugging Face Hub",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder or an adapter folder")
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="the Hub repo to push to, 'org/name' (created if missing)"
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument(
        "--revision", default=None, metavar="R", help="the branch to commit to (created from main if missing)"
    )
    parser.add_argument("--commit-message", default=None, metavar="M", help="default 'Upload xling adapter'")
    parser.add_argument("--token", default=None, metavar="T", help="a Hub token with write access")
    parser.add_argument(
        "--include-student",
        action="store_true",
        help="upload a frozen (or a LoRA adapter's base) student too, so the repo loads anywhere",
    )
    parser.add_argument(
        "--license",
        default=None,
        metavar="L",
        help="the card's license (default: apache-2.0 for the toy teacher, 'other' otherwise: the teacher's "
        "license applies)",
    )
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.set_defaults(func=_run)


def adapter_and_run(path: Path) -> tuple[Path, Path | None]:
    """``(adapter folder, run folder or None)`` of ``path``, a run folder or an adapter folder.

    Raises:
        FileNotFoundError: ``path`` does not exist, is a run folder without ``adapter/`` (the run has not saved
            one yet), or is neither a run folder nor an adapter folder.
    """
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist or is not a folder; pass a run folder or an adapter folder"
        )
    if (path / "config.json").is_file():
        run = path.parent
        return path, run if (run / "config.yaml").is_file() and (run / "adapter") == path else None
    if (path / "adapter" / "config.json").is_file():
        return path / "adapter", path
    if (path / "config.yaml").is_file() or (path / "run.json").is_file():
        raise FileNotFoundError(
            f"{path} is a run folder without an adapter ({path / 'adapter'} is missing): the run saves it at its "
            "first checkpoint and at the end; push again once it has"
        )
    raise FileNotFoundError(
        f"{path} is neither a run folder (no adapter/) nor an adapter folder (no config.json); pass the output "
        "folder of `xling train` or its adapter/"
    )


def _run(args: argparse.Namespace) -> int:
    import yaml

    from xling.adapters import LanguageEncoder, ModelCardFacts
    from xling.train.recipes.base import adapter_card

    adapter, run = adapter_and_run(args.run_dir)
    if run is not None:
        config_path = run / "config.yaml"
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{config_path} is not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a mapping, got {type(config).__name__}")
        card = adapter_card(config, run)
    else:
        card = ModelCardFacts()
    encoder = LanguageEncoder.from_pretrained(adapter)
    # A folder that holds its student (the toy student always, a trained one always) is pushed with it, so
    # the repo is as self-contained as the folder.
    layout = json.loads((adapter / "config.json").read_text(encoding="utf-8")).get("layout") or {}
    info = encoder.push_to_hub(
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
        include_student=args.include_student or bool(layout.get("student")),
        card=card,
        license=args.license,
    )
    print(f"pushed {adapter} to {args.repo_id}: {info}")
    if getattr(info, "pr_url", None):
        print(f"pull request: {info.pr_url}")
    return 0
