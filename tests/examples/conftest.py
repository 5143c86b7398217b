"""The examples are scripts in examples/ (not installed): put the repository root on sys.path so that
`import examples` finds them (and not this tests/examples/ folder as a namespace package)."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
