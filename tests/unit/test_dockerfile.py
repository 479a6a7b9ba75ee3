"""Static checks of the Dockerfile and .dockerignore (no Docker engine runs here).

A small parser reads the Dockerfile into stages of (instruction, arguments) and the tests
check the properties the image must have: a pinned slim Python base, wheels built in the
first stage, a final stage that installs only those wheels and has no build tools, the
numeric non-root user, the entrypoint and the OCI labels.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import canaryd
from canaryd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PINNED_BASE = re.compile(r"^(docker\.io/(library/)?)?python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "cc ", "clang", "git", "curl", "wget")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((buf + line).strip())
        buf = ""
    if buf:
        out.append(buf.strip())
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        rest = rest.strip()
        if instr == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert instr == "ARG", f"only ARG may come before the first FROM, got {instr}"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instr, rest))
    return global_args, stages


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec (JSON) form: {value}"
    return parsed


def _labels(stage: Stage) -> dict[str, str]:
    labels: dict[str, str] = {}
    for rest in stage.args("LABEL"):
        for word in shlex.split(rest):
            key, _, value = word.partition("=")
            labels[key] = value
    return labels


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    assert DOCKERFILE.is_file(), "Dockerfile missing at the repository root"
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


def test_parser_handles_continuations() -> None:
    _args, stages = parse("ARG B=x:1\nFROM ${B} AS a\n# c\nRUN echo 1 \\\n  # inner\n  && echo 2\n")
    assert stages[0].base == "x:1" and stages[0].name == "a"
    [(instr, rest)] = stages[0].instructions
    assert instr == "RUN" and rest.split() == ["echo", "1", "&&", "echo", "2"]


def test_multi_stage_with_pinned_slim_python(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2, "build and runtime stages expected"
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue  # FROM an earlier stage
        assert PINNED_BASE.match(stage.base), f"base {stage.base!r} is not a pinned python:3.11.x-slim-bookworm"
        assert ":latest" not in stage.base


def test_first_stage_builds_wheels(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    build = dockerfile[1][0]
    assert build.name, "the build stage needs a name to copy/mount from"
    assert any(re.search(r"\bpip wheel\b", r) and "--wheel-dir" in r for r in build.args("RUN"))


def test_final_stage_installs_only_built_wheels(dockerfile: tuple[dict[str, str], list[Stage]], final: Stage) -> None:
    build = dockerfile[1][0]
    runs = " ".join(final.args("RUN"))
    assert "pip install" in runs
    assert "--no-index" in runs, "the final stage must install from the built wheels only"
    assert f"from={build.name}" in runs or any(f"--from={build.name}" in c for c in final.args("COPY"))
    assert "pip wheel" not in runs
    assert "apt-get install" not in runs and "apk add" not in runs
    for tool in BUILD_TOOLS:
        assert tool not in runs, f"build tool {tool!r} in the final stage"
    assert not final.args("ADD"), "use COPY, not ADD"


def test_final_stage_drops_pip(final: Stage) -> None:
    runs = " ".join(final.args("RUN"))
    assert re.search(r"pip uninstall -y pip\b", runs)


def test_runs_as_numeric_non_root_user(final: Stage) -> None:
    users = final.args("USER")
    assert users, "final stage has no USER"
    user = users[-1]
    assert re.fullmatch(r"65532(:65532)?", user), f"USER {user!r}: use the numeric 65532"
    last_user = max(i for i, (instr, _) in enumerate(final.instructions) if instr == "USER")
    assert all(instr != "RUN" for instr, _ in final.instructions[last_user:]), "RUN after USER"


def test_entrypoint_and_cmd(final: Stage) -> None:
    assert _exec_form(final.args("ENTRYPOINT")[-1]) == ["canaryd"]
    assert _exec_form(final.args("CMD")[-1]) == ["run"]


def test_exposes_the_http_port(final: Stage) -> None:
    assert str(Settings.model_fields["http_port"].default) in " ".join(final.args("EXPOSE"))


def test_oci_labels(final: Stage) -> None:
    labels = _labels(final)
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key} missing"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default_version = next(a.partition("=")[2] for a in final.args("ARG") if a.startswith("VERSION="))
    assert project["dynamic"] == ["version"]  # one place: canaryd.__version__
    assert default_version == canaryd.__version__
    assert labels["org.opencontainers.image.licenses"] == project["license"]


# --- .dockerignore ------------------------------------------------------------------------


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                rx += ".*"
                i += 2
            elif pattern[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(rx + "$")))
    return rules


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches too."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, rx in _ignore_rules():
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_the_context_small() -> None:
    assert DOCKERIGNORE.is_file()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "charts/canaryd/Chart.yaml",
        "canaryd/__pycache__/spec.cpython-311.pyc",
        "canaryd.egg-info/PKG-INFO",
        ".devstack/x",
    ):
        assert ignored(path), f"{path} would be sent to the build context"


def test_copy_sources_exist_and_are_not_ignored(final: Stage, dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    for stage in dockerfile[1]:
        for rest in stage.args("COPY"):
            words = [w for w in rest.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in rest.split()):
                continue
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist in the repository"
                assert not ignored(src.rstrip("/")), f"COPY source {src} is excluded by .dockerignore"
    assert not ignored("canaryd/spec.py")
    assert not ignored("pyproject.toml")
