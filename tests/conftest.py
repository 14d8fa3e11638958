import os

# Busy-waiting OpenMP threads slow torch down many times over when processes share the cores
# (a CI runner, the Ray workers of a simulation); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
