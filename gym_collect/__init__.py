"""gym_collect: bounded concurrent rollout collection, compatible with NeMo Gym."""

__version__ = "0.1.0"
