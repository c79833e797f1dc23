"""The typed config of a post-training island: an island job plus the task, the rollout engine and
the stages' tables. (The simulated run around it, with coordinator and islands, adds `[sim]` and
`[coordinator]` in sim/posttrain.py.)"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from island.job import IslandJobConfig
from posttrain.rollout import RolloutConfig
from posttrain.stages import DPOSection, GRPOSection, PosttrainSection, SFTSection
from posttrain.tasks import TaskConfig


@dataclass
class PipelineSection:
    """`archipelago posttrain pipeline`: extra `--set` overrides for each of its three stages."""

    pretrain_set: list[str] = field(default_factory=list)
    sft_set: list[str] = field(default_factory=list)
    grpo_set: list[str] = field(default_factory=list)


@dataclass
class PosttrainJobConfig(IslandJobConfig):
    posttrain: PosttrainSection = field(default_factory=PosttrainSection)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)

    def for_stage(self, stage: str) -> PosttrainJobConfig:
        """This config with `posttrain.stage = stage` and the stage's own lr, if it sets one."""
        lr = getattr(self, stage).lr
        cfg = replace(self, posttrain=replace(self.posttrain, stage=stage))
        return replace(cfg, optim=replace(cfg.optim, lr=lr)) if lr > 0 else cfg
