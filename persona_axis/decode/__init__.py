"""Decoding: the one engine (schedule -> forward -> update), its runner and KV slots, interventions, capture."""
