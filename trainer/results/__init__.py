"""Results: the report (table, JSON, plot), baselines trained alone, exported students."""
