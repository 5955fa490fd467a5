"""The container image's inputs: the Dockerfile's instructions and the operator's runtime
dependencies as installed in this environment.

``python -m tests.support.image`` prints requirements/operator.txt for the current venv.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
REQUIREMENTS = REPO / "requirements" / "operator.txt"
DISTRIBUTION = "deployment-cleanup"
IMAGE_EXTRAS = frozenset({"postgres", "operator"})

HEADER = """\
# Exact pins of the operator's runtime dependencies: deployment-cleanup[postgres,operator] and
# everything they pull in, nothing else. The container image (Dockerfile) installs exactly these,
# then the package itself with --no-deps, and runs `pip check`.
#
# Regenerate from a venv where the tests pass (the project installed with its extras):
#   .venv/bin/python -m tests.support.image > requirements/operator.txt
# tests/unit/test_container_image.py fails when a runtime dependency is missing here, when a
# line is not an exact `==` pin, or when a pin breaks a declared version range.
"""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # 0 for instructions before the first FROM


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    stage = 0
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment between continuation lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, arguments.strip(), stage))
    return result


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) form; shell form is refused (it would run through sh)."""
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return [str(v) for v in value]


def build_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM."""
    found: dict[str, str] = {}
    for instruction in instructions(path):
        if instruction.keyword == "ARG" and instruction.stage == 0:
            name, _, default = instruction.arguments.partition("=")
            found[name] = default
    return found


def base_images(path: Path = DOCKERFILE) -> list[str]:
    """The image of each stage, with ARG defaults substituted."""
    args = build_args(path)
    images = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            image = shlex.split(instruction.arguments)[0]
            images.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], image))
    return images


def _requirements_of(name: str, extras: frozenset[str]) -> list[Requirement]:
    requirements = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            requirements.append(requirement)
    return requirements


def runtime_requirements() -> dict[NormalizedName, list[Requirement]]:
    """Every distribution deployment-cleanup[postgres,operator] needs at run time, here, with
    the requirements that pulled it in (their version ranges)."""
    found: dict[NormalizedName, list[Requirement]] = {}
    extras_seen: dict[NormalizedName, frozenset[str]] = {}
    queue: list[tuple[str, frozenset[str]]] = [(DISTRIBUTION, IMAGE_EXTRAS)]
    while queue:
        name, extras = queue.pop()
        for requirement in _requirements_of(name, extras):
            key = canonicalize_name(requirement.name)
            found.setdefault(key, []).append(requirement)
            wanted = frozenset(requirement.extras)
            if key in extras_seen and wanted <= extras_seen[key]:
                continue
            extras_seen[key] = extras_seen.get(key, frozenset()) | wanted
            queue.append((requirement.name, wanted))
    return found


def pinned(path: Path = REQUIREMENTS) -> dict[NormalizedName, str]:
    """requirements/operator.txt as {name: version}; every line must be ``name==version``."""
    pins: dict[NormalizedName, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def lock_file() -> str:
    """requirements/operator.txt as it should be for the packages installed here."""
    lines = []
    for key in sorted(runtime_requirements()):
        distribution = importlib.metadata.distribution(key)
        lines.append(f"{distribution.metadata['Name']}=={distribution.version}")
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(lock_file(), end="")
