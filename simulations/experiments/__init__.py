"""Experiment scripts that write tables: `python -m simulations.experiments <name> --out DIR`."""
