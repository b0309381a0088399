"""The rating model: biased matrix factorisation, its optimisers and training loop, and its posterior mean."""
