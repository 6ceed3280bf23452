"""The math as pure functions: losses, advantages, KL, ranking aggregation; no model loading."""
