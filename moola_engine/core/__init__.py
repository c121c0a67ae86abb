"""The loop and its contract: engine, hooks, plugin manager, freezing, plans, schedulers, data, models, metrics."""
