"""VLA-RL (Lu et al., 2025) parts that do not depend on the env: pseudo-labels from successful
demonstrations, the robotic process reward model (RPRM) and its training module.
The reward shaping transform and the curriculum live in ``datamodules/`` (they act on rollouts)."""
