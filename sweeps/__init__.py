"""Optuna studies (``sweeps.study``) and ablation grids (``sweeps.grid``) over the experiment pipeline.

The top layer: sweeps import the experiments, never the other way round (pruning reaches the
segment stage as callbacks passed in). Nothing heavy is imported here.
"""
