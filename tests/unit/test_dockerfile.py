"""The Dockerfile cannot import ftctl: what it repeats of ftctl's constants must stay equal
(the library-silencing environment, the pinned base image), and so must the docs' mentions."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ftctl.config import DEFAULT_BASE_IMAGE
from ftctl.quiet import QUIET_ENV, silence_libraries

REPO = Path(__file__).resolve().parents[2]


def instructions(text: str, name: str) -> list[list[str]]:
    """The words of each ``name`` instruction (continuation lines joined, comments dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() == name:
            out.append(words[1:])
    return out


def dockerfile_env(text: str) -> dict[str, str]:
    """Every KEY=VALUE of the ENV instructions."""
    return dict(w.split("=", 1) for words in instructions(text, "ENV") for w in words)


def test_dockerfile_parsing_joins_continued_lines_and_skips_comments():
    text = "FROM x\n# ENV NOT=this\nENV A=1 \\\n    B=two \\\n    C=:4096:8\nRUN echo D=4\n"
    assert dockerfile_env(text) == {"A": "1", "B": "two", "C": ":4096:8"}
    assert instructions("ARG X=1\nFROM ${X}\n", "ARG") == [["X=1"]]


def test_the_image_sets_every_entry_of_the_quiet_environment():
    env = dockerfile_env((REPO / "Dockerfile").read_text())
    missing = {k: v for k, v in QUIET_ENV.items() if env.get(k) != v}
    assert not missing, f"the Dockerfile's ENV lacks (or sets otherwise): {missing}"


def test_silence_libraries_sets_each_entry_but_keeps_what_the_user_set():
    environ = {"TRANSFORMERS_VERBOSITY": "info", "PATH": "/bin"}
    silence_libraries(environ)
    assert environ == {**QUIET_ENV, "TRANSFORMERS_VERBOSITY": "info", "PATH": "/bin"}


def test_the_dockerfile_default_base_is_the_configured_default():
    args = dict(w.split("=", 1) for words in instructions((REPO / "Dockerfile").read_text(), "ARG")
                for w in words if "=" in w)  # fmt: skip
    assert args["BASE_IMAGE"] == DEFAULT_BASE_IMAGE


def test_every_mention_of_the_base_is_the_configured_default_or_a_prefix_of_it():
    """README, docs, docker/ and the code (help texts) quote it whole or cut short with an
    ellipsis; either way it is DEFAULT_BASE_IMAGE's, never another tag or digest."""
    files = [REPO / "README.md", REPO / "Dockerfile", *(REPO / "docs").rglob("*.md"),
             *(REPO / "docker").iterdir(), *(REPO / "ftctl").rglob("*.py")]  # fmt: skip
    seen = {}
    for path in files:
        for m in re.finditer(r"pytorch/pytorch:[^\s\"'`)|]+", path.read_text()):
            ref = m.group(0).removesuffix("…").removesuffix("...")
            seen[f"{path.relative_to(REPO)}: {m.group(0)}"] = DEFAULT_BASE_IMAGE.startswith(ref)
    assert any("docs/docker.md" in where for where in seen), seen  # it does look
    assert all(seen.values()), [where for where, ok in seen.items() if not ok]
