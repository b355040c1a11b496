"""hashflex: a Bitcoin-mining site as a grid-dispatchable load.

One import package over the repository's top-level folders, so an install claims one name in site-packages:
`hashflex.agent` (the site agent: core, runtime, I/O adapters, CLI), `hashflex.drivers` (miner drivers),
`hashflex.sim` (the simulated site), `hashflex.coordinator` (the program coordinator) and `hashflex.contract` (the
wire contract the agent, the coordinator and the CLI share). The folders stay at the top of the repository;
`hashflex/` holds a symlink to each.
"""
