"""The demo: the seed's whole workflow on the shipped data, on this machine, end to end.

generate -> base classifier -> eval -> local "production" server (sshd + supervisor +
``ftctl serve``) -> incremental fine-tune -> gate -> deploy over SSH -> live predictions before
and after -> harvest of the live service's doubtful answers (its prediction log, over SSH).
Everything lands under ``workdir`` (default models/demo/), which the demo owns.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl.config import DeployConfig, EvalConfig, TrainConfig
from ftctl.errors import ConfigError, Problem
from ftctl.evaluate import check_gate
from ftctl.localserver import http_json
from ftctl.pipeline import StageResult, Stages
from ftctl.progress import NULL, Reporter

# The stand-in base model is tiny (hidden 64) and trained from scratch: the seed's 5e-6 suits a
# pretrained 100M-parameter model and would not move it in a few epochs. 5e-4 with the seed's
# other measures (8 frozen layers, early stopping, batch 8) does; at 2e-4 early stopping ends
# some runs before the pairs are learned (docs/data.md, "The demo story").
DEMO_LR = 5e-4
DEMO_EPOCHS = 8
DEMO_PATIENCE = 3
# The seed's FAQ: raise replay to 0.7-0.8 when other intents drop. They do here at 0.5 (a model
# trained from scratch has no pretrained lower layers to protect): SCHEDULE_QUERY, CLOCK_OUT and
# PRODUCTION_PLAN lost 16-40 points and the gate failed. 0.7 replays all of the original data.
DEMO_REPLAY = 0.7
REPLAY_WHY = (
    "replay {ratio} instead of the seed's 0.5: the seed's FAQ raises it to 0.7-0.8 when other "
    "intents drop, and at 0.5 this small model trained from scratch forgets SCHEDULE_QUERY, "
    "CLOCK_OUT and PRODUCTION_PLAN (16-40 points) and fails the gate"
)
# The seed document's own examples: what the live service must answer after a deploy.
SEED_EXAMPLES = (
    ("查看在产批次", "PROCESSING_BATCH_LIST"),
    ("帮我打卡", "CLOCK_IN"),
    ("发货统计", "SHIPMENT_STATS"),
)


# The 20 intents of the demo domain (shared/INTENTS.md), in catalog order.
DEMO_INTENTS = (
    "PROCESSING_BATCH_LIST",
    "MATERIAL_BATCH_QUERY",
    "CLOCK_IN",
    "ATTENDANCE_TODAY",
    "SHIPMENT_STATS",
    "CLOCK_OUT",
    "SHIPMENT_CREATE",
    "INVENTORY_QUERY",
    "QUALITY_INSPECTION",
    "EQUIPMENT_STATUS",
    "PRODUCTION_PLAN",
    "ORDER_QUERY",
    "LEAVE_REQUEST",
    "SUPPLIER_QUERY",
    "TRACE_PRODUCT",
    "ALERT_LIST",
    "COLD_CHAIN_TEMPERATURE",
    "REPORT_DAILY",
    "MATERIAL_RECEIVE",
    "SCHEDULE_QUERY",
)


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``ftctl demo``."""

    workdir: Path = Path("models/demo")  # everything the demo makes; emptied at the start
    data_dir: Path = Path("data")  # templates, original data, test cases
    lr: float = DEMO_LR  # learning rate for the small stand-in model (see DEMO_LR)
    epochs: int = DEMO_EPOCHS  # upper bound; early stopping usually ends sooner
    batch_size: int = 8  # seed
    replay_ratio: float = DEMO_REPLAY  # seed's FAQ value when other intents drop (see REPLAY_WHY)
    freeze_layers: int = 8  # seed
    patience: int = DEMO_PATIENCE  # early stopping
    seed: int = 42
    samples: int = 500  # eval draw (seed: comprehensive_test.py 500 12345)
    eval_seed: int = 12345
    ssh: bool = True  # deploy over SSH to a local sshd (else a local target, same deploy code)
    keep_serving: bool = False  # leave the local server running at the end
    showcase_per_intent: int = 2  # live predictions shown per pair intent
    traffic: int = 300  # test utterances sent to the live service before the harvest
    harvest_limit: int = 40  # rows of the demo's review file
    force: bool = False  # empty a non-empty workdir even if the demo did not make it

    def problems(self) -> list[Problem]:
        out = []
        if not self.lr > 0:
            out.append(Problem("must be > 0", field="demo.lr"))
        if self.epochs < 1:
            out.append(Problem("must be >= 1", field="demo.epochs"))
        return out


