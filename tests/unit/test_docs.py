"""The docs tell the truth: every command, flag, path and bench script they show exists.

Nothing is run: ftctl commands are checked against the Typer app through click
(``typer.main.get_command(app)``), bench scripts against their argparse parsers.

Which files
    README.md and its translations (``README.zh-CN.md``), every ``*.md`` under docs/ (the
    Chinese pages of docs/zh-CN/ too), the README.md of each top-level folder (bench/,
    models/, ...), and the example CI files ``docs/ci/*.yml``. A Chinese page is checked exactly
    like an English one: its commands, flags, paths, links and anchors.

Where commands are found
    * fenced code blocks (```` ``` ```` or ``~~~``) whose language is a shell or none: bash, sh,
      shell, console, zsh, text, or unlabelled. Other languages (toml, yaml, python, jsonl, csv)
      hold no commands;
    * inline code spans that start with a command: ``ftctl ...`` (the README's table of
      commands), ``python ...``, ``bench/X.py ...``;
    * in ``docs/ci/*.yml``: the strings under ``run``, ``script``, ``before_script``,
      ``after_script``.

    A line ending in ``\\`` goes on on the next one. In a block where some line starts with a
    prompt (``$ ``), only those lines are commands (the others are their output). ``#`` starts a
    comment. A line is split into simple commands at ``|``, ``||``, ``&&``, ``;``, ``&``;
    redirections (``> pipeline.json``, ``2>&1``) are dropped. A simple command is ftctl when its
    command word (after ``NAME=value`` words and ``sudo``/``env``/``time``/``nohup``/``exec``)
    is ``ftctl`` or a path ending in ``/ftctl`` (``.venv/bin/ftctl``), or ``python -m ftctl``.

What is checked in an ftctl command
    * options before the command are the root's (``ftctl --config F train ...``);
    * each command word names a command of the group above it (``data generate``);
    * every option (``--x``, ``--x=v``, ``-x``, both halves of ``--x/--no-x``, short flags
      joined as ``-qx``) is one that command accepts, spelled out (no abbreviations); an
      option that takes a value takes the next word (so does an unknown option, when the next
      word does not start with ``-``: one mistake, one message);
    * no more positional arguments than the command takes.

    An option named alone in the prose (an inline span that starts with ``--``: "`--skip-deploy`
    stops after the gate") has no command beside it; it must be an option that some ftctl
    command or bench script takes, so renaming it everywhere in the code still fails here.

    Placeholders go anywhere a value or an argument goes: a word containing ``…`` or ``...``,
    ``<WHAT>``, and ``[`` ``]`` around optional parts. A placeholder where a command name belongs
    (``ftctl <command> --help``, ``ftctl …``) ends the check of that command.

Bench commands
    ``python bench/X.py ...`` (any python, ``.venv/bin/python`` included) or ``bench/X.py ...``:
    the script exists, and every option is one its argparse parser defines, spelled out. The
    options are read by running each script in a subprocess up to its ``parse_args`` call,
    which is replaced by one that reports the parser's options and stops: the work never
    starts. ``python -m MODULE`` with a module of this repository: the module exists.

Repository paths
    A word is a repository path when it starts with one of the shipped top-level folders
    (``ROOTS``: ftctl/ docs/ bench/ data/ tests/ .ci/ docker/) and is not the tail of a longer
    path (``/workspace/data/x``, ``~/data/x``, ``$HOME/data/x`` are not). Such a word, in a code
    block, an inline code span or a CI file, must exist; a glob (``data/*.jsonl``) must match
    something; a word with a placeholder in it (``…``, ``...``, ``<``, ``{``, ``$``) is not
    checked. Every relative markdown link target ``[text](target)`` must exist too, resolved
    from the page's folder, and its ``#fragment`` must be one a heading of that page makes
    (GitHub's way: lowercase, punctuation dropped, spaces to hyphens).

    A path ends at a space, a quote, a bracket, ``,;|:#`` or a full-width (CJK) punctuation mark:
    in ``见 data/test_cases.jsonl，再`` the path is ``data/test_cases.jsonl``.

    Paths under models/ or reports/ (what the user's runs create, e.g. models/incremental/final)
    are never checked, nor paths outside ROOTS. So a file the reader is meant to bring or create
    (an example input, an output) is written without a shipped folder in front (``extra.csv``,
    ``/tmp/train.csv``), never as ``data/extra.csv``. The one exception is a file ftctl itself
    writes by default: a path that is the default of a ``Path`` field of ftctl/config/sections.py
    (such as ``[eval] test_data``, ``[data] reviewed``) may be named before a run has made it.

Anchors
    GitHub's rule (github-slugger): the heading's text as rendered (inline code, emphasis and
    link markup gone, a link's text kept), lowercased; every character dropped that is not a
    letter, a combining mark, a decimal or letter number, a connector (``_``), ``-`` or a space;
    then each space becomes ``-``; a repeated slug gets ``-1``, ``-2``... So Chinese characters
    stay and Chinese punctuation goes: ``## 常见问题（FAQ）`` is ``#常见问题faq``,
    ``### GPU 内存不足怎么办？`` is ``#gpu-内存不足怎么办``. A fragment may be written
    percent-encoded (``#%E5%B8%B8...``), as browsers copy it.
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated

import click
import pytest
import typer
import yaml

from ftctl import config as ftctl_config
from ftctl.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
ROOTS = ("ftctl", "docs", "bench", "data", "tests", ".ci", "docker")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh", "text", "shell-session"}
YAML_COMMAND_KEYS = {"run", "script", "before_script", "after_script"}
WRAPPERS = {"sudo", "env", "time", "nohup", "exec"}
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;", "|&"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "&>", "&>>", "<>", ">|"}

_PLACEHOLDER_TAG = re.compile(r"<[^<>\s]*>")
_FD_BEFORE_REDIRECT = re.compile(r"(?<=\s)\d+(?=[<>])")
_MENTIONS_COMMAND = re.compile(r"(^|[\s/;|&(])(ftctl|python[\d.]*)(\s|$)|bench/")
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef"  # CJK symbols and punctuation, full-width forms
_PATH = re.compile(
    r"(?<![\w./~$@-])(?:"
    + "|".join(re.escape(r) for r in ROOTS)
    + rf")/[^\s`'\"()\[\]{{}}<>,;|:#{_CJK_PUNCT}]*"
)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_INLINE_COMMAND = re.compile(r"(ftctl|\S*python[\d.]*|(\./)?bench/\S+\.py)\s")
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Where:
    """A logical line of a doc file: its first physical line and its text."""

    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text.strip()}"


# ----------------------------------------------------------------------------- reading the docs


def doc_files() -> list[Path]:
    """README.md, README.*.md, docs/**/*.md, each top-level folder's README.md, docs/ci/*.yml."""
    files = [ROOT / "README.md", *sorted(ROOT.glob("README.*.md"))]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted(p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith("."))
    files += sorted((ROOT / "docs" / "ci").glob("*.yml"))
    return list(dict.fromkeys(files))


