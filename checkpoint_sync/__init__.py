"""checkpoint-sync: fast, resumable, verified mirroring of ML training checkpoints."""

__version__ = "0.1.0"
