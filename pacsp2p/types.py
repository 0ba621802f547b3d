"""Small frozen value types shared by every part: the facade, the cluster API, the
catalog, the adapters and the strategies all speak in these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Query:
    """A C-FIND/C-MOVE/C-GET identifier, decoded.

    ``keys`` maps a keyword to its raw value string (multiple values joined with a
    backslash, '' for universal matching); ``root`` is "PATIENT" or "STUDY".
    """

    level: str
    keys: dict[str, str]
    root: str = "STUDY"


def is_pattern(vr: str, value: str) -> bool:
    """Is one value of a ``Query`` key a wildcard or a range (PS3.4 C.2.2.2.4-5), not a
    single value matched by equality?"""
    return "*" in value or "?" in value or (vr in ("DA", "TM", "DT") and "-" in value)


@dataclass(frozen=True)
class Scope:
    """What a delete removes (``Cluster.delete``): every instance of the studies
    (``level`` "STUDY"), series ("SERIES") or instances ("IMAGE") named by ``uids``."""

    level: str
    uids: tuple[str, ...]


@dataclass(frozen=True)
class Location:
    """One replica of an instance: which archive holds which bytes."""

    sop_instance_uid: str
    archive: str
    peer: str
    sha256: str
    size: int
    available: bool = True


@dataclass(frozen=True)
class InstanceMeta:
    """What the catalog learns from one instance's header (pixel data never decoded)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    attributes: dict[str, str] = field(default_factory=dict, hash=False)
    size: int = 0                   # bytes of the Part-10 file
    sha256: str = ""                # of the data set bytes after the file meta, if known
    data_size: int = 0              # bytes of the data set after the file meta, if known


@dataclass(frozen=True)
class Stored:
    """An archive's receipt for one stored instance."""

    archive: str
    sha256: str
    size: int
    duplicate: bool = False      # same UID, same bytes were already there
    conflict: bool = False       # same UID, different bytes: both kept
    given: str = ""              # the archive keeps a conversion (another transfer
                                 # syntax, ``sha256`` is of it): sha256 of what it was given

    @property
    def given_sha256(self) -> str:
        """sha256 of the data set the archive was given (what a sender's hash checks)."""
        return self.given or self.sha256


@dataclass(frozen=True)
class InstanceRef:
    """One instance of a retrieval, with the replicas that can serve it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    locations: tuple[Location, ...]


@dataclass(frozen=True)
class StoreResult:
    sop_instance_uid: str
    stored: tuple[Stored, ...]


class StoreError(Exception):
    """The cluster could not keep an instance; ``status`` is the DICOM status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TooMany(Exception):
    """More instances match than the caller's bound (``Cluster.get``/``move`` *limit*)."""


@dataclass(frozen=True)
class InstanceInfo:
    """What a strategy may know of an instance being placed (from its header)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    size: int
    attributes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ArchiveInfo:
    """One archive of the cluster as placement sees it."""

    name: str
    peer: str
    site: str | None = None
    alive: bool = True
    local: bool = False
    instances: int = 0
    free_bytes: int | None = None


@dataclass(frozen=True)
class PeerInfo:
    """A peer, e.g. the reader of a retrieval."""

    name: str
    site: str | None = None
