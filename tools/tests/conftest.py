"""Make this folder's helper (launch.py) and the trainer's modules (tools/) importable, as the harness workers do."""

import sys
from pathlib import Path

for folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
