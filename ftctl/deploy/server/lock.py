"""The deploy lock: ``flock()`` on ``<remote_dir>/.deploy.lock``, held by a live process.

The kernel holds it: it goes when the last process holding it ends (exit, kill -9, reboot), so
nothing is ever broken by pid and two deployers cannot both hold it. The file itself is never
removed (removing a flock()ed file lets a second deployer lock a new file of the same name);
whoever takes it checks that the file it locked is still the one at the path.

The lock passes from the session's lock holder to the detached go-live without a gap: the
go-live inherits the very open file (``pass_fds``), and the holder only closes its copy.

``.deploy.lock.owner`` beside it says who holds it (the message a second deployer prints).
"""

import errno
import fcntl
import os
import time

from .fsops import atomic_write, read_json, remove
from .shared import LOCK, OWNER


class Lock:
    """The lock, held through ``fd`` (an open file description shared with a hand-over)."""

    def __init__(self, remote_dir, fd):
        self.remote_dir = remote_dir
        self.fd = fd

    @classmethod
    def take(cls, remote_dir, wait=1.0):
        """The lock, or None while another process holds it (tried for ``wait`` seconds: a
        ``status`` that looks at it for an instant does not make a deploy fail)."""
        path = os.path.join(remote_dir, LOCK)
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            if not _locked(fd, fcntl.LOCK_EX):
                os.close(fd)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
                continue
            if _same_file(fd, path):
                return cls(remote_dir, fd)
            os.close(fd)  # it was renamed away under us: lock the file now at the path

    def write_owner(self, info):
        """Record who holds it (the lock itself is the flock, not this record)."""
        atomic_write(os.path.join(self.remote_dir, OWNER), _dumps(info), 0o600)

    def release(self):
        """Give it back: the owner record goes first, then the last reference to the lock."""
        remove(os.path.join(self.remote_dir, OWNER))
        self.forget()

    def forget(self):
        """Close this process's reference only (after a hand-over the go-live holds it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _locked(fd, how):
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _same_file(fd, path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _dumps(info):
    import json

    return json.dumps(info, ensure_ascii=False, default=str) + "\n"


def is_held(remote_dir):
    """Whether a process holds the lock now (looked at with a shared lock for an instant)."""
    try:
        fd = os.open(os.path.join(remote_dir, LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not _locked(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def proc_start(pid):
    """The kernel's start time of ``pid`` (tells a live process from a reused pid)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder(remote_dir, wait=2.0):
    """Who holds the lock (its owner record), or None when nobody does. A lock taken an instant
    ago may not have its record yet (or show the last holder's): waits ``wait`` s for it."""
    deadline = time.monotonic() + wait
    while is_held(remote_dir):
        rec = read_json(os.path.join(remote_dir, OWNER))
        alive = rec is not None and isinstance(rec.get("pid"), int)
        if alive and proc_start(rec["pid"]) == rec.get("start"):
            return rec
        if time.monotonic() >= deadline:
            return dict(rec or {}, stale_record=True) if rec else {"owner": "unknown"}
        time.sleep(0.05)
    return None
