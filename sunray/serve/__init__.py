"""Ray Serve layer: a thin shell over the engines (prefill per task model, a shared decode pool, a central router)."""
