"""The training loop as a place: `train.py` (the outer loop, one short file), `session.py` (everything a run holds,
built once from the spec), `resume.py` (what a run resumes from, decided before any model loads), `state.py` (the
training state a checkpoint holds: save and resume), `steprow.py` (a step's metrics row and the gradient
diagnostics), `sft.py` (SFT steps) and `metrics.py` (metrics.jsonl, progress, wandb)."""
