"""posttrain: post-training stages that run as inner loops of an island.

It owns verifiable tasks and their verifiers, the sandbox for executed code, the rollout engine,
and the SFT, DPO and GRPO losses and loops, which sync through the same coordinator as
pre-training.
"""