def rel(path: Path) -> str:
    """The path as the messages name it: relative to the repository when inside it."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def split_markdown(text: str) -> tuple[list[tuple[str, int, list[str]]], str]:
    """Fenced blocks as (language, first content line, lines), and the prose with every fenced
    line blanked (so that line numbers still hold)."""
    blocks: list[tuple[str, int, list[str]]] = []
    prose: list[str] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            blocks.append((m.group(2).lower(), number + 1, []))
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            else:
                blocks[-1][2].append(line)
            prose.append("")
        else:
            prose.append(line)
    return blocks, "\n".join(prose)


def logical_lines(file: str, first: int, lines: list[str]) -> list[Where]:
    """Join ``\\`` continuations; with prompts in the block, only the prompted lines count."""
    prompted = any(ln.lstrip().startswith("$ ") for ln in lines)
    out: list[Where] = []
    pending: Where | None = None
    for number, raw in enumerate(lines, start=first):
        line = raw.strip()
        if pending is None:
            if prompted and not line.startswith("$ "):
                continue
            pending = Where(file, number, line.removeprefix("$ "))
        else:
            pending = Where(file, pending.line, pending.text + " " + line)
        if pending.text.endswith("\\"):
            pending = Where(file, pending.line, pending.text[:-1])
            continue
        out.append(pending)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def inline_spans(file: str, prose: str) -> list[Where]:
    """Inline code spans of the prose (a span may run over a line break, not a paragraph)."""
    spans = []
    for m in _INLINE.finditer(prose):
        if "\n\n" not in m.group(1):
            line = prose.count("\n", 0, m.start()) + 1
            spans.append(Where(file, line, " ".join(m.group(1).split())))
    return spans


def yaml_commands(file: str, text: str) -> list[Where]:
    """The shell text under run/script/before_script/after_script of a CI file."""
    found: list[Where] = []

    def scalars(node: yaml.Node) -> Iterator[yaml.ScalarNode]:
        if isinstance(node, yaml.ScalarNode):
            yield node
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                yield from scalars(item)

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in YAML_COMMAND_KEYS:
                    for s in scalars(value):
                        first = s.start_mark.line + (2 if s.style in ("|", ">") else 1)
                        found.extend(logical_lines(file, first, s.value.splitlines()))
                else:
                    walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text))
    return found


def source(path: Path, text: str | None = None) -> str:
    """The text of a doc file: ``text`` when given (a changed copy checked as if it were
    ``path``), else the file's."""
    return path.read_text(encoding="utf-8") if text is None else text


def command_lines(path: Path, text: str | None = None) -> list[Where]:
    """Every logical line of a doc file that may hold commands."""
    text = source(path, text)
    if path.suffix == ".yml":
        return yaml_commands(rel(path), text)
    blocks, prose = split_markdown(text)
    lines = [
        where
        for lang, first, body in blocks
        if lang in SHELL_LANGS
        for where in logical_lines(rel(path), first, body)
    ]
    return lines + [w for w in inline_spans(rel(path), prose) if _INLINE_COMMAND.match(w.text)]


def option_spans(path: Path, text: str | None = None) -> list[Where]:
    """Inline code spans of a markdown page that start with a long option (`--json`)."""
    if path.suffix != ".md":
        return []
    _, prose = split_markdown(source(path, text))
    return [w for w in inline_spans(rel(path), prose) if w.text.startswith("--")]


def path_texts(path: Path, text: str | None = None) -> list[Where]:
    """The parts of a doc file where repository paths are checked: code and inline code."""
    text = source(path, text)
    if path.suffix == ".yml":
        return [Where(rel(path), n, ln) for n, ln in enumerate(text.splitlines(), start=1)]
    blocks, prose = split_markdown(text)
    code = [
        Where(rel(path), first + i, ln) for _, first, body in blocks for i, ln in enumerate(body)
    ]
    return code + inline_spans(rel(path), prose)


