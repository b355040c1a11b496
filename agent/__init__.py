"""hashflex: a site agent that makes a Bitcoin-mining site a grid-dispatchable load."""

__version__ = "0.1.0"
