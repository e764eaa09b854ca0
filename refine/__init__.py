"""Stage 3: Florence-2 task codec, trainer, relabel + merge, round loop."""