# ----------------------------------------------------------------------------- shell words


def is_placeholder(word: str) -> bool:
    return "…" in word or "..." in word or word.startswith("<") or word == "PLACEHOLDER"


def simple_commands(where: Where) -> list[list[str]]:
    """The simple commands of a line, as words; redirections and brackets dropped."""
    text = _PLACEHOLDER_TAG.sub("PLACEHOLDER", where.text)
    text = _FD_BEFORE_REDIRECT.sub("", text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in REDIRECTS:
            skip_next = True
        elif token in SEPARATORS:
            commands.append([])
        else:
            word = token.removeprefix("[").removesuffix("]")
            if word:
                commands[-1].append(word)
    return [c for c in commands if c]


def command_word(words: list[str]) -> list[str]:
    """The words from the command word on (env assignments and wrappers skipped)."""
    i = 0
    while i < len(words) and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]) or words[i] in WRAPPERS):
        i += 1
    return words[i:]


def is_python(word: str) -> bool:
    return re.fullmatch(r"python[\d.]*", word.rsplit("/", 1)[-1]) is not None


# ----------------------------------------------------------------------------- ftctl commands


@functools.cache
def ftctl_root() -> click.Command:
    return typer.main.get_command(app)


def accepted(cmd: click.Command, ctx: click.Context) -> dict[str, click.Option]:
    """Every option string the command takes (both halves of --x/--no-x, -h/--help)."""
    return {
        name: p
        for p in cmd.get_params(ctx)
        if isinstance(p, click.Option)
        for name in (*p.opts, *p.secondary_opts)
    }


def describe(options: dict[str, click.Option]) -> str:
    seen: dict[int, str] = {}
    for option in options.values():
        seen.setdefault(id(option), "/".join((*option.opts, *option.secondary_opts)))
    return ", ".join(sorted(seen.values()))


def takes_value(option: click.Option) -> bool:
    return not option.is_flag and not option.count


def capacity(cmd: click.Command) -> float:
    """How many positional arguments the command takes."""
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    return sum(float("inf") if a.nargs < 0 else a.nargs for a in args)


def read_option(words: list[str], i: int, options: dict[str, click.Option], name: str):
    """Check the option at words[i]; return (problem or None, index of the next word)."""
    word = words[i]
    flag, has_value, _ = word.partition("=")
    if flag.startswith("--") or len(flag) == 2:
        option = options.get(flag)
        if option is None:  # its value, if the next word looks like one, goes with it
            takes = not has_value and i + 1 < len(words) and not words[i + 1].startswith("-")
            unknown = f"{flag}: not an option of `{name}`; it takes: {describe(options)}"
            return unknown, i + 2 if takes else i + 1
        if has_value:
            problem = None if takes_value(option) else f"{flag} takes no value (`{word}`)"
            return problem, i + 1
        return None, i + 1 + (option.nargs if takes_value(option) else 0)
    for k, letter in enumerate(word[1:], start=1):  # -qx, or -n500
        option = options.get(f"-{letter}")
        if option is None:
            unknown = f"-{letter} (in {word}): not an option of `{name}`; it takes: "
            return unknown + describe(options), i + 1
        if takes_value(option):
            return None, i + 1 + (0 if k < len(word) - 1 else option.nargs)
    return None, i + 1


def check_ftctl(args: list[str], root: click.Command) -> list[str]:
    """Problems of one ftctl command line (the words after ``ftctl``)."""
    cmd, name = root, "ftctl"
    ctx = click.Context(root, info_name="ftctl", **root.context_settings)
    problems: list[str] = []
    positionals: list[str] = []
    i, only_positionals = 0, False
    while i < len(args):
        word = args[i]
        if word == "--" and not only_positionals:
            only_positionals, i = True, i + 1
        elif word.startswith("-") and len(word) > 1 and not only_positionals:
            problem, i = read_option(args, i, accepted(cmd, ctx), name)
            problems += [problem] if problem else []
        elif isinstance(cmd, click.Group):
            if is_placeholder(word) or word.isupper():
                return problems  # `ftctl <command> --help`: nothing more to check
            sub = cmd.get_command(ctx, word)
            if sub is None:
                return [
                    *problems,
                    f"`{name} {word}`: no such command; {name} has: "
                    + ", ".join(sorted(cmd.list_commands(ctx))),
                ]
            ctx = click.Context(sub, parent=ctx, info_name=word, **sub.context_settings)
            cmd, name, i = sub, f"{name} {word}", i + 1
        else:
            positionals += [] if is_placeholder(word) else [word]
            i += 1
    if len(positionals) > capacity(cmd):
        problems.append(
            f"`{name}` takes {int(capacity(cmd))} argument(s), the docs give "
            f"{len(positionals)}: {' '.join(positionals)}"
        )
    return problems


@functools.cache
def every_long_option(root: click.Command) -> frozenset[str]:
    """The long options of every ftctl command and every bench script."""
    found: set[str] = set()

    def walk(cmd: click.Command, ctx: click.Context) -> None:
        found.update(accepted(cmd, ctx))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                walk(sub, click.Context(sub, parent=ctx, info_name=name, **sub.context_settings))

    walk(root, click.Context(root, info_name="ftctl", **root.context_settings))
    found.update(o for opts in bench_options().values() if isinstance(opts, list) for o in opts)
    return frozenset(o for o in found if o.startswith("--"))


