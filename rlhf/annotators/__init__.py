"""Who ranks the sampled responses: the simulated evaluator panel, an AI judge, or a user function."""
