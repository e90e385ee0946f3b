"""What every job knows about routing: per-layer summaries of what routing chose, the routing trace file, and
recording a model's routing into one."""
