"""The C extensions; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The initial load's binary COPY decoder (cdc/copybinary.py). Optional: without a compiler
        # pgbridge still installs, and the load reads COPY text instead.
        Extension(
            "pgbridge.cdc._copybin",
            ["src/pgbridge/cdc/_copybin.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
        # The stream's framing (cdc/wire.py), row walk and text columns (cdc/columnar.py); optional as
        # well: without it Python and numpy do that work.
        Extension(
            "pgbridge.cdc._rowwalk",
            ["src/pgbridge/cdc/_rowwalk.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
    ]
)
