"""rlhf: supervised fine-tuning, reward models on K-way rankings, and PPO from human feedback."""

__version__ = "0.1.0"
