"""Make this folder's helper modules (tiny_dit) importable, as the harness workers do."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.append(HERE)
