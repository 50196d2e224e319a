"""The Dockerfile cannot import ftctl: what it repeats of ftctl's constants must stay equal."""

from __future__ import annotations

import shlex
from pathlib import Path

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
