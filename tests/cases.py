"""The test zoo is fisherlab's own (``fisherlab.zoo``), shared with ``fisherlab verify``."""

from fisherlab.zoo import BATCH_SIZES, CASES, Case, ResidualNet, SequenceNet

CASE_IDS = [c.name for c in CASES]

__all__ = ["BATCH_SIZES", "CASES", "CASE_IDS", "Case", "ResidualNet", "SequenceNet"]
