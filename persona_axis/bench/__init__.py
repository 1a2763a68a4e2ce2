"""Measurements: throughput, serving, executors, prefix sharing, the llama.cpp peer, int8 fidelity."""
