"""pyasic 0.79.0 behind one import: the only module of this package that imports pyasic.

pyasic's logger module calls logging.basicConfig() and sets the ROOT logger to WARNING at import time; logging is
the application's to configure, so the root logger is restored right after the import. Importing this module also
installs `drivers.pyasic_patches`, so no pyasic object this package builds runs without them.
"""

from __future__ import annotations

import logging

_root_logger = logging.getLogger()
_root_level, _root_handlers = _root_logger.level, list(_root_logger.handlers)
import pyasic  # noqa: E402
from pyasic import settings as pyasic_settings  # noqa: E402
from pyasic.errors import APIError  # noqa: E402
from pyasic.miners.backends.bmminer import BMMiner  # noqa: E402
from pyasic.miners.backends.unknown import UnknownMiner  # noqa: E402
from pyasic.miners.factory import MINER_CLASSES, MinerTypes, miner_factory  # noqa: E402
from pyasic.rpc.base import BaseMinerRPCAPI  # noqa: E402

from hashflex.drivers import pyasic_patches  # noqa: E402

_root_logger.setLevel(_root_level)
_root_logger.handlers[:] = _root_handlers
pyasic_patches.apply()

PYASIC_VERSION = "0.79.0"
get_miner = pyasic.get_miner

__all__ = [
    "MINER_CLASSES",
    "PYASIC_VERSION",
    "APIError",
    "BMMiner",
    "BaseMinerRPCAPI",
    "MinerTypes",
    "UnknownMiner",
    "get_miner",
    "miner_factory",
    "pyasic_settings",
]
