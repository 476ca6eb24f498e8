"""Recipes, the accelerate training loop, data, evaluation, the toy world and the xling command line."""
