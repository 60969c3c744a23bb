"""Megatron-core side of the product.

Model layer: ``cpu_runtime`` (CPU adaptation of megatron-core, distributed set-up), ``model`` (GPTModel from a
HF config), ``hf_mapping`` (HF <-> Megatron weights with TP/PP sharding), ``vocab_parallel`` (log-probs,
entropy, top-k, sampling over a TP-sharded vocabulary), ``spawn`` (run a function on N local gloo ranks).
Training engine: ``forward``, ``loss``, ``engine``, ``checkpoint``, ``diagnostics``.
"""
