"""Optuna studies (``sweeps.study``) and ablation grids (``sweeps.grid``) over the experiment pipeline.

Nothing heavy is imported here: the segment stage imports ``sweeps.study.pruning_callbacks`` and
must not pay for Optuna or MLflow when no study is running.
"""
