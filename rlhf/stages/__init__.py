"""One file per stage, each a `run(cfg)` that reads top to bottom."""
