"""`lowrank.compress`: configuration, plan, the sequential engine, rank allocation, offload, resume."""
