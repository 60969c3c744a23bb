"""`camopd serve-teacher`: a CPU server answering SGLang's `/generate` scoring subset over any `Scorer`
(see `server.py`); `hf_scorer.py` scores with a HuggingFace-format checkpoint."""
