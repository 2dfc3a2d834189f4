# Makes tests/gpu a package, so pytest imports tests/gpu/conftest.py as `gpu.conftest`. Without it, pytest
# would import it as a second top-level `conftest` module and drop tests/conftest.py from sys.modules, and
# any later `import conftest` (shared helpers live in tests/helpers.py, not there) would get this file.
