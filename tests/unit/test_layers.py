"""The import rules of the house, checked on the source (every import, also those inside functions).

- agent/core is pure: nothing from agent.runtime, agent.io, agent.cli or drivers except drivers.base (the fleet
  snapshot, the miner state and memory types live there: core/snapshot.py, core/observe.py, core/miner_memory.py), and
  no module that does I/O or runs an event loop.
- drivers/* import only drivers.* and their vendor library: nothing from agent or sim.
- Only drivers/asic/vendor.py (and pyasic_patches) import pyasic; only agent/io/mqtt.py imports aiomqtt; only
  the agent/io/store package imports sqlite3 (checked over agent/, drivers/ and sim/; tests may use them directly).
- sim/ shares no code with agent/ or drivers/.
- contract/ (the wire contract) stands alone: nothing from agent, drivers, sim or coordinator, and no I/O; the agent,
  the coordinator and the CLI import it, so a program that talks to sites needs nothing else.
- No import circle inside agent/ (scripts/import_cycles.py): the runtime's parts take typed ports, not the controller.
- Everything is imported through the one import package: `hashflex.agent…`, never a bare `agent…` (an installed
  project claims only the name `hashflex`; the rules above name modules without that prefix).
- Tests share helpers through support modules, never through another test file (`tests.….test_*`), and nothing
  under tests/unit imports tests.integration: the fast suite needs no broker, NATS or simulated site.
- Every test asserts something: an `assert`, pytest.raises/warns/fail, or a call to a helper that asserts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "drivers", "sim", "coordinator", "contract")
TOP = "hashflex."
IO_MODULES = {"asyncio", "socket", "sqlite3", "subprocess", "aiomqtt", "pyasic", "httpx", "selectors", "ssl"}
OWNERS = {
    "pyasic": {"drivers/asic/vendor.py", "drivers/pyasic_patches.py"},
    "aiomqtt": {"agent/io/mqtt.py", "coordinator/fabric.py"},
    "sqlite3": {p.relative_to(ROOT).as_posix() for p in (ROOT / "agent/io/store").glob("*.py")},
    # the agent's meter adapter; the simulated site serves its meter with the same stack
    "pymodbus": {
        "drivers/modbus_tcp.py",
        "drivers/meter_modbus.py",
        "drivers/facility_modbus.py",
        "sim/meter.py",
        "sim/facility.py",
    },
    "nats": {"coordinator/lease.py", "coordinator/store.py"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: str | None = None) -> Iterator[str]:
    """Every absolute module name `path` imports (relative imports resolved against its package), without the
    `hashflex.` prefix, so the rules read as the folders do."""
    for name in raw_imports_of(path, package):
        yield name.removeprefix(TOP)


def raw_imports_of(path: Path, package: str | None = None) -> Iterator[str]:
    """Every absolute module name `path` imports, as written."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            yield module
            for alias in node.names:  # `from drivers import pyasic_driver` imports drivers.pyasic_driver
                yield f"{module}.{alias.name}"
        elif (  # __import__("x.y") and importlib.import_module("x.y") with a literal name
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_walker_sees_nested_relative_and_dynamic_imports(tmp_path: Path) -> None:
    # the rules below are only as good as the import walker: prove it on a file with every form
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nfrom . import base\nfrom .catalogue import lookup\n"
        "def f():\n    import sqlite3\n    from agent.core import units\n    __import__('aiomqtt')\n"
    )
    found = set(imports_of(probe, package="drivers"))
    assert {"os", "drivers.base", "drivers.catalogue", "sqlite3", "agent.core", "aiomqtt"} <= found


@pytest.mark.parametrize("path", sources(*PACKAGES, "tests"), ids=_rel)
def test_everything_is_imported_through_the_hashflex_package(path: Path) -> None:
    # a bare `agent` import works only from a checkout (the folder is on sys.path there) and would load a second
    # copy of the module beside `hashflex.agent…`, with its own globals
    bare = [m for m in raw_imports_of(path) if m.split(".")[0] in PACKAGES]
    assert not bare, f"{_rel(path)} imports {sorted(set(bare))}: write hashflex.{bare[0]}"


@pytest.mark.parametrize("path", sources("agent/core"), ids=_rel)
def test_core_is_pure(path: Path) -> None:
    def forbidden(module: str) -> bool:
        top = module.split(".", maxsplit=1)[0]
        if top in IO_MODULES:
            return True
        if top == "drivers":
            return module != "drivers" and not _under(module, "drivers.base")
        return top == "agent" and module != "agent" and not _under(module, "agent.core")

    bad = [m for m in imports_of(path) if forbidden(m)]
    assert not bad, f"{_rel(path)} (pure core) imports {sorted(set(bad))}"


@pytest.mark.parametrize("path", sources("drivers"), ids=_rel)
def test_drivers_import_only_drivers_and_their_vendor(path: Path) -> None:
    bad = [m for m in imports_of(path) if m.split(".")[0] in ("agent", "sim", "aiomqtt", "sqlite3")]
    assert not bad, f"{_rel(path)} imports {sorted(set(bad))}"


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_outside_library_has_one_owner(library: str) -> None:
    users = {_rel(p) for p in sources(*PACKAGES) if any(m.split(".")[0] == library for m in imports_of(p))}
    assert users <= OWNERS[library], f"{library} imported outside its owner: {sorted(users - OWNERS[library])}"


@pytest.mark.parametrize("path", sources("contract"), ids=_rel)
def test_the_contract_stands_alone(path: Path) -> None:
    allowed = {
        "__future__",
        "base64",
        "binascii",
        "json",
        "math",
        "re",
        "collections",
        "dataclasses",
        "datetime",
        "enum",
        "itertools",
        "pathlib",
        "typing",
        "cryptography",
        "pydantic",
        "contract",
    }
    bad = [m for m in imports_of(path) if m.split(".")[0] not in allowed]
    assert not bad, f"{_rel(path)} (the wire contract) imports {sorted(set(bad))}"


