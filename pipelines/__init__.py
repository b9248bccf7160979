"""Orchestration: one module per stage, the CLI, config loading, the demo world and its server."""

import os

# albumentations (imported by img2dataset) checks PyPI for updates at import; keep runs offline and quiet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
