"""Shared fixtures: real Orthanc servers, real pacsp2p peers, storescp, synthetic DICOM.

Everything here starts real processes on free loopback ports and stops them by PID.
A missing tool is an error (FileNotFoundError), never a skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pacsp2p.testing import Orthanc, Peer, StoreSCP
from pacsp2p.testing import datasets


@pytest.fixture(scope="session")
def dicom_samples(tmp_path_factory) -> dict[str, Path]:
    """One file each: ct (512x512), ct_implicit, mr, rle, private, private_implicit."""
    return datasets.sample_files(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="session")
def sample_study(tmp_path_factory) -> list[Path]:
    """A small two-series CT+MR study (64x64 images), Explicit VR LE."""
    return datasets.make_study(tmp_path_factory.mktemp("study"), size=64)


@pytest.fixture(scope="session")
def find_corpus(tmp_path_factory) -> datasets.Corpus:
    """The deterministic C-FIND corpus (12 patients, ~100 tiny instances)."""
    return datasets.make_find_corpus(tmp_path_factory.mktemp("find-corpus"))


@pytest.fixture
def make_orthanc(tmp_path):
    """Factory: make_orthanc(aet="ORTHANC", modalities=..., config=...) -> started Orthanc."""
    started: list[Orthanc] = []

    def factory(**kwargs) -> Orthanc:
        workdir = tmp_path / f"orthanc{len(started)}"
        orthanc = Orthanc(workdir, **kwargs)
        started.append(orthanc)
        return orthanc.start()

    yield factory
    for orthanc in reversed(started):
        orthanc.stop()


@pytest.fixture
def orthanc(make_orthanc) -> Orthanc:
    """A fresh, empty Orthanc (AE ORTHANC)."""
    return make_orthanc()


@pytest.fixture
def make_peer(tmp_path):
    """Factory: make_peer(**Peer kwargs, e.g. destinations=..., config={...}) -> started Peer."""
    started: list[Peer] = []

    def factory(**overrides) -> Peer:
        overrides.setdefault("name", f"peer{len(started)}")
        peer = Peer(tmp_path / overrides["name"], **overrides)
        started.append(peer)
        return peer.start()

    yield factory
    for peer in reversed(started):
        peer.stop()
        print(f"peer {peer.name}: log {peer.log_path}")


@pytest.fixture
def peer(make_peer) -> Peer:
    """One started peer with default config (AE PACSP2P)."""
    return make_peer()


@pytest.fixture
def storescp(tmp_path):
    """A running storescp (AE STORESCP) writing into tmp_path/'received'."""
    with StoreSCP(tmp_path / "received", ae_title="STORESCP") as scp:
        yield scp
