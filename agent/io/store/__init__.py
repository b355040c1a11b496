"""The agent's memory on disk: one SQLite file in the state directory. The only package that imports sqlite3.

What it keeps: kv state (runtime cap, fail-safe state, counters), command replies by id (idempotency, forever),
dispatches and their progress (operator overrides are dispatches too), the identity cache, what the agent did to
each miner, the hash-chained audit trail with optional signed daily heads, and energy per minute.

Durability. WAL mode; `synchronous=FULL` so every commit is on disk when the call returns (a power cut of the
gateway loses nothing acknowledged), except energy minutes, which are committed with NORMAL (they reach the disk
with the next FULL commit or checkpoint; a power cut may lose the last minutes, never corrupt). Writes made inside
one `with store.transaction():` commit together or not at all.

Damage. `Store.open` checks the file before trusting it: the SQLite header against the file size (a cut file),
then `PRAGMA quick_check` of every table except the bulky per-miner energy (checked by `verify_audit`). Any
failure raises StoreCorrupt with what was found; the agent then starts safe at the fail-safe level. A missing
file is created fresh (built under a temporary name and renamed, so a crash during creation never leaves an empty
file that could be mistaken for a fresh start).

Not damage. Only SQLite's own verdict (SQLITE_CORRUPT, SQLITE_NOTADB) and the checks above mean a damaged file. A
full disk, another process's lock, a read-only file system or an I/O error raise StoreUnavailable: the file is
sound and may be used later, so it is never moved aside for that (see `classify`). How long a call waits for
another process's lock is the store's busy timeout (`Store.open(busy_timeout_ms=)`): the CLI waits 10 s, the
agent's control loop a few milliseconds, and retries later. A safe start that is pending is remembered outside
the database, in a marker file next to it (`remember_safe_start`), because the database is what failed.

Threads. Calls on a Store are serialised by a lock. The light calls (everything that writes one thing) take well
under a millisecond plus one fsync. The heavy calls read through their own short-lived read-only connection, so
the runtime can run them with `asyncio.to_thread` while its loop keeps writing: `verify_audit`, `audit_records`,
`energy_minutes`, `energy_rollup`, `energy_per_miner`, `export`, and `prune` (which writes, in bounded chunks).


Layout. `Store` (store.py) holds the writing connection, its lock and transactions, and calls per-topic functions
that take the connection: database.py (errors, the file's header, connections, schema and migrations),
control.py (kv state, replies, dispatches, identities, miner control memory), audit.py (the chain and its signed
daily heads), energy.py (minutes, the per-miner split, pinning), export.py (what an export gathers, the
watermark), retention.py (pruning), verify.py (`verify_database`); safe_start.py keeps the marker outside the
database.
"""

from hashflex.agent.io.store.database import (
    DEFAULT_BUSY_TIMEOUT_MS,
    SCHEMA_VERSION,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    check_file,
    classify,
)
from hashflex.agent.io.store.retention import PruneResult
from hashflex.agent.io.store.safe_start import (
    SAFE_START_MARKER,
    clear_safe_start,
    pending_safe_start,
    remember_safe_start,
)
from hashflex.agent.io.store.store import Store
from hashflex.agent.io.store.verify import verify_database

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "SAFE_START_MARKER",
    "SCHEMA_VERSION",
    "PruneResult",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "check_file",
    "classify",
    "clear_safe_start",
    "pending_safe_start",
    "remember_safe_start",
    "verify_database",
]
