"""The read side: what reads a finished OUT for the user (query, stats, show, calibrate, export).

The kernel (the rest of engine/ minus engine/cli.py) never imports this package: tests/test_layering.py.
"""
