"""Memory and compute of a recipe: activation tracing, estimate, CUDA measurement, budget search, complexity."""
