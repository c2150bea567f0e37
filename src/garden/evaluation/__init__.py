"""Model-level evaluation stages: whole checkpoints, batched on the GPU when there is one.

Perplexity and LAMBADA (paper 001's bifurcation-vs-perplexity study) and proportional effective rank and
CKA convergence ("Tending Towards Stability", paper 002) run in one pass over the checkpoints: each model
is loaded once per step and every stage reads it.
"""

from garden.evaluation import scorers  # noqa: F401  (registers the stages)
