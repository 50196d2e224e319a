"""Deploy a model directory over SSH (Capistrano's layout and phases, for models).

Remote layout under ``remote_dir``::

    releases/<UTC yyyymmddHHMMSS>-<sha8>/   one model each, never edited after upload
    final -> releases/<...>                 what the service loads (the seed's path)
    .incoming-<id>/                         upload target; renamed into releases/ once verified
    deploys.log                             one JSON line per deploy/rollback/revert
    .deploy.lock                            flock()ed by the process deploying (see session.py)
    .ftctl/                                 root-only: status file, journal, file indexes

Where to look:

``local.py``     the model directory to ship (manifest checks)
``plan.py``      what will happen on a server (``--dry-run``): reuse, hard links, delta, bytes
``transfer.py``  bytes to the server: rsync over OpenSSH, or the SFTP fallback; verify
``server/``      the program that runs ON the server (standard library only, Python 3.6+):
                 lock holder, prepare, verify, the detached go-live, recovery of one that died
``program.py``   that program as shipped: zipped in memory, sent on stdin, checked by sha256
``session.py``   commands over one SSH connection, the lock tied to it
``host.py``      one server's phases: stage (lock ... verify), publish (go live, follow)
``fleet.py``     several servers: parallel upload, one-at-a-time go-live, canary, revert
``canary.py``    the canary wait: the first hosts' health polled before the rest go live
``history.py``   releases, deploys.log, the last go-live's status
"""

from __future__ import annotations

from ftctl.deploy.fleet import deploy, per_host, rollback
from ftctl.deploy.history import last_status, list_releases, probe
from ftctl.deploy.local import LocalModel, load_local_model
from ftctl.deploy.results import DeployResult, HostResult
from ftctl.deploy.session import Session
from ftctl.deploy.transfer import Hooks


def releases(session: Session) -> list[dict]:
    """Every release on one server (see :func:`~ftctl.deploy.history.list_releases`)."""
    return list_releases(session)


def status(session: Session) -> dict:
    """The last go-live on one server (see :func:`~ftctl.deploy.history.last_status`)."""
    return last_status(session)


__all__ = [
    "DeployResult",
    "Hooks",
    "HostResult",
    "LocalModel",
    "Session",
    "deploy",
    "last_status",
    "list_releases",
    "load_local_model",
    "per_host",
    "probe",
    "releases",
    "rollback",
    "status",
]
