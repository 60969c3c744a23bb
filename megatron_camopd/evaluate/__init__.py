"""Model evaluation (`camopd eval`): accuracy, pass@k, lm-evaluation-harness export; see core.py."""
