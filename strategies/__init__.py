"""Adapters between fedcl-dd's core and Flower / Avalanche."""
