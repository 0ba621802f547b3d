"""Strategy plugins the tests load from a file (``[strategies] plugins = [path]``)."""
from __future__ import annotations

from pathlib import Path

BOOM = '''
from pacsp2p.strategies import hookimpl

name = "boom-placement"


@hookimpl
def pacsp2p_place(instance, archives, replicas):
    if instance.modality == "US":
        raise RuntimeError("boom: US placement exploded")
    return None
'''
BOOM_MESSAGE = "boom: US placement exploded"


def boom_plugin(directory: Path) -> Path:
    """Write a placement plugin that raises for modality US; its path."""
    path = Path(directory) / "boom.py"
    path.write_text(BOOM)
    return path
