"""Bundled and hub data: language registry, text sources, calibration sampler."""
