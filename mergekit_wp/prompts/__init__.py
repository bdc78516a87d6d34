"""Data for scoring real models, built by `mergekit-wp data`: paired IFEval prompts from the
shipped neutral requests (offline), and the math and code experts' prompts from hub datasets."""

from mergekit_wp.prompts.hub import HUB_SOURCES, gsm8k_rows, hub_rows, mbpp_rows, mbpp_stub
from mergekit_wp.prompts.ifeval import (
    describe_instruction,
    instruction_id,
    neutral_requests,
    paired_rows,
)

__all__ = [
    "HUB_SOURCES",
    "describe_instruction",
    "gsm8k_rows",
    "hub_rows",
    "instruction_id",
    "mbpp_rows",
    "mbpp_stub",
    "neutral_requests",
    "paired_rows",
]
