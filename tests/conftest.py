import sys
from pathlib import Path

# Tests import their helpers (hvdrun, reference, workers.common) by plain module name.
HERE = Path(__file__).resolve().parent
for p in (HERE, HERE / "workers"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
