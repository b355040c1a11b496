"""A real 3-node NATS cluster for the tests: JetStream on every node, and every node's MQTT listener.

Mirrors tests/broker.py (Mosquitto): free ports on 127.0.0.1, state under a throwaway directory, the log to a
file, kill (SIGKILL) and restart on the same ports and the same store, so a restarted node rejoins with its data.

    cluster = NatsCluster(tmp_path).start()          # returns once JetStream has a meta leader
    cluster.urls                                     # ["nats://127.0.0.1:…", …] for nats-py's servers=
    cluster.mqtt_ports                               # one MQTT 3.1.1 listener per node
    cluster.kill(1); cluster.restart(1)              # node 1 crashes and comes back
    cluster.wait_meta_leader()

nats-server 2.9 (Debian's 2.9.10): MQTT is 3.1.1 only with QoS 0 and 1 (QoS 2 came in 2.10, MQTT 5 not at all),
it needs `server_name` and JetStream, and keeps its sessions and retained messages in JetStream streams whose
replicas follow the cluster size (3 here). After a node is killed, MQTT connects and QoS 1 deliveries wait for the
JetStream assets it led to get new leaders (the meta leader: 3-8 s here), and the server serves MQTT connects one
at a time with 4-s JetStream lookups: clients of the lost node are back some seconds to tens of seconds later.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.broker import HOST, free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER_NAME = "hashflex-test"


def nats_server(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    """One standalone nats-server with JetStream (a single node: the config's replicas are 1), up in well under
    a second; the 3-node cluster is NatsCluster below, used by test_service."""
    argv = [
        NATS_SERVER,
        "-a",
        HOST,
        "-p",
        str(port),
        "-js",
        "-sd",
        str(tmp_path / "js"),
        "-l",
        str(tmp_path / "nats.log"),
    ]
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while "Server is ready" not in read_log(tmp_path / "nats.log"):
        assert proc.poll() is None, read_log(tmp_path / "nats.log")
        assert time.monotonic() < deadline, read_log(tmp_path / "nats.log")
        time.sleep(0.05)
    return proc


def read_log(path: Path) -> str:
    """A log file's text so far: empty until the process has created it."""
    return path.read_text() if path.exists() else ""


@dataclass(frozen=True)
class NodePorts:
    client: int
    cluster: int
    mqtt: int
    monitor: int


def render_node_config(name: str, ports: NodePorts, routes: list[int], store_dir: Path, log_file: Path) -> str:
    """One node's config. `routes` are the cluster ports of every node (its own is ignored by the server)."""
    route_urls = ", ".join(f'"nats-route://{HOST}:{port}"' for port in routes)
    return f"""# hashflex test cluster node {name}
server_name: {name}
listen: {HOST}:{ports.client}
http: {HOST}:{ports.monitor}
log_file: "{log_file}"
logtime: true

jetstream {{
  store_dir: "{store_dir}"
  max_memory_store: 64MB
  max_file_store: 512MB
}}

cluster {{
  name: {CLUSTER_NAME}
  listen: {HOST}:{ports.cluster}
  routes: [{route_urls}]
}}

mqtt {{
  listen: {HOST}:{ports.mqtt}
}}
"""


class NatsNode:
    """One nats-server process of the cluster."""

    def __init__(self, name: str, workdir: Path, ports: NodePorts) -> None:
        self.name = name
        self.workdir = workdir
        self.ports = ports
        self.store_dir = workdir / "jetstream"
        self.log_file = workdir / "nats-server.log"
        self.config_file = workdir / "nats-server.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.ports.client}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        if self.alive:
            return
        self.process = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )

    def end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()

    def monitor(self, path: str) -> dict[str, object] | None:
        """A monitoring endpoint's JSON (None while the node does not answer)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ports.monitor}{path}", timeout=1.0) as response:
                body: dict[str, object] = json.loads(response.read())
                return body
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows of (None: none, or the node does not answer)."""
        jsz = self.monitor("/jsz")
        meta = jsz.get("meta_cluster") if jsz else None
        leader = meta.get("leader") if isinstance(meta, dict) else None
        return leader if isinstance(leader, str) and leader else None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"


class NatsCluster:
    """Three nats-server nodes in one cluster, each with JetStream and an MQTT listener, on free loopback ports."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        names = [f"n{i + 1}" for i in range(size)]
        ports = [NodePorts(free_port(), free_port(), free_port(), free_port()) for _ in names]
        routes = [p.cluster for p in ports]
        self.nodes: list[NatsNode] = []
        for name, node_ports in zip(names, ports, strict=True):
            node_dir = self.workdir / name
            node_dir.mkdir(exist_ok=True)
            node = NatsNode(name, node_dir, node_ports)
            node.config_file.write_text(render_node_config(name, node_ports, routes, node.store_dir, node.log_file))
            self.nodes.append(node)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def mqtt_ports(self) -> list[int]:
        return [node.ports.mqtt for node in self.nodes]

    @property
    def alive_nodes(self) -> list[NatsNode]:
        return [node for node in self.nodes if node.alive]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.spawn()
        self._wait_up(self.nodes, timeout)
        self.wait_meta_leader(timeout)
        return self

    def kill(self, index: int) -> None:
        """Crash one node (SIGKILL): its store stays on disk for `restart`."""
        self.nodes[index].end(signal.SIGKILL)

    def stop_node(self, index: int) -> None:
        """A clean shutdown of one node (SIGTERM)."""
        self.nodes[index].end(signal.SIGTERM)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again, same ports and store; returns once it sees a meta leader."""
        node = self.nodes[index]
        node.end(signal.SIGKILL)
        node.spawn()
        self._wait_up([node], timeout)
        self.wait_meta_leader(timeout, nodes=[node])

    def stop(self) -> None:
        for node in self.nodes:
            node.end(signal.SIGTERM)

    def meta_leader(self) -> str | None:
        """The meta leader the live nodes agree on (None while they do not agree or have none)."""
        leaders = {node.meta_leader() for node in self.alive_nodes}
        if len(leaders) == 1:
            (leader,) = leaders
            return leader
        return None

    def wait_meta_leader(self, timeout: float = 30.0, nodes: list[NatsNode] | None = None) -> str:
        """Until every live node (or every one of `nodes`) names the same JetStream meta leader, itself alive."""
        deadline = time.monotonic() + timeout
        alive_names = {n.name for n in self.alive_nodes}
        while time.monotonic() < deadline:
            self._check_running()
            watch = nodes if nodes is not None else self.alive_nodes
            leaders = {node.meta_leader() for node in [*watch, *self.alive_nodes]}
            if len(leaders) == 1:
                (leader,) = leaders
                if leader is not None and leader in alive_names:
                    return leader
            time.sleep(0.05)
        raise TimeoutError(f"no JetStream meta leader within {timeout} s\n{self.logs()}")

    def _wait_up(self, nodes: list[NatsNode], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            if all(node.monitor("/varz") is not None for node in nodes):
                return
            time.sleep(0.02)
        raise TimeoutError(f"nats-server did not answer within {timeout} s\n{self.logs()}")

    def _check_running(self) -> None:
        for node in self.nodes:
            process = node.process
            if process is not None and process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"nats-server {node.name} exited with {process.returncode}: {stderr}\n{node.log()}")

    def logs(self) -> str:
        return "\n".join(f"----- {node.name}\n{node.log()[-4000:]}" for node in self.nodes)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
