"""Reading ``ftctl.toml``: every section built and checked, every problem in one error.

The file's tables become the frozen dataclasses of :mod:`ftctl.config.sections`; a value of the
wrong type, an unknown key or an out-of-range value is collected, not raised at once. Flags win
over the file (:func:`override`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl.config.sections import (
    DataConfig,
    DeployConfig,
    EvalConfig,
    HarvestConfig,
    ImageConfig,
    ServeConfig,
    TrainConfig,
)
from ftctl.errors import ConfigError, Problem

CONFIG_FILE = "ftctl.toml"


@dataclass(frozen=True)
class Config:
    """The whole ``ftctl.toml``."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    deploy: dict[str, DeployConfig] = field(default_factory=dict)  # profile name -> config
    serve: ServeConfig = field(default_factory=ServeConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    path: Path | None = None  # the file it came from, if any
    notes: tuple[str, ...] = ()  # deprecations found while reading it (printed as warnings)

    def deploy_profile(self, name: str | None) -> DeployConfig:
        """The named profile; with no name, the only one (or the defaults if there is none)."""
        if name is None:
            if len(self.deploy) == 1:
                return next(iter(self.deploy.values()))
            if not self.deploy:
                return DeployConfig()
            raise ConfigError(
                f"{len(self.deploy)} deploy profiles in {self.path}: "
                f"{', '.join(sorted(self.deploy))}",
                hint="choose one with --profile NAME",
            )
        if name not in self.deploy:
            known = ", ".join(sorted(self.deploy)) or "none"
            raise ConfigError(
                f"no [deploy.{name}] profile in {self.path or CONFIG_FILE} (known: {known})",
                hint=f"add a [deploy.{name}] table or pass --host user@host",
            )
        return self.deploy[name]


# --------------------------------------------------------------------------- loading


# Keys that were renamed (one name per thing across the CLI and ftctl.toml): still read, with a
# note. section -> {old key: new key}
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "data": {"samples": "templates"},
    "serve": {"model_dir": "model_path"},
}
# Path keys that are not relative to ftctl.toml: the Dockerfile is relative to the build context.
NOT_FILE_RELATIVE = frozenset({"image.dockerfile"})


def _coerce(
    value: Any, tp: Any, where: str, problems: list[Problem], base: Path | None = None
) -> Any:
    """Coerce a TOML value to a dataclass field type; record a problem if it cannot. A relative
    path is taken relative to ``base`` (the directory of the file it came from)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, problems, base)
    if tp is Path:
        if isinstance(value, str):
            path = Path(value).expanduser()
            return path if base is None or path.is_absolute() else base / path
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if isinstance(value, str) and inner is Path:  # new_data = "x.jsonl": one file
            value = [value]
        if isinstance(value, list):
            return tuple(
                _coerce(v, inner, f"{where}[{i}]", problems, base) for i, v in enumerate(value)
            )
        if isinstance(value, dict) and typing.get_origin(inner) is tuple:
            # smoke = {"帮我打卡" = "CLOCK_IN"} -> (("帮我打卡", "CLOCK_IN"),)
            return tuple((str(k), str(v)) for k, v in value.items())
    name = getattr(tp, "__name__", str(tp))
    problems.append(Problem(f"expected {name}, got {value!r}", field=where))
    return None


def section(
    cls: type,
    raw: dict[str, Any],
    where: str,
    problems: list[Problem],
    *,
    base: Path | None = None,
    notes: list[str] | None = None,
):
    """Build the frozen dataclass ``cls`` from a TOML table, collecting problems. Relative paths
    are relative to ``base``; a renamed key is read under its new name, with a note."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    renamed = RENAMED_KEYS.get(where.split(".")[0], {})
    kwargs = {}
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k in renamed:
            if notes is not None:
                notes.append(
                    f"[{where}] {key} is now {renamed[k]}: rename it (read as {renamed[k]})"
                )
            k = renamed[k]
        if k not in known:
            problems.append(
                Problem(f"unknown key (known: {', '.join(sorted(known))})", field=f"{where}.{key}")
            )
            continue
        rel = None if f"{where.split('.')[0]}.{k}" in NOT_FILE_RELATIVE else base
        coerced = _coerce(value, hints[k], f"{where}.{key}", problems, rel)
        if coerced is not None:
            kwargs[k] = coerced
    return cls(**kwargs)


