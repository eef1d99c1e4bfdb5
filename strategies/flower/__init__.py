"""Flower adapters: the ClientApp that uploads synthetic sets and the strategy that trains on them."""
