"""Biased matrix factorisation for MovieLens ratings, and the names every stage shares."""