def test_the_coordinator_takes_the_wire_from_the_contract() -> None:
    # the coordinator is the second program on the wire: it must not reach into the agent for requests, replies,
    # signing, topics or the flexibility document
    wire = ("agent.protocol", "agent.commands", "agent.core.flexibility", "agent.io.mqtt")
    users = {_rel(p): m for p in sources("coordinator") for m in imports_of(p) if any(_under(m, w) for w in wire)}
    assert not users, f"the coordinator imports the wire from the agent: {users}"


@pytest.mark.parametrize("path", sources("sim"), ids=_rel)
def test_sim_shares_no_code_with_the_agent(path: Path) -> None:
    bad = [m for m in imports_of(path) if m.split(".")[0] in ("agent", "drivers")]
    assert not bad, f"{_rel(path)} imports {sorted(set(bad))}"


def test_pyasic_is_behind_the_driver_at_runtime_too() -> None:
    """Importing the agent's core and config must not pull pyasic in (it reconfigures the root logger)."""
    import subprocess
    import sys

    code = (
        "import sys, hashflex.agent.config, hashflex.agent.core.model, hashflex.agent.core.units,"
        " hashflex.drivers.base, hashflex.drivers.catalogue;"
        "print('pyasic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_the_command_does_not_load_the_simulator() -> None:
    """`hashflex run` on a site gateway never imports sim/ (nor matplotlib): only `hashflex sim|demo` do."""
    import subprocess
    import sys

    code = (
        "import sys, hashflex.agent.cli.main;"
        "print(sorted(m for m in sys.modules if m.startswith(('hashflex.sim', 'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_import_circle_inside_the_agent() -> None:
    """The runtime's parts take typed ports, not the controller: no module of agent/ imports one that imports it back
    (scripts/import_cycles.py, also runnable by hand)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "scripts/import_cycles.py", "agent"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stdout
    assert " 0 import circle(s)" in out.stdout


# ------------------------------------------------------------------------------------------------- the tests
def _imports_a_test_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:])


@pytest.mark.parametrize("path", sources("tests"), ids=_rel)
def test_tests_share_helpers_through_support_modules(path: Path) -> None:
    # a test file is not an API: importing one runs its module body (fixtures, keys, hypothesis settings) in another
    # file's session and ties that file to names any edit of the first may rename; what is shared lives in a support
    # module (tests/runtime_support.py, tests/coordinator/support.py, tests/integration/site_support.py, ...)
    bad = sorted({m for m in raw_imports_of(path) if _imports_a_test_module(m)})
    assert not bad, f"{_rel(path)} imports the test module(s) {bad}: move what they share to a support module"


@pytest.mark.parametrize("path", sources("tests/unit"), ids=_rel)
def test_unit_tests_import_nothing_from_the_integration_tests(path: Path) -> None:
    # the unit suite runs first and alone (no Mosquitto, NATS or simulated site): a helper both need lives in tests/
    bad = sorted({m for m in raw_imports_of(path) if _under(m, "tests.integration")})
    assert not bad, f"{_rel(path)} imports {bad}: move the helper to tests/"


# A call to one of these asserts on the test's behalf, so a test may consist of them alone: check_* (plan_checks.py's
# check_plan and the like), assert_*/expect_*, until/wait_* (wait for a condition or fail with a timeout; not
# asyncio's wait_for, which only bounds a wait), and run_state_machine_as_test (Hypothesis runs the machine's rules
# and invariants, which assert). A helper defined in the test's own module counts when its body asserts.
ASSERTING_PREFIXES = ("check", "assert", "expect", "until", "wait_", "run_state_machine")
NOT_ASSERTING = {"wait_for"}


def _called(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _asserts(fn: ast.AST, helpers: set[str]) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "pytest"
            and func.attr in ("raises", "warns", "fail")
        ):
            return True
        name = _called(node)
        if name is None or name in NOT_ASSERTING:
            continue
        if name.lstrip("_").startswith(ASSERTING_PREFIXES) or name in helpers:
            return True
    return False


def assertionless_tests(path: Path) -> list[str]:
    """The test functions of `path` that assert nothing, directly or through a helper (see ASSERTING_PREFIXES)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    helpers: set[str] = set()
    while True:  # the module's own helpers that assert, also through each other
        found = {f.name for f in functions if not f.name.startswith("test_") and _asserts(f, helpers)}
        if found <= helpers:
            break
        helpers |= found
    return [f.name for f in functions if f.name.startswith("test_") and not _asserts(f, helpers)]


def test_the_assertion_scan_sees_direct_and_delegated_assertions(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import asyncio, pytest\n"
        "def _inner(x):\n    assert x\n"
        "def _outer(x):\n    _inner(x)\n"
        "def test_direct():\n    assert 1\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_prefixed():\n    check_plan(1)\n"
        "def test_through_helpers():\n    _outer(1)\n"
        "async def test_only_waits():\n    await asyncio.wait_for(asyncio.sleep(0), 1)\n"
        "def test_nothing():\n    int('1')\n"
    )
    assert assertionless_tests(probe) == ["test_only_waits", "test_nothing"]


@pytest.mark.parametrize("path", sorted(p for p in sources("tests") if p.name.startswith("test_")), ids=_rel)
def test_every_test_asserts_something(path: Path) -> None:
    # a test that asserts nothing passes whatever the code does: give it the check its name promises
    assert assertionless_tests(path) == [], f"{_rel(path)}: these tests assert nothing"
