"""The seed document's own words for the concepts ftctl's output names.

ftctl's messages are in English, as the tools around it are. The team it was built for reads
the seed document (scripts/finetune/README.md, in Chinese), so where a report heading or a
message names one of the seed's concepts, the seed's words stand beside the English:
``seed_term("confused pairs")`` is ``"混淆对 (confused pairs)"``. The Chinese is the seed's
wording, verbatim, so a reader can search the seed for it.
"""

from __future__ import annotations

SEED_WORDS: dict[str, str] = {
    "confused pairs": "混淆对",  # the seed's table of the three pairs
    "target pairs": "问题意图",  # the seed's section that lists them
    "comprehensive test": "验证微调效果",  # the seed's comprehensive_test.py section
    "replay": "数据回放",  # anti-forgetting strategy: --replay-ratio
    "frozen layers": "冻结早期层",  # anti-forgetting strategy: --freeze-layers
    "early stopping": "早停",  # anti-forgetting strategy, built in
    "keep old data": "保留旧数据",  # note 3: always mix in old data
    "backup": "备份原模型",  # note 5: back up the original model before deploying
    "other intents dropped": "其他意图准确率下降",  # FAQ 1
}


def seed_term(english: str) -> str:
    """``"<the seed's words> (<english>)"`` for a concept of the seed document."""
    return f"{SEED_WORDS[english]} ({english})"
