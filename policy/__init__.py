"""Model math shared by every stage: pipeline loading, LoRA, the SDE sampler and log-probs."""
