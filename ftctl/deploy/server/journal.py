"""What a go-live or a first deploy's backup is about to do, on disk before it does it.

One journal at a time (its writer holds the lock). A process that dies (kill -9, OOM, reboot)
leaves it behind; the next process to take the lock finishes the job from it
(:mod:`.recovery`) and removes it.
"""

import os

from .fsops import fsync_path, read_json, remove, state_dir, write_json
from .shared import JOURNAL


def path(remote_dir):
    return os.path.join(remote_dir, ".ftctl", JOURNAL)


def write(remote_dir, doc):
    """Record ``doc`` (and make sure it survives a power cut) before acting on it."""
    write_json(os.path.join(state_dir(remote_dir), JOURNAL), doc)
    fsync_path(state_dir(remote_dir))


def read(remote_dir):
    return read_json(path(remote_dir))


def clear(remote_dir):
    remove(path(remote_dir))
    fsync_path(os.path.dirname(path(remote_dir)))
