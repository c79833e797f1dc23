"""island: everything that runs inside one data center.

It owns the model definition (dense and MoE), the real-text data pipeline (tokenizer, shards,
per-island loaders), the local inner trainer, and the DiLoCo client that registers with the
coordinator, trains H inner steps, pushes compressed pseudo-gradients and merges outer updates.
"""
