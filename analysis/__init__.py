"""Analyses over masks and hidden states: IoU, SNR, LSAR, LAPE; reports and plots."""
