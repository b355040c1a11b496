"""hashflex's program coordinator: one grid-level command for many mining sites.

The grid side commands the whole mining program ("hold 1,400 MW from 18:00 to 22:00", "shed 300 MW now"); the
coordinator turns that into signed dispatches for each site's hashflex agent, keeping the most hashrate, follows
what every site delivers and moves the shortfall of a failing site to the others. It runs as two or three
instances on a 3-node NATS cluster (JetStream, with its MQTT listener as the sites' fabric): exactly one acts,
chosen through a lease in JetStream's key-value store, and program state lives replicated in JetStream.

Modules
- `allocation`: the pure allocation of a program target across sites (water-filling on marginal hashrate cost).
- `lease`: the leader lease on a replicated JetStream key-value bucket (compare-and-set on the revision, a TTL).
"""
