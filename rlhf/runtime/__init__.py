"""Run folders, seeding, atomic checkpoints, metrics logging. Shared by every stage, written once."""
