"""Protocol workers: one process per role, each a shell around a sans-IO core."""

import pipeline  # noqa: F401  (activates the compiled build first, see pipeline/compiled.py)
