"""The twistd plugin: ``twistd pacsp2p [--config FILE]`` -> a PeerService. Nothing else."""

from twisted.application.service import ServiceMaker

pacsp2p = ServiceMaker(
    "pacsp2p",
    "pacsp2p.tap",
    "A peer of a cooperative peer-to-peer PACS cluster (DICOM facade on port 11112).",
    "pacsp2p",
)
