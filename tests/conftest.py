import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC3M_TSV = ROOT.parent / "shared" / "data" / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"
BIN = Path(sys.executable).parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture
def cc3m_tsv() -> Path:
    if not CC3M_TSV.exists():
        pytest.fail(f"the real CC3M validation list is missing: {CC3M_TSV}")
    return CC3M_TSV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
