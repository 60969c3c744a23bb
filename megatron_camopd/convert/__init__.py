"""HuggingFace <-> Megatron checkpoint conversion (`camopd convert`); see megatron_hf.py."""
