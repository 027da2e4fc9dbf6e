"""rlhf: SFT, reward modelling, PPO and DPO on LoRA adapters, driven by Hydra configs."""

__version__ = "0.1.0"