def override(obj, **flags):
    """Return ``obj`` with every flag that is not None applied (CLI flags win over the file)."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(obj, **changes) if changes else obj


def with_flags(obj, **flags):
    """``obj`` (a config section) with every flag that is not None applied, checked: what a
    command runs with, in one step (one ConfigError listing every problem)."""
    obj = override(obj, **flags)
    check(obj)
    return obj


def check(*objs) -> None:
    """Raise one ConfigError listing every problem of the given config sections."""
    problems: list[Problem] = []
    for obj in objs:
        problems.extend(obj.problems())
    if problems:
        raise ConfigError(
            "invalid configuration:\n" + "\n".join(f"  {p}" for p in problems),
            hint="fix the values in ftctl.toml or the flags named above",
            problems=problems,
        )


_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "image": ImageConfig,
    "serve": ServeConfig,
    "harvest": HarvestConfig,
}


def find_config(explicit: Path | None) -> Path | None:
    """``--config FILE``, else $FTCTL_CONFIG, else ./ftctl.toml if present, else None."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                f"config file not found: {explicit}", hint="check the path given to --config"
            )
        return explicit
    env = os.environ.get("FTCTL_CONFIG")
    if env:
        if not Path(env).is_file():
            raise ConfigError(
                f"config file not found: {env} (from $FTCTL_CONFIG)",
                hint="fix or unset the FTCTL_CONFIG environment variable",
            )
        return Path(env)
    local = Path(CONFIG_FILE)
    return local if local.is_file() else None


def load_config(path: Path | None) -> Config:
    """Load and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", hint="fix the syntax") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    problems: list[Problem] = []
    notes: list[str] = []
    opts = {"base": path.parent, "notes": notes}  # paths in the file are relative to the file
    kwargs: dict[str, Any] = {"path": path}
    for key, value in raw.items():
        if key in _SECTIONS and isinstance(value, dict):
            kwargs[key] = section(_SECTIONS[key], value, key, problems, **opts)
        elif key == "deploy" and isinstance(value, dict):
            kwargs["deploy"] = {
                name: section(DeployConfig, table, f"deploy.{name}", problems, **opts)
                for name, table in value.items()
                if isinstance(table, dict)
            }
            for name, table in value.items():
                if not isinstance(table, dict):  # e.g. [deploy] hosts = [...]: no profile name
                    problems.append(
                        Problem(
                            "not a profile: keys belong in a [deploy.<profile>] table "
                            "(e.g. [deploy.production])",
                            field=f"deploy.{name}",
                        )
                    )
        elif key in _SECTIONS or key == "deploy":
            problems.append(Problem(f"must be a table ([{key}])", field=key))
        else:
            known = ", ".join([*_SECTIONS, "deploy"])
            problems.append(Problem(f"unknown table (known: {known})", field=key))
    cfg = Config(**kwargs, notes=tuple(notes))
    for sec in (cfg.data, cfg.train, cfg.eval, cfg.image, cfg.serve, cfg.harvest):
        problems.extend(sec.problems())
    for name, prof in cfg.deploy.items():
        problems.extend(prof.problems(f"deploy.{name}"))
    if problems:
        raise ConfigError(
            f"{path}: invalid configuration:\n" + "\n".join(f"  {p}" for p in problems),
            hint=f"fix the keys named above in {path}",
            problems=[dataclasses.replace(p, file=str(path)) for p in problems],
        )
    return cfg
