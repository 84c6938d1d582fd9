"""Experiment config files (`get_config(arg)` returning an ml_collections ConfigDict)."""
