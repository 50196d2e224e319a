"""ftctl harvest (the live service's doubtful answers -> a review file) and
ftctl data import-review (the reviewed file -> training data)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ftctl.cli import common, ssh
from ftctl.config import Config, HarvestConfig, with_flags


def _training_data(conf: Config) -> list[Path]:
    """What the next round trains on: [train] new_data (else the generated [data]
    out_dir/name.jsonl) and the reviewed data."""
    generated = list(conf.train.new_data) or [conf.data.out_dir / f"{conf.data.name}.jsonl"]
    return [*generated, conf.data.reviewed]


def _known_texts(paths: list[Path]):
    from ftctl.data.examples import read_examples
    from ftctl.data.textkey import text_keys

    texts = [
        ex.text for p in paths if p.is_file() for ex in read_examples(p, max_chars=10**6).examples
    ]
    return set(text_keys(texts))


def _summary(res, out: Path) -> None:
    table = Table(title=f"harvest: {len(res.rows)} texts for review", title_justify="left")
    for col in ("text", "predicted", "score", "runner-up", "reason", "seen"):
        right = col in ("score", "seen")
        table.add_column(col, overflow="fold", justify="right" if right else "left")
    for c in res.rows[:15]:
        e = c.entry
        runner = f"{e.runner_up} {e.runner_up_score:.2f}" if e.runner_up_score is not None else "-"
        table.add_row(e.text, e.label, f"{e.score:.2f}", runner, " ".join(sorted(c.reasons)),
                      str(c.seen))  # fmt: skip
    if len(res.rows) > 15:
        table.add_row(f"... {len(res.rows) - 15} more in the file", "", "", "", "", "")
    common.out.print(table)
    s = res.stats
    common.out.print(
        f"read {s.entries} answers ({s.lines} lines, {len(s.files)} files); "
        f"{res.distinct} distinct texts, {res.doubtful} doubtful, {res.excluded} already in the "
        f"data; kept {len(res.rows)} across {len(res.per_intent)} intents",
        markup=False,
    )
    if s.without_text:
        common.out.print(f"{s.without_text} answers were logged without their text", markup=False)
    common.out.print(Text.assemble("wrote ", (str(out), "bold")))
    common.out.print(
        f"next: fill in the label column (Excel/WPS), save, then: ftctl data import-review {out}",
        markup=False,
    )


# `ftctl harvest`'s options, declared once (the command's signature names them)
LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log",
        help="The JSONL log: a path on the server, or a local file when neither --host "
        "nor --profile is given.",
        show_default="<remote_dir>/logs/predictions.jsonl",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="The review file (CSV).", show_default="data/review-<time>.csv"
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        help="Rows in the review file.",
        show_default=common.default_text(HarvestConfig, "limit"),
    ),
]
MaxScoreOpt = Annotated[
    float | None,
    typer.Option(
        "--max-score",
        help="Doubtful below this score.",
        show_default=common.default_text(HarvestConfig, "max_score"),
    ),
]
MinMarginOpt = Annotated[
    float | None,
    typer.Option(
        "--min-margin",
        help="Doubtful this close to the runner-up.",
        show_default=common.default_text(HarvestConfig, "min_margin"),
    ),
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", help="Only answers after this: 7d, 12h, 30m or a UTC date."),
]
ExcludeOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--exclude",
        help="Leave out texts already in this data file; repeatable.",
        show_default="the generated and the reviewed data, and the test pool",
    ),
]


def harvest_cmd(
    ctx: typer.Context,
    profile: ssh.ProfileOpt = None,
    host: ssh.HostOpt = None,
    identity: ssh.IdentityOpt = None,
    known_hosts: ssh.KnownHostsOpt = None,
    remote_dir: ssh.RemoteDirOpt = None,
    accept_host_key: ssh.AcceptKeyOpt = None,
    accept_new_host_key: ssh.AcceptNewOpt = False,
    log: LogOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    limit: LimitOpt = None,
    max_score: MaxScoreOpt = None,
    min_margin: MinMarginOpt = None,
    since: SinceOpt = None,
    exclude: ExcludeOpt = None,
    json_out: common.JsonOpt = False,
) -> None:
    """Pick the live service's doubtful answers for a human to label.

    Reads the prediction log over the same SSH profile as `ftctl deploy` (or a local file
    with --log), keeps answers with a low score, a close runner-up or a confused pair,
    deduplicated and shared out across the predicted intents, and writes a CSV that opens in
    Excel/WPS with an empty `label` column. Then: `ftctl data import-review FILE`.

    Example: `ftctl harvest --profile prod --since 7d --out data/review.csv`
    """
    from ftctl.data import harvest as core

    conf = common.config(ctx)
    hcfg = with_flags(conf.harvest, limit=limit, max_score=max_score, min_margin=min_margin)
    since_iso = core.parse_since(since) if since else None
    known = [*_training_data(conf), conf.eval.test_data]  # a reviewed test case would leak
    excluded = _known_texts(exclude if exclude is not None else known)
    rep = common.reporter(ctx)
    with contextlib.ExitStack() as opened:
        if profile is None and not host and log is not None:
            sources = [(core.LocalFiles(), log)]
        else:
            cfg, hosts = ssh.target(
                ctx, profile, host, identity=identity, known_hosts=known_hosts,
                remote_dir=remote_dir,
            )  # fmt: skip
            path = log or hcfg.log or f"{cfg.remote_dir.rstrip('/')}/logs/predictions.jsonl"
            connect = ssh.connector(cfg, accept_host_key, accept_new_host_key)
            # each connection closes at the end, also when a later host cannot be reached
            conns = [opened.enter_context(contextlib.closing(connect(spec))) for spec in hosts]
            sources = [(core.SFTPFiles(c), path) for c in conns]
        res = core.harvest(
            sources, hcfg, conf.eval.pairs, exclude=excluded, since=since_iso, progress=rep.info
        )
    target = out or core.default_review_path(conf.data.out_dir)
    core.write_review(target, res.rows, force=force)
    if json_out:
        common.emit_json(ctx, {
            "ok": True, "out": str(target), "files": res.stats.files,
            "answers": res.stats.entries, "distinct": res.distinct, "doubtful": res.doubtful,
            "already_in_data": res.excluded, "rows": len(res.rows),
            "without_text": res.stats.without_text, "bad_lines": res.stats.bad_lines,
            "per_intent": res.per_intent, "per_reason": res.per_reason,
        })  # fmt: skip
        return
    _summary(res, target)


def import_review_cmd(
    ctx: typer.Context,
    review: Annotated[Path, typer.Argument(help="The filled-in review file (CSV).")],
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help="The reviewed data the rows are appended to (.jsonl or .csv); never a file "
            "`data generate` writes.",
            show_default="[data] reviewed, data/reviewed.jsonl",
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Allowed labels: a model directory (its tokenizer then decides which texts are "
            "the same) or a file with one label per line (default: those in the training data "
            "and the review's predicted column).",
        ),
    ] = None,
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against",
            help="Also refuse texts labelled otherwise in this file; repeatable.",
            show_default="[train] old_data",
        ),
    ] = None,
    max_chars: common.MaxCharsOpt = None,
    json_out: common.JsonOpt = False,
) -> None:
    """Append the reviewed rows of a harvest's review file to the reviewed data.

    The reviewed data ([data] reviewed, data/reviewed.jsonl) is its own file: `data generate`
    never writes it, and `train` reads it after the generated data, so a reviewed label wins.
    Rows with an empty label are left out. Every filled row is checked first (empty text,
    unknown label, a text the reviewed data already has with another label, the same text
    with two labels), each problem with its row number; with any problem nothing is written
    (exit 3). The rows follow the file's format and header; the append is atomic and locked
    (two imports at once lose nothing). The review may be saved from Excel/WPS as CSV UTF-8
    or GB18030.

    Example: `ftctl data import-review data/review-20261130-081500.csv --labels models/live/final`
    """
    from ftctl.data.review import import_review

    conf = common.config(ctx)
    dcfg = with_flags(conf.data, max_chars=max_chars)
    target = to or dcfg.reviewed
    if against is None:
        against = [conf.train.old_data] if conf.train.old_data else []
    allowed = common.read_label_list(labels) if labels is not None else None
    res = import_review(
        review, target, labels=allowed, against=against, label_files=_training_data(conf),
        max_chars=dcfg.max_chars, tokenizer=common.model_tokenizer(labels),
    )  # fmt: skip
    if json_out:
        common.emit_json(ctx, res.to_dict())
        return
    common.out.print(
        Text.assemble(
            "added ", (str(len(res.added)), "bold"), f" reviewed rows to {target}",
            f" ({res.reviewed} of {res.rows} rows had a label; {res.already} already in the "
            f"data, {res.repeated} repeated)",
        )
    )  # fmt: skip
    if res.encoding != "utf-8-sig":
        common.out.print(f"(read as {res.encoding})", markup=False)
    nxt = (
        "ftctl train (it reads the reviewed data after the generated data: a reviewed label wins)"
        if target == dcfg.reviewed
        else f"ftctl train --new-data GENERATED --new-data {target} (the later file's label wins)"
    )
    common.out.print(f"next: {nxt}", markup=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app (import-review is under `ftctl data`)."""
    app.command("harvest")(harvest_cmd)
