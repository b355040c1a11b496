"""A simulated mining site that speaks the real miner protocols (LuxOS, Whatsminer API v3, stock Antminer) well
enough for unmodified pyasic. Shares no code with agent/ or drivers/. See sim/README.md."""
