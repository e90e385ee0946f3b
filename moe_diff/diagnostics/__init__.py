"""Routing diagnostics: statistics, plots and an HTML report of where tokens go, from checkpoints and traces."""

from moe_diff.diagnostics.compare import compare_traces
from moe_diff.diagnostics.diagnose import diagnose
from moe_diff.diagnostics.routing import routing_stats

__all__ = ["compare_traces", "diagnose", "routing_stats"]
