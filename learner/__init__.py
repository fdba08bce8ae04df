"""The learner: driver loop, Flow-GRPO math, DeepSpeed engine."""
