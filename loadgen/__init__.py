"""Load generator for OpenAI-compatible servers, experiment sweeps and plots, and the cluster simulator.

Layers: `workload` (pure, seeded request specs), `client` (one streaming HTTP request), `runner` (open/closed
loop), `metrics` (pure functions over recorded timestamps), `capacity` (the highest rate that holds an SLO: the
search, its probes and their accounting), `report` and `plot` (files), `cli`; `sim/` is the discrete-event cluster
simulator (with `sim/capacity.py`, the same search over simulated rates). Nothing here imports sunray: it reaches
a server over HTTP only (the drivers that run the engine, such as the profile measurement, are in `experiments/`).
"""
