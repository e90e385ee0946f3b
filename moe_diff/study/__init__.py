"""`moe-diff study`: matched training runs over attention modes and seeds, the same held-out measurements on each
final model, and one report of every number with its spread over seeds."""

from moe_diff.study.runner import run_study

__all__ = ["run_study"]
