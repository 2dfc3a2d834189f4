# Makes tests/gpu a package, so pytest imports tests/gpu/conftest.py as `gpu.conftest`. Without it, pytest
# would import it as a second top-level `conftest` module and drop tests/conftest.py from sys.modules, and
# every later `from conftest import run_cli` in tests/test_*.py would get this file instead.
