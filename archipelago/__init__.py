"""archipelago: the command-line entry point and the shared configuration machinery.

This package sits beneath every other one: it owns the `archipelago` console script (which only
dispatches to each package's own `main`), the typed-config loader (TOML presets plus `--set`
overrides) and the run metadata every report records (seed, config, versions).
"""

__version__ = "0.1.0"
