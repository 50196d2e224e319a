"""The environment that keeps the libraries ftctl drives offline and quiet.

One table for every place that needs it: the CLI (``silence_libraries`` at start-up), the tests
and their subprocesses, the benches, and the image's Dockerfile ``ENV`` (which cannot import
this; tests/unit/test_quiet.py checks that it holds every entry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType

# Environment, not transformers' logging API: importing transformers to set it would add ~1 s to
# every command, also to those that never load a model.
QUIET_ENV: Mapping[str, str] = MappingProxyType(
    {
        "HF_HUB_OFFLINE": "1",  # models come from local directories; never ask the hub
        "TRANSFORMERS_VERBOSITY": "error",  # no advisories beside ftctl's own output
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no bars of the hub's own
        "TOKENIZERS_PARALLELISM": "false",  # no fork warning, no extra threads
    }
)


def silence_libraries(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each entry of :data:`QUIET_ENV` in ``environ`` unless the user set it already."""
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)