@dataclass
class DemoResult:
    """What the demo did, for the CLI to print (and --json)."""

    workdir: Path
    base_dir: Path | None = None
    candidate_dir: Path | None = None
    base_report: dict[str, Any] | None = None
    gate_report: dict[str, Any] | None = None
    report_dir: Path | None = None
    deploy: dict[str, Any] | None = None
    live_before: list[dict[str, Any]] = field(default_factory=list)
    live_after: list[dict[str, Any]] = field(default_factory=list)
    transport: str = ""
    server_url: str = ""
    harvest: dict[str, Any] | None = None
    stages: list[StageResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        gate = (self.gate_report or {}).get("gate", {})
        return {
            "ok": gate.get("verdict") == "PASS" and bool(self.deploy and self.deploy.get("ok")),
            "workdir": str(self.workdir),
            "base_dir": str(self.base_dir) if self.base_dir else None,
            "candidate_dir": str(self.candidate_dir) if self.candidate_dir else None,
            "report_dir": str(self.report_dir) if self.report_dir else None,
            "gate": gate,
            "pairs": pair_table(self.gate_report) if self.gate_report else [],
            "deploy": self.deploy,
            "transport": self.transport,
            "live": showcase_table(self.live_before, self.live_after),
            "harvest": self.harvest,
            "stages": [s.to_dict() for s in self.stages],
        }


# --------------------------------------------------------------------------- small pieces


def live_predictions(url: str, cases: Sequence[Any]) -> list[dict[str, Any]]:
    """Ask the live service for each showcase case; one request each, as users would."""
    out = []
    for ex in cases:
        answer = http_json(f"{url}/predict", {"text": ex.text})
        out.append(
            {
                "text": ex.text,
                "expected": ex.label,
                "label": answer["label"],
                "score": round(float(answer["score"]), 3),
                "sha256": answer.get("sha256"),
            }
        )
    return out


def showcase_cases(test_data: Path, pairs: Sequence[tuple[str, str]], per_intent: int):
    """The first ``per_intent`` test cases of each intent of the confused pairs (stable)."""
    from ftctl.data import load_examples

    wanted = list(dict.fromkeys(lab for pair in pairs for lab in pair))
    picked: dict[str, list] = {lab: [] for lab in wanted}
    for ex in load_examples(test_data, what="test"):
        if ex.label in picked and len(picked[ex.label]) < per_intent:
            picked[ex.label].append(ex)
    return [ex for lab in wanted for ex in picked[lab]]


def showcase_table(before: list[dict], after: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for b, a in zip(before, after, strict=False):
        rows.append(
            {
                "text": b["text"],
                "expected": b["expected"],
                "before": b["label"],
                "before_ok": b["label"] == b["expected"],
                "after": a["label"],
                "after_ok": a["label"] == a["expected"],
            }
        )
    return rows


def pair_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pair intent: accuracy (recall) before and after, from the gate report."""
    base, cand = report["baseline"], report["candidate"]
    rows = []
    for p_before, p_after in zip(base["pairs"], cand["pairs"], strict=True):
        rows.append(
            {
                "pair": f"{p_before['a']} <-> {p_before['b']}",
                "errors_before": p_before["a_as_b"] + p_before["b_as_a"],
                "errors_after": p_after["a_as_b"] + p_after["b_as_a"],
            }
        )
    return rows


def intent_recall(result: dict[str, Any], label: str) -> float | None:
    per = result.get("per_intent", {})
    row = per.get(label) if isinstance(per, dict) else None
    return None if row is None else row.get("recall")


# --------------------------------------------------------------------------- stages


def _generate(cfg: DemoConfig, out_dir: Path, reporter: Reporter) -> Path:
    from ftctl.config import DataConfig
    from ftctl.generate import write_generated

    templates = cfg.data_dir / DataConfig().templates.name
    dc = DataConfig(templates=templates, out_dir=out_dir, format="jsonl")
    made = write_generated(dc, reporter=reporter)
    reporter.info(f"{len(made.examples)} incremental examples -> {made.paths[0]}")
    return made.paths[0]


def _base(cfg: DemoConfig, out: Path, reporter: Reporter) -> Path:
    from ftctl.base import BaseConfig, build_base

    res = build_base(
        BaseConfig(
            data=cfg.data_dir / "original_training_data.jsonl", output_path=out, seed=cfg.seed
        ),
        reporter=reporter,
    )
    return res.final_dir


def _eval(cfg: DemoConfig, model: Path, baseline: Path | None, report_dir: Path, reporter):
    from ftctl.evaluate import run_eval
    from ftctl.report import write_report

    settings = EvalConfig(
        test_data=cfg.data_dir / "test_cases.jsonl",
        samples=cfg.samples,
        seed=cfg.eval_seed,
        report_dir=report_dir,
    )
    report = run_eval(model, settings, baseline_dir=baseline, reporter=reporter)
    write_report(report, report_dir, reporter=reporter)
    return report


def _train(cfg: DemoConfig, new: Path, base: Path, out: Path, reporter: Reporter) -> Path:
    from ftctl.train import train

    tc = TrainConfig(
        new_data=new,
        old_data=cfg.data_dir / "original_training_data.jsonl",
        model_path=base,
        output_path=out,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        replay_ratio=cfg.replay_ratio,
        freeze_layers=cfg.freeze_layers,
        seed=cfg.seed,
        patience=cfg.patience,
    )
    reporter.info(
        f"seed's strategies: replay {tc.replay_ratio}, {tc.freeze_layers} frozen layers, "
        f"batch {tc.batch_size}, early stopping (patience {tc.patience}), at most {tc.epochs} "
        f"epochs; lr {tc.lr:g} for this small stand-in model (the seed's 5e-6 is meant for the "
        "pretrained 100M-parameter chinese-roberta-wwm-ext)"
    )
    if tc.replay_ratio > 0.5:
        reporter.info(REPLAY_WHY.format(ratio=tc.replay_ratio))
    return train(tc, reporter=reporter).final_dir


class LocalServer:
    """The demo's production server: a real sshd, supervisor and ``ftctl serve``, on loopback.

    Laid out like the users' server before ftctl: ``remote_dir/final`` is a real directory
    holding the live (base) model, served by the ``python-services`` program.
    """

    def __init__(self, root: Path, live_model: Path, *, ssh: bool) -> None:
        from ftctl.localserver import LocalSSHD, Supervisor, free_port

        self.root = root
        self.remote_dir = root / "www" / "python-services" / "models" / "classifier"
        self.remote_dir.mkdir(parents=True)
        shutil.copytree(live_model, self.remote_dir / "final")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ftctl_cmd = [sys.executable, "-m", "ftctl", "serve"]
        self.supervisor = Supervisor(
            root / "supervisor",
            [*ftctl_cmd, "--model-path", str(self.remote_dir / "final"), "--port", str(self.port)],
        )
        self.sshd = LocalSSHD(root / "ssh") if ssh else None

    def start(self) -> LocalServer:
        from ftctl.errors import EnvironmentProblem
        from ftctl.localserver import wait_http

        if self.sshd is not None:
            self.sshd.start()
        self.supervisor.start()
        if not wait_http(f"{self.url}/health", 60):
            raise EnvironmentProblem(
                f"the local inference service did not come up on {self.url}",
                hint=f"see {self.supervisor.workdir}/python-services.log",
            )
        return self

    def deploy_config(self, smoke: Sequence[tuple[str, str]]) -> DeployConfig:
        sshd = self.sshd
        return DeployConfig(
            hosts=(sshd.host if sshd else "local",),
            identity=sshd.client_key if sshd else None,
            known_hosts=sshd.known_hosts if sshd else None,
            remote_dir=str(self.remote_dir),
            restart_cmd=self.supervisor.restart_cmd,
            health_url=f"{self.url}/health",
            health_timeout=90.0,
            smoke=tuple(smoke),
            keep_releases=5,
        )

    def close(self) -> None:
        self.supervisor.close()
        if self.sshd is not None:
            self.sshd.close()


def _deploy(model: Path, server: LocalServer, smoke, reporter: Reporter) -> dict[str, Any]:
    from ftctl.deploy import deploy
    from ftctl.remote import connect, parse_host

    cfg = server.deploy_config(smoke)
    if server.sshd is not None:
        hosts = [parse_host(h, cfg.user, cfg.port) for h in cfg.hosts]
        connector = lambda spec: connect(spec, cfg)  # noqa: E731
    else:
        from ftctl.localserver import local_connection

        hosts = ["local"]
        connector = lambda spec: local_connection()  # noqa: E731
    result = deploy(model, cfg, hosts, connector, reporter=reporter)
    if result.error is not None:
        raise result.error
    return result.to_dict()


def _harvest(cfg: DemoConfig, server: LocalServer, new_data: Path, out: Path) -> dict[str, Any]:
    """Users' traffic to the live service, then `ftctl harvest` over the deploy's SSH."""
    from ftctl.config import HarvestConfig
    from ftctl.data import load_examples
    from ftctl.harvest import LocalFiles, SFTPFiles, harvest, normalize, write_review
    from ftctl.remote import connect, parse_host

    tests = load_examples(cfg.data_dir / "test_cases.jsonl", what="test")[: cfg.traffic]
    for i in range(0, len(tests), 16):
        http_json(f"{server.url}/predict", {"texts": [ex.text for ex in tests[i : i + 16]]})
    log = f"{server.remote_dir}/logs/predictions.jsonl"
    exclude = {normalize(ex.text) for ex in load_examples(new_data)}
    conn = None
    if server.sshd is not None:
        dc = server.deploy_config(())
        conn = connect(parse_host(dc.hosts[0], dc.user, dc.port), dc)
    try:
        source = SFTPFiles(conn) if conn is not None else LocalFiles()
        res = harvest(
            [(source, log)], HarvestConfig(limit=cfg.harvest_limit), EvalConfig().pairs,
            exclude=exclude,
        )  # fmt: skip
    finally:
        if conn is not None:
            conn.close()
    write_review(out, res.rows, force=True)
    top = sorted(res.rows, key=lambda c: c.doubt)[:8]
    return {
        "out": str(out),
        "log": f"{source.name}:{log}",
        "answers": res.stats.entries,
        "distinct": res.distinct,
        "doubtful": res.doubtful,
        "rows": len(res.rows),
        "per_reason": res.per_reason,
        "top": [
            {
                "text": c.entry.text,
                "predicted": c.entry.label,
                "score": round(c.entry.score, 3),
                "runner_up": c.entry.runner_up,
                "reasons": sorted(c.reasons),
            }
            for c in top
        ],
    }


# --------------------------------------------------------------------------- the demo


WORKDIR_MARK = ".ftctl-demo"  # in a workdir the demo made: it may empty it next time


def prepare_workdir(cfg: DemoConfig) -> Path:
    """Empty ``cfg.workdir`` and mark it as the demo's. A non-empty directory without the mark
    (one the demo did not make: ~/models, say) is refused unless ``cfg.force``."""
    work = cfg.workdir.resolve()
    if work.exists() and not work.is_dir():
        raise ConfigError(f"--workdir {cfg.workdir}: exists and is not a directory")
    if work.is_dir() and any(work.iterdir()):
        if not (work / WORKDIR_MARK).exists() and not cfg.force:
            raise ConfigError(
                f"--workdir {cfg.workdir}: not empty, and not a directory the demo made "
                "(the demo empties its workdir first)",
                hint="choose another --workdir, or pass --force to empty this one",
            )
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORKDIR_MARK).write_text("made by ftctl demo; emptied by the next run\n")
    return work


def run_demo(cfg: DemoConfig, *, reporter: Reporter = NULL) -> DemoResult:
    """Run the whole demo; raises the failing stage's FtctlError (GateFailed: exit 4)."""
    work = prepare_workdir(cfg)
    result = DemoResult(workdir=work, transport="ssh" if cfg.ssh else "local")
    st = Stages("demo", 9, reporter)
    result.stages = st.results
    pairs = EvalConfig().pairs
    showcase = showcase_cases(cfg.data_dir / "test_cases.jsonl", pairs, cfg.showcase_per_intent)
    server: LocalServer | None = None
    try:
        with st.run("generate the incremental training data"):
            new_data = _generate(cfg, work / "data", reporter)

        with st.run("train the base classifier (stand-in for chinese-roberta-wwm-ext)"):
            result.base_dir = _base(cfg, work / "base", reporter)

        with st.run("comprehensive test of the base model (500 cases, seed 12345)"):
            base_reports = work / "reports" / "base"
            result.base_report = _eval(cfg, result.base_dir, None, base_reports, reporter)

        with st.run("start the production server (sshd + supervisor + ftctl serve) on loopback"):
            server = LocalServer(work / "server", result.base_dir, ssh=cfg.ssh).start()
            result.server_url = server.url
            result.live_before = live_predictions(server.url, showcase)

        with st.run("incremental fine-tune (replay, frozen layers, early stopping)"):
            result.candidate_dir = _train(
                cfg, new_data, result.base_dir, work / "incremental", reporter
            )

        with st.run("gate: candidate vs live model on the same cases"):
            result.report_dir = work / "reports" / "gate"
            result.gate_report = _eval(
                cfg, result.candidate_dir, result.base_dir, result.report_dir, reporter
            )
            check_gate(result.gate_report, result.report_dir)  # GateFailed: not deployed

        with st.run("deploy over SSH: backup, upload, verify, swap, restart, health, smoke"):
            result.deploy = _deploy(result.candidate_dir, server, SEED_EXAMPLES, reporter)

        with st.run("live predictions after the deploy"):
            result.live_after = live_predictions(server.url, showcase)

        with st.run("harvest: the live service's doubtful answers, over SSH, into a review file"):
            result.harvest = _harvest(cfg, server, new_data, work / "review.csv")
        return result
    finally:
        if server is not None and not cfg.keep_serving:
            server.close()
