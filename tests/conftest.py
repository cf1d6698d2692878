import sys
from pathlib import Path

# Let tests import the shared doubles in tests/helpers.py.
sys.path.insert(0, str(Path(__file__).parent))
