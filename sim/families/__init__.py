"""Firmware families: each maps its wire requests to replies shaped as that firmware's are."""
