"""The wire contract between a site agent and the programs that talk to it (the grid side, the program coordinator,
the CLI): what goes on which topic, in which shape, signed how.

- `topics`: a site's MQTT topic tree (`<root>/<site>/…`) and the program coordinator's (`<root>/program/<id>/…`);
- `requests`: one pydantic model per verb, the verb sets (read, mutating, signed), the strict JSON reader and the
  wire's limits (ids, timestamps, nesting);
- `reply`: the `{id, status, data, error}` reply and its error codes;
- `signing`: Ed25519 over canonical JSON (`hashflex-sig-v2` for commands and heartbeats);
- `flex`: the flexibility document on `<root>/<site>/flex` (schema `hashflex.flex/1`);
- `status`: the status document (`status` verb, `<root>/<site>/state`, the metrics' and the CLI's input);
- `vocabulary`: the names both sides share (miner states, target sources);
- `units`: the power and duration strings a request may carry ("850kW", "30m").

Pure and small: no I/O and nothing from `hashflex.agent` (tests/unit/test_layers.py checks it), so a program that
talks to sites imports this package alone. `VERSION` names the contract: the major number changes when a document
or request changes in a way an older peer would misread.
"""

VERSION = "1.0"