def loose_option_problems(where: Where, root: click.Command) -> list[str]:
    """An inline span that starts with an option (`--skip-deploy`, `--seed N`) names options
    that some ftctl command or bench script takes."""
    words = re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", where.text)
    known = every_long_option(root)
    problems = []
    for word in (w for w in words if w not in known):
        near = difflib.get_close_matches(word, known)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        problems.append(f"{word}: no ftctl command or bench script takes it{hint}")
    return problems


def ftctl_args(words: list[str]) -> list[str] | None:
    """The words after ftctl if this simple command runs ftctl, else None."""
    words = command_word(words)
    if words and (words[0] == "ftctl" or words[0].endswith("/ftctl")):
        return words[1:]
    if len(words) >= 3 and is_python(words[0]) and words[1:3] == ["-m", "ftctl"]:
        return words[3:]
    return None


# ----------------------------------------------------------------------------- bench scripts

_CAPTURE = r"""
import argparse, json, runpy, sys
from pathlib import Path

class Seen(Exception):
    pass

def parse_known_args(self, args=None, namespace=None):
    raise Seen(sorted(s for a in self._actions for s in a.option_strings))

argparse.ArgumentParser.parse_known_args = parse_known_args
argparse.ArgumentParser.parse_args = parse_known_args
found = {}
for script in sys.argv[1:]:
    sys.argv = [script]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
        found[script] = "it ended without calling parse_args"
    except Seen as seen:
        found[script] = seen.args[0]
    except BaseException as exc:
        found[script] = f"reading its options failed: {exc!r}"
print("OPTIONS " + json.dumps(found))
"""


