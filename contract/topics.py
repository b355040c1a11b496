"""The MQTT topic trees: a site's (`<root>/<site id>/…`, the agent's `mqtt_root`) and a program's
(`<root>/program/<program id>/…`, the coordinator's).

A site's tree (agent.io.mqtt says how each is published: retain, QoS, queueing):

    availability  out  "online" / "offline" (retained; "offline" is also the last will)
    info          out  the agent's info document (retained)
    state         out  the status document (`contract.status`, retained)
    flex          out  the flexibility document (`contract.flex`, retained)
    telemetry     out  periodic site figures (lossy)
    miners/<id>   out  per-miner detail (retained)
    events        out  the dispatch lifecycle (in order)
    cmd/<verb>    in   requests (`contract.requests`)
    reply/<verb>  out  one `Reply` per request (`contract.reply`)
    heartbeat     in   the grid's signed heartbeat (`contract.signing`)

A program's tree: `cmd/<verb>` in (program commands from the grid), `reply/<verb>` out, `state` out (retained).

`Topics("<root>/+")` gives the subscription filters over every site of a root (`…/+/flex`, `…/+/reply/+`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """One site's topics under `root` (`<root>/<site id>`)."""

    root: str

    @classmethod
    def of_site(cls, root: str, site_id: str) -> Topics:
        return cls(f"{root}/{site_id}")

    @property
    def availability(self) -> str:
        return f"{self.root}/availability"

    @property
    def info(self) -> str:
        return f"{self.root}/info"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.root}/telemetry"

    @property
    def flex(self) -> str:
        return f"{self.root}/flex"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def heartbeat(self) -> str:
        return f"{self.root}/heartbeat"

    @property
    def commands(self) -> str:
        """The subscription filter for requests."""
        return f"{self.root}/cmd/+"

    def command(self, verb: str) -> str:
        return f"{self.root}/cmd/{verb}"

    def reply(self, verb: str) -> str:
        return f"{self.root}/reply/{verb}"

    def miner(self, miner_id: str) -> str:
        # an id is one topic level: wildcards and separators would change what the topic means
        safe = "".join("_" if ch in "/+#" else ch for ch in miner_id)
        return f"{self.root}/miners/{safe}"

    def verb_of(self, topic: str) -> str | None:
        """The verb of a request topic, None for any other topic."""
        prefix = f"{self.root}/cmd/"
        if not topic.startswith(prefix):
            return None
        verb = topic[len(prefix) :]
        return None if "/" in verb else verb


@dataclass(frozen=True, slots=True)
class ProgramTopics:
    """A coordinated program's topics (`<root>/program/<program id>`)."""

    root: str
    program_id: str

    @property
    def base(self) -> str:
        return f"{self.root}/program/{self.program_id}"

    @property
    def commands(self) -> str:
        """The subscription filter for program commands."""
        return f"{self.base}/cmd/+"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    def command(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}"

    def reply(self, verb: str) -> str:
        return f"{self.base}/reply/{verb}"
