"""Label-quality benchmark (issue 12): a generated world with exact ground truth, simulated
specialists of known error rates, the engine's own filters and refinement rounds, and metrics
per step and round. Entry point: `python -m bench.quality` (bench/quality/run.py)."""
