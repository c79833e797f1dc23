"""serving: the hand-off from training to a serving tier.

It owns the export to Hugging Face layouts (dense, MoE, FP8), the check against transformers,
the vLLM launch, generation with our own engine, and the promotion gate.
"""
