"""The program coordinator: one grid command for many sites (issue #15).

- `allocation`: the pure water-filling split of a program target across sites by marginal hashrate cost.
- `program`: the pure program core (signed program commands, replay protection, site dispatches derived from the
  program dispatch id and revision, delivery tracking and re-allocation of a site's shortfall).
- `lease`: the leader lease on NATS JetStream key-value (exactly one coordinator acts).
- `store`: program state on JetStream key-value (replicated, compare-and-set writes).
- `fabric`: the MQTT link to the sites (Mosquitto, or the NATS cluster's MQTT listener).
- `service`: the leader-gated asyncio service wiring the above.
"""