@functools.cache
def bench_options() -> dict[str, list[str] | str]:
    """{bench/X.py: its option strings, or why they could not be read}, in one subprocess."""
    scripts = sorted(
        rel(p) for p in (ROOT / "bench").glob("*.py") if "ArgumentParser" in p.read_text()
    )
    done = subprocess.run(
        [sys.executable, "-c", _CAPTURE, *scripts],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in done.stdout.splitlines():
        if line.startswith("OPTIONS "):
            return json.loads(line.removeprefix("OPTIONS "))
    raise AssertionError(f"reading the bench scripts' options failed:\n{done.stderr[-3000:]}")


def python_target(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("script", path, args) or ("module", name, args) for a python command, else None."""
    words = command_word(words)
    if not words:
        return None
    if re.fullmatch(r"bench/\S+\.py", words[0].removeprefix("./")):
        return "script", words[0].removeprefix("./"), words[1:]
    if not is_python(words[0]):
        return None
    i = 1
    while i < len(words):
        if words[i] == "-m" and i + 1 < len(words):
            return "module", words[i + 1], words[i + 2 :]
        if words[i] in ("-c", "-"):
            return None
        if not words[i].startswith("-"):
            return "script", words[i].removeprefix("./"), words[i + 1 :]
        i += 2 if words[i] in ("-X", "-W") else 1
    return None


def check_python(kind: str, target: str, args: list[str]) -> list[str]:
    if kind == "module":
        parts = target.split(".")
        if parts[0] not in ROOTS or parts[0] == "ftctl":
            return []
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return []
        return [f"python -m {target}: no module {rel(base)}.py in the repository"]
    if not target.startswith("bench/") or not (ROOT / target).is_file():
        return []  # a missing script is reported by the path check
    options = bench_options().get(target)
    if options is None:
        return [f"{target}: shown with arguments, but it has no argparse parser"] if args else []
    if isinstance(options, str):
        return [f"{target}: {options}"]
    unknown = [a.partition("=")[0] for a in args if a.startswith("-") and len(a) > 1]
    return [
        f"{flag}: not an option of {target}; it takes: {', '.join(options)}"
        for flag in unknown
        if flag not in options
    ]


# ----------------------------------------------------------------------------- paths


@functools.cache
def written_by_default() -> frozenset[str]:
    """The repository paths ftctl writes by default: every ``Path`` default of a field of a
    config dataclass in ftctl/config/sections.py (``[eval] test_data``...)."""
    found = set()
    for obj in vars(ftctl_config).values():
        if isinstance(obj, type) and is_dataclass(obj):
            found.update(f.default.as_posix() for f in fields(obj) if isinstance(f.default, Path))
    return frozenset(found)


def path_problem(word: str) -> str | None:
    """None when the repository path exists (or is a placeholder, or a file ftctl writes by
    default), else why not."""
    word = word.rstrip(".")
    if any(mark in word for mark in ("…", "...", "$", "PLACEHOLDER")):
        return None
    if word in written_by_default():
        return None
    if any(ch in word for ch in "*?"):
        return (
            None if glob.glob(word, root_dir=ROOT, recursive=True) else f"{word}: matches nothing"
        )
    target = ROOT / word
    if target.is_dir() if word.endswith("/") else target.exists():
        return None
    problem = f"{word}: no such {'folder' if word.endswith('/') else 'file'} in the repository"
    parent = target.parent
    while not parent.is_dir():
        parent = parent.parent
    near = difflib.get_close_matches(target.name, [p.name for p in parent.iterdir()], n=3)
    return problem + (f"; {rel(parent)}/ has: {', '.join(near)}" if near else "")


def repo_path_problems(where: Where) -> list[str]:
    problems = []
    for m in _PATH.finditer(where.text):
        if where.text[m.end() : m.end() + 1] in ("<", "{", "…", "$"):
            continue  # models/<run>/..., data/{name}: a placeholder follows
        problem = path_problem(m.group(0))
        if problem:
            problems.append(problem)
    return problems


_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)(?:\s+#+)?\s*$", flags=re.MULTILINE)
_HEADING_LINK = re.compile(r"(!?)\[([^\]]*)\]\([^)]*\)")
_SLUG_KEEPS = ("Nd", "Nl", "Pc")  # besides letters (L*) and marks (M*)


def slug(heading: str) -> str:
    """The #fragment GitHub makes of a heading (github-slugger): its rendered text lowercased;
    every character but letters, marks, decimal and letter numbers, connectors (``_``), ``-``
    and spaces dropped (CJK characters stay, Chinese punctuation and the ideographic space go);
    each space a hyphen."""
    text = _HEADING_LINK.sub(lambda m: "" if m.group(1) else m.group(2), heading)
    text = re.sub(r"<[^<>]+>", "", text).lower()  # inline HTML tags render as nothing
    kept = (
        ch
        for ch in text
        if ch in "- "
        or unicodedata.category(ch)[0] in "LM"
        or unicodedata.category(ch) in _SLUG_KEEPS
    )
    return "".join(kept).replace(" ", "-")


def anchors(page: Path, text: str | None = None) -> set[str]:
    """The #fragments a page's headings make, as GitHub makes them (:func:`slug`), a repeated
    one numbered ``-1``, ``-2``..."""
    _, prose = split_markdown(source(page, text))
    found: set[str] = set()
    for m in _HEADING.finditer(prose):
        slug_ = slug(m.group(1))
        n = 0
        while (f"{slug_}-{n}" if n else slug_) in found:
            n += 1
        found.add(f"{slug_}-{n}" if n else slug_)
    return found


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Relative link targets that do not exist, and #fragments no heading of theirs makes."""
    problems = []
    text = source(path, text)
    _, prose = split_markdown(text)
    for m in _LINK.finditer(prose):
        target, _, fragment = m.group(1).partition("#")
        if re.match(r"[a-z][\w+.-]*:", target):
            continue  # https:, mailto:
        where = f"{rel(path)}:{prose.count(chr(10), 0, m.start()) + 1}: link {m.group(1)}"
        page = (path.parent / target) if target else path
        if not page.exists():
            problems.append(f"{where}: no such file")
        elif fragment and page.suffix == ".md":
            made = anchors(page, text if page == path else None)
            if urllib.parse.unquote(fragment) not in made:
                problems.append(f"{where}: {rel(page)} has no heading #{fragment}")
    return problems


# ----------------------------------------------------------------------------- the checker


def check_doc(
    path: Path, root: click.Command | None = None, *, text: str | None = None
) -> list[str]:
    """Every problem of one doc file, as ``file:line: the line`` + what is wrong; with
    ``text``, of that text checked as if it were the file's."""
    root = root or ftctl_root()
    text = source(path, text)
    problems: list[str] = []
    try:
        lines = command_lines(path, text)
    except yaml.YAMLError as exc:  # GitHub and GitLab would reject the file
        lines, problems = [], [f"{rel(path)}: not valid YAML: {exc}"]
    for where in lines:
        if not _MENTIONS_COMMAND.search(where.text):
            continue
        try:
            commands = simple_commands(where)
        except ValueError as exc:
            problems.append(f"{where}\n    cannot split it into words: {exc}")
            continue
        for words in commands:
            args = ftctl_args(words)
            target = python_target(words)
            found = check_ftctl(args, root) if args is not None else []
            found += check_python(*target) if target else []
            problems += [f"{where}\n    {p}" for p in found]
    for where in path_texts(path, text):
        problems += [f"{where}\n    {p}" for p in repo_path_problems(where)]
    for where in option_spans(path, text):
        problems += [f"{where}\n    {p}" for p in loose_option_problems(where, root)]
    if path.suffix == ".md":
        problems += link_problems(path, text)
    return problems


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_doc_commands_flags_and_paths_exist(doc: Path):
    problems = check_doc(doc)
    assert not problems, f"{len(problems)} problem(s) in {rel(doc)}:\n" + "\n".join(problems)


def test_the_docs_that_are_read():
    names = [rel(p) for p in doc_files()]
    assert {"README.md", "bench/README.md", "docs/ci/github-actions.yml"} <= set(names)
    assert "docs/ci/gitlab-ci.yml" in names
    assert all((ROOT / r).is_dir() for r in ROOTS), "ROOTS names a folder that is gone"


@pytest.fixture
def doc_at(tmp_path: Path):
    """Write a doc (and a page it links to) in a temporary folder; paths it names are still
    the repository's."""
    (tmp_path / "linked.md").write_text("# Linked\n\n## The `part` (2)\n", encoding="utf-8")

    def make(text: str) -> Path:
        doc = tmp_path / "page.md"
        doc.write_text(text, encoding="utf-8")
        return doc

    return make


def stand_in_cli() -> click.Command:
    """A small CLI of ftctl's shape for the checker's own tests, so that they do not change
    when the real commands do (the real ones are what the docs are checked against)."""
    cli = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
    data = typer.Typer()
    cli.add_typer(data, name="data")

    @cli.callback()
    def root(
        config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None: ...

    @data.command("generate")
    def generate(
        per_intent: Annotated[int, typer.Option("--per-intent")] = 1,
        json_: Annotated[bool, typer.Option("--json")] = False,
    ) -> None: ...

    @data.command("validate")
    def validate(
        files: list[Path], labels: Annotated[Path | None, typer.Option("--labels")] = None
    ) -> None: ...

    @data.command("convert")
    def convert(src: Path, dst: Path) -> None: ...

    @cli.command("train")
    def train(
        new_data: Annotated[Path | None, typer.Option("--new-data")] = None,
        epochs: Annotated[int, typer.Option("--epochs")] = 2,
        samples: Annotated[int, typer.Option("--samples", "-n")] = 5,
        docker: Annotated[bool, typer.Option("--docker")] = False,
        gpus: Annotated[str, typer.Option("--gpus")] = "auto",
        skip_deploy: Annotated[bool, typer.Option("--skip-deploy")] = False,
        access_log: Annotated[bool, typer.Option("--access-log/--no-access-log")] = True,
        json_: Annotated[bool, typer.Option("--json")] = False,
    ) -> None: ...

    return typer.main.get_command(cli)


GOOD = """\
# Top

Intro with `ftctl data validate FILE… [--labels MODEL_DIR]` and `ftctl train` / `ftctl data`;
`--skip-deploy` stops early, `--epochs N` and `--hidden 768` (a bench option) are options.

```bash
# a comment line
$ ftctl --config ftctl.toml -q train \\
    --new-data data/incremental_training_data.jsonl \\
    --epochs=3 --docker --gpus all -n50  # trailing comment
$ ftctl train --new-data … --skip-deploy --json > out.json 2>&1 | jq .ok
$ FTCTL_CONFIG=x.toml .venv/bin/ftctl train --new-data <FILE> --no-access-log -h
$ ftctl data generate --per-intent 5 && python -m ftctl data convert in.jsonl out.csv
$ ftctl <command> --help; ftctl …
$ .venv/bin/python bench/bench_eval.py --hidden 768 --repeat=1
$ .venv/bin/python -m tests.integration.docker_fixtures
output lines of a prompted block are not commands: ftctl nonsense --nope
```

```toml
samples = "not/checked/as/a/command ftctl nonsense"
```

Paths: `data/*.jsonl`, `ftctl/cli/`, `models/incremental/final`, `/workspace/data/x.jsonl`,
[a link](linked.md#the-part-2), [a site](https://example.com/x), [anchor](#top).
"""


def test_a_good_doc_has_no_problem(doc_at):
    assert check_doc(doc_at(GOOD), stand_in_cli()) == []


BAD = """\
```
ftctl data generate --per-intent 10 --nope
ftctl --verbose train
ftctl data frobnicate
ftctl train --json=yes
ftctl data convert a.jsonl b.csv c.csv
python bench/bench_deploy.py
python bench/bench_eval.py --hiden 768
python -m tests.integration.nowhere
cat data/missing.jsonl data/*.nothing
```

See [the page](nowhere.md), [a part](#nowhere) and `docs/missing.md`; `--skip-deploy` is an
option, `--skip-deploi` is not.
"""


def test_a_bad_doc_names_every_problem_with_file_line_and_what_is_accepted(doc_at):
    doc = doc_at(BAD)
    problems = check_doc(doc, stand_in_cli())
    text = "\n".join(problems)
    name = rel(doc)
    expected = [
        f"{name}:2: ftctl data generate --per-intent 10 --nope\n    --nope: not an option of "
        "`ftctl data generate`; it takes: --json, --per-intent, -h/--help",
        f"{name}:3: ftctl --verbose train\n    --verbose: not an option of `ftctl`; it takes: "
        "--config/-c, ",
        "`ftctl data frobnicate`: no such command; ftctl data has: convert, generate, validate",
        "--json takes no value (`--json=yes`)",
        "`ftctl data convert` takes 2 argument(s), the docs give 3: a.jsonl b.csv c.csv",
        "bench/bench_deploy.py: no such file in the repository; bench/ has: ",
        "--hiden: not an option of bench/bench_eval.py; it takes: ",
        "python -m tests.integration.nowhere: no module tests/integration/nowhere.py",
        "data/missing.jsonl: no such file in the repository",
        "data/*.nothing: matches nothing",
        f"{name}:13: link nowhere.md: no such file",
        f"{name}:13: link #nowhere: {name} has no heading #nowhere",
        "docs/missing.md: no such file in the repository",
        f"{name}:14: --skip-deploi\n    --skip-deploi: no ftctl command or bench script takes it"
        " (did you mean --skip-deploy",
    ]
    for part in expected:
        assert part in text, f"not reported: {part!r}\n--- got:\n{text}"
    assert "bench_deploy_time.py" in text  # the near names are offered
    assert len(problems) == len(expected)


def first_documented_option(doc: Path, root: click.Command) -> tuple[click.Command, str]:
    """The first long option ``doc`` gives to an ftctl command: (that command, the option)."""
    for where in command_lines(doc):
        for words in simple_commands(where) if _MENTIONS_COMMAND.search(where.text) else []:
            cmd = root
            for word in ftctl_args(words) or []:
                if isinstance(cmd, click.Group) and word in cmd.commands:
                    cmd = cmd.commands[word]
                elif not isinstance(cmd, click.Group) and word.startswith("--"):
                    return cmd, word.partition("=")[0]
    raise AssertionError(f"{rel(doc)} gives no long option to an ftctl command")


def test_renaming_a_flag_without_updating_the_docs_fails():
    """The real app, with the first option README.md shows renamed: README.md fails."""
    root = typer.main.get_command(app)  # a fresh click tree: renaming here touches nothing else
    doc = ROOT / "README.md"
    assert check_doc(doc, root) == []
    cmd, flag = first_documented_option(doc, root)
    option = next(p for p in cmd.params if flag in getattr(p, "opts", []))
    option.opts = [f"{flag}-renamed" if o == flag else o for o in option.opts]
    problems = check_doc(doc, root)
    assert problems, f"renaming {flag} of `{cmd.name}` went unnoticed"
    assert all(f"{flag}: " in p for p in problems), problems
    assert f"{flag}-renamed" in problems[0]


def test_the_checker_sees_the_commands_of_the_docs():
    """A change of the parser that silently found nothing would pass every doc: guard it."""
    ftctl = bench = 0
    for doc in doc_files():
        for where in command_lines(doc):
            for words in simple_commands(where) if _MENTIONS_COMMAND.search(where.text) else []:
                ftctl += ftctl_args(words) is not None
                target = python_target(words)
                bench += bool(target) and target[1].startswith("bench/")
    assert ftctl >= 50 and bench >= 5, (ftctl, bench)


def test_a_ci_file_that_is_not_yaml_is_reported(tmp_path: Path):
    ci = tmp_path / "broken.yml"
    ci.write_text("steps:\n  - name: Install ftctl (the host side: docker SDK)\n    run: ftctl\n")
    problems = check_doc(ci, stand_in_cli())
    assert len(problems) == 1 and "broken.yml: not valid YAML: mapping values" in problems[0]
    assert "line 2, column 39" in problems[0]


def test_ci_files_commands_are_read_with_their_lines():
    lines = command_lines(ROOT / "docs" / "ci" / "gitlab-ci.yml")
    pipeline = [w for w in lines if "ftctl pipeline" in w.text]
    assert len(pipeline) == 1 and "--report-dir reports --json" in pipeline[0].text
    source = (ROOT / "docs" / "ci" / "gitlab-ci.yml").read_text().splitlines()
    assert "ftctl pipeline" in source[pipeline[0].line - 1]


# ----------------------------------------------------------------------------- Chinese pages

ZH_DOCS = [p for p in doc_files() if "zh-CN" in p.name or "zh-CN" in p.parent.parts]


@pytest.mark.parametrize(
    ("heading", "fragment"),
    [
        ("常见问题（FAQ）", "常见问题faq"),
        ("微调后其他意图准确率下降了怎么办？", "微调后其他意图准确率下降了怎么办"),
        ("GPU 内存不足怎么办？", "gpu-内存不足怎么办"),
        ("怎么做到“验证后再部署”？", "怎么做到验证后再部署"),
        ("服务器上的 python3 是 3.6，能部署吗？", "服务器上的-python3-是-36能部署吗"),
        ("部署：`ftctl deploy`、`promote`", "部署ftctl-deploypromote"),
        ("注意事项 1–3：不要过度微调、保持数据平衡", "注意事项-13不要过度微调保持数据平衡"),
        ("冻结　早期层", "冻结早期层"),  # the ideographic space is not a space: dropped
        ("① 数据回放", "-数据回放"),  # a circled number is No (other number): dropped
        ("Ｆｕｌｌ ＷＩＤＴＨ", "ｆｕｌｌ-ｗｉｄｔｈ"),  # full-width letters are letters
        ("cafe\u0301 `[deploy.*] remote_python`", "cafe\u0301-deploy-remote_python"),  # a mark
        ("见 [部署](deploy.md) 一节", "见-部署-一节"),  # a link's text stays, its target goes
        # github-slugger's README examples
        ("Привет non-latin 你好", "привет-non-latin-你好"),
        ("😄 emoji", "-emoji"),
    ],
)
def test_slug_follows_githubs_rule_for_chinese_headings(heading: str, fragment: str):
    assert slug(heading) == fragment


def test_links_to_chinese_headings_resolve_raw_and_percent_encoded(doc_at):
    linked = doc_at("").parent / "linked.md"
    linked.write_text("# 常见问题\n\n## 部署锁在哪里？\n\n## 部署锁在哪里？\n", encoding="utf-8")
    assert anchors(linked) == {"常见问题", "部署锁在哪里", "部署锁在哪里-1"}
    encoded = urllib.parse.quote("部署锁在哪里-1")
    good = doc_at(
        f"[a](linked.md#部署锁在哪里) [b](linked.md#{encoded}) [c](#本页) [d](linked.md)\n\n"
        "## 本页\n"
    )
    assert check_doc(good, stand_in_cli()) == []
    bad = doc_at(
        "[a](linked.md#部署锁在哪里？) [b](linked.md#部署锁在哪里-2) [c](#本页面)\n\n## 本页\n"
    )
    problems = check_doc(bad, stand_in_cli())
    assert [p.partition(": link ")[2] for p in problems] == [
        f"linked.md#部署锁在哪里？: {rel(linked)} has no heading #部署锁在哪里？",
        f"linked.md#部署锁在哪里-2: {rel(linked)} has no heading #部署锁在哪里-2",
        f"#本页面: {rel(bad)} has no heading #本页面",
    ]


def test_a_path_ends_at_chinese_punctuation(doc_at):
    doc = doc_at(
        "```bash\nftctl data generate  # 写到 data/incremental_training_data.jsonl，"
        "不是 data/missing.jsonl。\n```\n\n见 `data/test_cases.jsonl`（测试集）。\n"
    )
    problems = check_doc(doc, stand_in_cli())
    assert len(problems) == 1, problems
    assert problems[0].endswith("data/missing.jsonl: no such file in the repository")


def test_a_file_ftctl_writes_by_default_may_be_named_before_it_exists(doc_at, monkeypatch):
    assert "data/test_cases.jsonl" in written_by_default()  # [eval] test_data
    doc = doc_at("`data/not-yet.jsonl` and `data/nowhere.jsonl`\n")
    monkeypatch.setattr(sys.modules[__name__], "written_by_default", lambda: {"data/not-yet.jsonl"})
    problems = check_doc(doc, stand_in_cli())
    assert len(problems) == 1 and "data/nowhere.jsonl: no such file" in problems[0], problems


def test_the_chinese_pages_are_read_and_link_to_their_english_pages():
    names = {rel(p) for p in ZH_DOCS}
    assert {"README.zh-CN.md", "docs/zh-CN/deploy.md", "docs/zh-CN/train.md"} <= names
    assert "docs/zh-CN/faq.md" in names and (ROOT / "docs" / "faq.md") in doc_files()
    pairs = [(ROOT / "README.zh-CN.md", ROOT / "README.md")]
    pairs += [(p, ROOT / "docs" / p.name) for p in ZH_DOCS if p.parent.name == "zh-CN"]
    for zh, en in pairs:
        assert en.is_file(), f"{rel(zh)} has no English page {rel(en)}"
        for page, other in ((zh, en), (en, zh)):
            head = "\n".join(page.read_text(encoding="utf-8").splitlines()[:5])
            target = os.path.relpath(other, page.parent)
            assert f"]({target})" in head, f"{rel(page)} does not link {target} at its top"


BROKEN_CHINESE_EXAMPLES = [
    # (page, the text as it is, the same text broken, what the checker must say)
    (
        "docs/zh-CN/deploy.md",
        "--health-url http://127.0.0.1:8000/health --smoke 帮我打卡=CLOCK_IN",
        "--health-url http://127.0.0.1:8000/health --smoke-case 帮我打卡=CLOCK_IN",
        "--smoke-case: not an option of `ftctl deploy`",
    ),
    (
        "docs/zh-CN/deploy.md",
        "ftctl releases --host root@47.100.235.168 ",
        "ftctl release --host root@47.100.235.168 ",
        "`ftctl release`: no such command",
    ),
    (
        "docs/zh-CN/deploy.md",
        "[English](../deploy.md)",
        "[English](../deploy-en.md)",
        "link ../deploy-en.md: no such file",
    ),
    (
        "docs/zh-CN/deploy.md",
        "[部署到一半断了](#部署到一半断了)",
        "[部署到一半断了](#部署到一半断了了)",
        "link #部署到一半断了了: docs/zh-CN/deploy.md has no heading #部署到一半断了了",
    ),
    (
        "README.zh-CN.md",
        "(docs/zh-CN/faq.md#gpu-内存不足怎么办)",
        "(docs/zh-CN/faq.md#gpu内存不足怎么办)",  # the space became no hyphen
        "docs/zh-CN/faq.md has no heading #gpu内存不足怎么办",
    ),
    (
        "README.zh-CN.md",
        "模板放在 `data/incremental_samples.yaml`",
        "模板放在 `data/incremental_sample.yaml`",
        "data/incremental_sample.yaml: no such file in the repository",
    ),
    (
        "docs/zh-CN/train.md",
        "--replay-ratio 0.5 --freeze-layers 8",
        "--replay-rate 0.5 --freeze-layers 8",
        "--replay-rate: not an option of `ftctl train`",
    ),
    (
        "docs/zh-CN/faq.md",
        "ftctl train --freeze-layers 6 \\",
        "ftctl train --freeze-layer 6 \\",
        "--freeze-layer: not an option of `ftctl train`",
    ),
]


@pytest.mark.parametrize(
    ("page", "as_is", "broken", "said"),
    BROKEN_CHINESE_EXAMPLES,
    ids=[f"{b[0]}:{b[3][:30]}" for b in BROKEN_CHINESE_EXAMPLES],
)
def test_a_broken_chinese_example_fails_where_the_real_page_does_not(page, as_is, broken, said):
    """The real page is checked as it is and with one example broken in place (same lines):
    the broken copy has exactly one problem more, and it is the one broken."""
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    assert text.count(as_is) == 1, f"{page} no longer holds {as_is!r}: update this test"
    real = check_doc(path)
    new = [p for p in check_doc(path, text=text.replace(as_is, broken)) if p not in real]
    assert len(new) == 1 and said in new[0], new
    assert not [p for p in real if said in p]


BROKEN_TAIL = """
```bash
ftctl deploy --profile production --rollback-on-error   # 一个不存在的参数
```

另见[不存在的页面](不存在.md)和[不存在的标题](#不存在的标题)。
"""


@pytest.mark.parametrize("page", ZH_DOCS, ids=rel)
def test_every_chinese_page_fails_with_a_broken_example_appended(page: Path):
    text = page.read_text(encoding="utf-8")
    real = check_doc(page)
    new = [p for p in check_doc(page, text=text + BROKEN_TAIL) if p not in real]
    assert len(new) == 3, new
    assert "--rollback-on-error: not an option of `ftctl deploy`" in new[0]
    assert new[1].endswith("link 不存在.md: no such file")
    assert new[2].endswith(f"link #不存在的标题: {rel(page)} has no heading #不存在的标题")
