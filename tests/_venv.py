"""Fresh virtual environments for the "installs alone" checks.

A package is installed from its source directory into an empty venv, the way ``pip install packages/X``
would, with every version pinned to the committed ``uv.lock`` (exported as constraints). Constraints pin
versions without adding packages, so what lands in the venv is exactly what the package's own metadata
pulls in, and uv takes the wheels from its cache instead of downloading them again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

#: Never pulled in by an installation of xling-losses or xling-adapters (triton only through torch itself).
FORBIDDEN = ("accelerate", "triton", "xling-core", "xling-kernels", "xling-train")

_DISTRIBUTIONS = """
import json
from importlib import metadata
print(json.dumps({d.metadata["Name"]: d.requires or [] for d in metadata.distributions()}))
"""


def uv() -> str:
    """Path of the ``uv`` executable: the one that launched ``uv run pytest`` (it exports ``UV``), else PATH's."""
    found = os.environ.get("UV") or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is not on PATH; install it with `pip install uv`")
    return found


def make_venv(directory: Path) -> Path:
    """Create an empty venv at ``directory`` on this interpreter's Python version; return its python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([uv(), "venv", "--quiet", "--python", version, str(directory)], check=True)
    return directory / "bin" / "python"


def install(python: Path, *requirements: str, workdir: Path) -> None:
    """Install ``requirements`` (paths with optional extras) into the venv of ``python``, pinned to uv.lock."""
    constraints = workdir / "constraints.txt"
    exported = subprocess.run(
        [uv(), "export", "--frozen", "--no-hashes", "--no-emit-workspace", "--all-packages", "--all-extras"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    constraints.write_text(exported)
    env = {**os.environ, "VIRTUAL_ENV": str(python.parent.parent)}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    subprocess.run(
        [uv(), "pip", "install", "--quiet", "--python", str(python), "-c", str(constraints), *requirements],
        cwd=ROOT,
        check=True,
        env=env,
    )


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def distributions(python: Path) -> dict[str, list[str]]:
    """Installed distributions of a venv -> the requirements that apply (markers true, no extra).

    The venv only reports raw metadata (it may have no ``packaging``); markers are evaluated here, which is
    right because the venv runs this interpreter's version on this platform.
    """
    raw = json.loads(run(python, _DISTRIBUTIONS, cwd=python.parent))
    graph = {}
    for name, requires in raw.items():
        reqs = [Requirement(line) for line in requires]
        graph[_norm(name)] = [
            _norm(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})
        ]
    return graph


def pulled_by(graph: dict[str, list[str]], root: str, *, stop_at: tuple[str, ...] = ()) -> set[str]:
    """Every distribution reachable from ``root`` in ``graph``, not walking through ``stop_at``."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in graph:
            continue
        seen.add(name)
        if name not in stop_at:
            todo.extend(graph[name])
    return seen


def run(python: Path, code: str, *, cwd: Path) -> str:
    """Run ``code`` in the venv (outside the repository, so nothing is imported from the source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise AssertionError(f"script failed in the fresh venv:\n{result.stdout}\n{result.stderr}")
    return result.stdout
