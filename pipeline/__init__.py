"""langprune: how the calibration language changes post-training pruning of multilingual LLMs."""

__version__ = "0.1.0"
