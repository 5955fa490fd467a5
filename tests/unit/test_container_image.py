"""The container image, checked without a container engine: what the Dockerfile runs exists and
parses, its dependencies are exact pins, and it runs as a pinned, non-root image."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from deployment_cleanup.cli import _parser
from tests.support.image import (
    DISTRIBUTION,
    DOCKERFILE,
    DOCKERIGNORE,
    REQUIREMENTS,
    base_images,
    exec_form,
    instructions,
    pinned,
    runtime_requirements,
)

FINAL_STAGE = max(i.stage for i in instructions())


def final(keyword: str) -> list[str]:
    return [i.arguments for i in instructions() if i.stage == FINAL_STAGE and i.keyword == keyword]


def test_entrypoint_is_the_packages_console_script() -> None:
    (entrypoint,) = final("ENTRYPOINT")
    command = exec_form(entrypoint)
    assert command == ["deployment-cleanup"]
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution(DISTRIBUTION).entry_points
        if ep.group == "console_scripts"
    }
    assert scripts[command[0]] == "deployment_cleanup.cli:main"


def test_console_script_runs_and_lists_the_operator_command() -> None:
    script = shutil.which("deployment-cleanup", path=str(Path(sys.executable).parent))
    assert script, "deployment-cleanup is not installed next to this Python"
    result = subprocess.run(
        [script, "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "operator" in result.stdout
    operator_help = subprocess.run(
        [script, "operator", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "--all-namespaces" in operator_help.stdout


def test_default_command_parses_as_an_operator_invocation() -> None:
    (cmd,) = final("CMD")
    args = _parser().parse_args(exec_form(cmd))
    assert args.command == "operator"
    assert args.all_namespaces


def test_final_stage_runs_as_the_charts_non_root_user() -> None:
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "USER must be numeric, so runAsNonRoot can verify it"
    assert int(uid) == 10001  # the chart's runAsUser
    assert gid == "" or int(gid) == 10001
    assert int(uid) != 0


def test_base_image_is_pinned_and_the_same_in_every_stage() -> None:
    images = base_images()
    assert len(images) == 2, "a builder stage and a final stage"
    assert len(set(images)) == 1, "the venv is copied across stages: same Python, same paths"
    (image,) = set(images)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image


def test_final_stage_has_no_build_tools_or_installer() -> None:
    final_runs = " ".join(final("RUN"))
    assert "pip uninstall" in final_runs
    assert not re.search(r"apt-get install|pip install|gcc|build-essential", final_runs)
    copies = final("COPY")
    assert copies == ["--from=builder /opt/deployment-cleanup /opt/deployment-cleanup"]


def test_builder_installs_exactly_the_pins_then_the_package_without_dependencies() -> None:
    runs = " ".join(i.arguments for i in instructions() if i.stage == 1 and i.keyword == "RUN")
    assert "--requirement requirements/operator.txt" in runs
    assert "--only-binary=:all:" in runs
    assert re.search(r"pip install --no-deps /wheels/\*\.whl", runs)
    assert "pip check" in runs


def test_every_requirement_is_an_exact_pin() -> None:
    pins = pinned()  # asserts the format of each line
    assert pins
    assert REQUIREMENTS.read_text().endswith("\n")


def test_pins_cover_exactly_the_runtime_dependencies() -> None:
    needed = set(runtime_requirements())
    pins = set(pinned())
    assert needed - pins == set(), "missing: regenerate with python -m tests.support.image"
    assert pins - needed == set(), "not needed at run time (a test tool?)"


def test_pins_satisfy_every_declared_version_range() -> None:
    pins = pinned()
    broken = [
        f"{name}=={pins[name]} vs {requirement}"
        for name, requirements in runtime_requirements().items()
        for requirement in requirements
        if not requirement.specifier.contains(Version(pins[name]), prereleases=True)
    ]
    assert broken == []


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "requirements/operator.txt", "operator/deployment_cleanup/"],
)
def test_build_context_keeps_what_the_dockerfile_copies(path: str) -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert "*" in lines  # everything else stays out of the context
    assert f"!{path}" in lines
    assert path.rstrip("/").split("/")[0] in DOCKERFILE.read_text()
