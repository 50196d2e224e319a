"""Configuration: one frozen dataclass per concern, loaded from ``ftctl.toml``; CLI flags win.

Every problem in the file (unknown keys, wrong types, out-of-range values) is collected into
one :class:`~ftctl.errors.ConfigError` instead of failing on the first.

Where to look:

``sections.py``  one frozen dataclass per table ([data], [train], [eval], [image],
                 [deploy.<profile>], [serve], [harvest]): fields, defaults, their checks
``load.py``      the whole file (:class:`Config`): reading, coercing, checking; flags over it

The names below are the package's interface: ``from ftctl.config import TrainConfig``.
"""

from __future__ import annotations

from ftctl.config.load import (
    CONFIG_FILE,
    Config,
    check,
    find_config,
    load_config,
    override,
    with_flags,
)
from ftctl.config.sections import (
    DEFAULT_BASE_IMAGE,
    SEED_PAIRS,
    SEED_REMOTE_DIR,
    SIZE,
    DataConfig,
    DeployConfig,
    EvalConfig,
    HarvestConfig,
    ImageConfig,
    ServeConfig,
    TrainConfig,
    gpus_problem,
    size_bytes,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_BASE_IMAGE",
    "SEED_PAIRS",
    "SEED_REMOTE_DIR",
    "SIZE",
    "Config",
    "DataConfig",
    "DeployConfig",
    "EvalConfig",
    "HarvestConfig",
    "ImageConfig",
    "ServeConfig",
    "TrainConfig",
    "check",
    "find_config",
    "gpus_problem",
    "load_config",
    "override",
    "size_bytes",
    "with_flags",
]
