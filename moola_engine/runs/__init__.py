"""One run from config: run folders, observers, checkpoints and resume."""
