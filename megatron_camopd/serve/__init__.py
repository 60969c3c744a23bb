"""`camopd serve` (alias `camopd serve-teacher`): a CPU server answering SGLang's `/generate` (scoring and sampling)
and its weight-sync endpoints (see `server.py`); `hf_scorer.py` scores with a HuggingFace-format checkpoint."""
