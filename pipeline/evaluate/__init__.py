"""Evaluation: perplexity / bits per byte and lm-eval-harness tasks."""
