"""Scoring samples: the metrics (FID, Inception Score, precision/recall,
FD-digits, toy2d distances), the networks behind them, and the quick and the
full (`--mode=evaluate`) evaluations. Imports `multistep_cm.core` and the
method, never the train loop."""
