"""The archive contract: the same checks against every adapter, each on its real archive.

As Tahoe-LAFS does in ``test_istorageserver.py``: mixins hold the test methods — what
every archive promises (``ArchiveContract``: the interfaces it claims, health, open,
listing by crawl or walk, a UID it does not hold) and what an archive that takes new
instances promises (``StoreContract``: store, duplicate, discard, delete where it
can) — and one class per
adapter starts the real archive once (class-scoped fixture) and builds the adapter the
way a peer does (``make_archive``: entry point or file, checked against the interfaces):
embedded, dimse against DCMTK dcmqrscp, orthanc against Orthanc, dicomweb against
Orthanc's DICOMweb plugin, and the example ``plugins/folder_archive.py``.

The adapters' methods run in the reactor (in a thread, as in test_scu.py); the tests
call them with ``blockingCallFromThread``, each under a timeout.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread

from pacsp2p.adapters import make_archive
from pacsp2p.adapters.interface import CAPABILITIES, IArchive, problems
from pacsp2p.catalog import Catalog
from pacsp2p.config import from_dict
from pacsp2p.dicom.header import content_hash, read_meta
from pacsp2p.testing import Orthanc, datasets
from pacsp2p.testing.dcmqrscp import DcmQrScp
from pacsp2p.testing.dcmtk import dataset_sha256_of
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.types import Location

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FOLDER_ADAPTER = Path(__file__).resolve().parents[2] / "plugins" / "folder_archive.py"
LISTED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
          "PatientName", "Modality", "StudyDate")
NOT_HELD = (KeyError, FileNotFoundError)        # IOpens.open of a UID not held


@pytest.fixture(scope="module", autouse=True)
def running_reactor():
    if not reactor.running:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                         daemon=True, name="reactor").start()
    return reactor


def call(fn, *args, timeout: float = 120.0):
    """fn(*args) in the reactor thread; its Deferred's result (or exception) here."""
    def run():
        return defer.maybeDeferred(fn, *args).addTimeout(timeout, reactor)
    return blockingCallFromThread(reactor, run)


def build(block: dict, data_dir: Path, catalog=None):
    """The archive of one ``[[archives]]`` block, made as the peer makes it."""
    settings = from_dict({"peer": {"data_dir": str(data_dir)}, "archives": [block]},
                         str(data_dir / "contract.toml"), data_dir)
    return make_archive(settings.archives[0], settings, reactor, catalog=catalog)


@pytest.fixture(scope="class")
def catalog(tmp_path_factory):
    """A real, started catalog (handed to the adapters, as the peer does)."""
    c = Catalog(tmp_path_factory.mktemp("catalog") / "catalog.sqlite", reactor, peer="p1")
    call(c.start)
    yield c
    call(c.stop)


def started(archive):
    call(archive.start)
    return archive


def instance(directory: Path, name: str, **attrs) -> Path:
    """A new Part-10 file (its own UIDs and patient), named *name*."""
    ds = datasets.make_image("CT", size=16, seed=7,
                             SOPInstanceUID=datasets.uid("contract", name),
                             SeriesInstanceUID=datasets.uid("contract-series", name),
                             StudyInstanceUID=datasets.uid("contract-study", name),
                             PatientID=f"C-{name}"[:16], PatientName=f"CONTRACT^{name}",
                             **attrs)
    return datasets.write(ds, directory / f"{name}.dcm")


def read_all(f) -> bytes:
    with f:
        return f.read()


class ArchiveContract:
    """What every archive promises. A subclass provides the class-scoped fixture
    ``archive`` (started) and ``put(archive, path)``: how a file gets into it."""

    def put(self, archive, path: Path) -> None:
        raise NotImplementedError

    def listing(self, archive) -> dict:
        """{SOP Instance UID: InstanceMeta} of everything the archive lists, by ``crawl``
        (every page, from the beginning) or ``walk``."""
        if "crawl" in archive.capabilities:
            asked = []

            def throttle():
                asked.append(1)
                return defer.succeed(None)
            found, cursor = {}, None
            for _ in range(1000):
                items, cursor, _total = call(archive.crawl, cursor, throttle)
                found.update((m.sop_instance_uid, m) for m, _size in items)
                if cursor is None:
                    break
            assert asked, "crawl sent no throttle() before querying the archive"
            return found
        assert "walk" in archive.capabilities, "the archive can be listed neither way"
        return {m.sop_instance_uid: m for m, stored in archive.walk()}

    def test_provides_what_it_claims(self, archive):
        assert problems(archive) == []
        assert IArchive.providedBy(archive)
        for cap in archive.capabilities:
            assert CAPABILITIES[cap].providedBy(archive), cap
        assert "open" in archive.capabilities

    def test_health_says_up(self, archive):
        health = call(archive.health)
        assert health["up"] is True, health
        assert "free_bytes" in health and "latency_ms" in health
        assert health["latency_ms"] is None or 0 <= health["latency_ms"] < 10_000

    def test_open_gives_the_bytes_back(self, archive, tmp_path):
        path = instance(tmp_path, "open")
        self.put(archive, path)
        uid = read_meta(path).sop_instance_uid
        want = dataset_sha256_of(path.read_bytes())
        data = read_all(call(archive.open, uid))
        assert data[128:132] == b"DICM"                       # a Part-10 file
        assert dataset_sha256_of(data) == want                # data set as received
        sha, _ = content_hash(path)
        assert dataset_sha256_of(read_all(call(archive.open, uid, sha))) == want

    def test_lists_it_with_its_attributes(self, archive, tmp_path):
        path = instance(tmp_path, "listed")
        self.put(archive, path)
        sent = read_meta(path)
        found = self.listing(archive)
        assert sent.sop_instance_uid in found, sorted(found)
        meta = found[sent.sop_instance_uid]
        assert meta.sop_class_uid == sent.sop_class_uid
        assert {k: meta.attributes.get(k) for k in LISTED} == \
               {k: sent.attributes.get(k) for k in LISTED}

    def test_open_of_a_uid_not_held_fails_cleanly(self, archive):
        with pytest.raises(NOT_HELD):
            call(archive.open, "2.25.94608243377362116094530209136420387")
        assert call(archive.health)["up"] is True             # and it goes on


class StoreContract:
    """What an archive with capability ``store`` promises; ``put`` is ``store``.
    ``deletes``: whether ``discard`` really drops a copy (else it logs and keeps it);
    ``versions``: whether a conflicting version is kept beside the first (else the
    archive keeps its first copy and the conflict is only reported)."""

    deletes = True
    versions = False

    def put(self, archive, path: Path) -> None:
        stored = call(archive.store, path, read_meta(path))
        assert not (stored.duplicate or stored.conflict)

    def test_store_reports_the_hash_and_keeps_the_file_given(self, archive, tmp_path):
        path = instance(tmp_path, "store")
        before = path.read_bytes()
        stored = call(archive.store, path, read_meta(path))
        assert stored.archive == archive.name
        assert (stored.sha256, stored.size) == content_hash(path)
        assert not stored.duplicate and not stored.conflict
        assert path.read_bytes() == before                    # the peer's file stays

    def test_the_same_again_is_a_duplicate(self, archive, tmp_path):
        path = instance(tmp_path, "again")
        first = call(archive.store, path, read_meta(path))
        again = call(archive.store, path, read_meta(path))
        assert again.duplicate and not again.conflict
        assert (again.sha256, again.size) == (first.sha256, first.size)

    def test_a_version_kept_beside_is_opened_by_its_hash(self, archive, tmp_path):
        """The same SOP Instance UID stored twice with other bytes: a conflict. An archive
        that keeps both versions gives the one *sha256* names, never the other (a
        retrieval or repair asks for the version the catalog records); one that keeps
        its first copy gives that one."""
        one_path, two_path = (instance(tmp_path / name, "versions", InstitutionName=name)
                              for name in ("ONE", "TWO"))
        one = call(archive.store, one_path, read_meta(one_path))
        two = call(archive.store, two_path, read_meta(two_path))
        assert one.sha256 != two.sha256
        uid = read_meta(one_path).sop_instance_uid
        assert two.conflict and not two.duplicate
        if not self.versions:
            assert dataset_sha256_of(read_all(call(archive.open, uid))) == one.sha256
            return
        for want in (two.sha256, one.sha256):
            assert dataset_sha256_of(read_all(call(archive.open, uid, want))) == want
        if "read_many" in archive.capabilities:
            got = call(archive.read_many, [(uid, two.sha256), (uid, one.sha256)], 1 << 20)
            assert [dataset_sha256_of(data) for data, _ in got] == [two.sha256, one.sha256]

    def test_discard(self, archive, tmp_path):
        path = instance(tmp_path, "discard")
        stored = call(archive.store, path, read_meta(path))
        uid = read_meta(path).sop_instance_uid
        call(archive.discard, uid, "0" * 64)                  # not that copy: kept
        assert dataset_sha256_of(read_all(call(archive.open, uid))) == stored.sha256
        call(archive.discard, uid, stored.sha256)
        if self.deletes:
            with pytest.raises(NOT_HELD):
                call(archive.open, uid)
        else:                                                 # cannot delete: kept
            assert dataset_sha256_of(read_all(call(archive.open, uid))) == stored.sha256

    def test_delete(self, archive, tmp_path):
        """Capability ``delete`` (a cluster-wide delete): the copy goes for good, every
        copy of the UID with an empty hash; again: 0, not an error."""
        if "delete" not in archive.capabilities:
            # no delete capability: the cluster hides a deleted copy and lists it as
            # retained; the adapter must then not offer a delete at all
            from pacsp2p.adapters.interface import IDeletes
            assert not IDeletes.providedBy(archive)
            return
        path = instance(tmp_path, "delete")
        stored = call(archive.store, path, read_meta(path))
        uid = read_meta(path).sop_instance_uid
        assert call(archive.delete, uid, "0" * 64) == 0        # not that copy: kept
        assert dataset_sha256_of(read_all(call(archive.open, uid))) == stored.sha256
        assert call(archive.delete, uid, "") >= 1
        with pytest.raises(NOT_HELD):
            call(archive.open, uid)
        assert call(archive.delete, uid, "") == 0


# -- one class per adapter, each on its real archive -------------------------------------

class TestEmbedded(StoreContract, ArchiveContract):
    versions = True                       # a conflicting version is kept beside

    @pytest.fixture(scope="class")
    @classmethod
    def archive(cls, tmp_path_factory, catalog):
        a = started(build({"name": "local", "adapter": "embedded"},
                          tmp_path_factory.mktemp("embedded"), catalog))
        yield a
        a.stop()


class TestDimseOnDcmqrscp(StoreContract, ArchiveContract):
    deletes = False                       # DIMSE has no delete

    @pytest.fixture(scope="class")
    @classmethod
    def dcmqrscp(cls, tmp_path_factory):
        with DcmQrScp(tmp_path_factory.mktemp("dcmqrscp"), ae_title="DCMQR") as q:
            yield q

    @staticmethod
    def block(q):
        return {"name": "pacs", "adapter": "dimse", "ae_title": q.ae_title,
                "host": LOOPBACK, "port": q.port}

    @pytest.fixture(scope="class")
    @classmethod
    def archive(cls, dcmqrscp, tmp_path_factory, catalog):
        a = started(build(cls.block(dcmqrscp), tmp_path_factory.mktemp("dimse"), catalog))
        yield a
        call(a.stop)

    def test_the_hierarchy_comes_from_the_catalog(self, archive, dcmqrscp, catalog,
                                                  tmp_path):
        """dcmqrscp answers a C-GET only with the study and series named, and its C-FIND
        does not return the SOP class: an adapter that did not store or crawl the
        instance learns them from the catalog (``Catalog.hierarchy``)."""
        path = instance(tmp_path, "hierarchy")
        self.put(archive, path)
        meta = read_meta(path)
        alone = started(build(self.block(dcmqrscp), tmp_path / "alone"))   # no catalog
        told = started(build(self.block(dcmqrscp), tmp_path / "told", catalog))
        try:
            with pytest.raises(NOT_HELD):
                call(alone.open, meta.sop_instance_uid)
            sha, size = content_hash(path)
            call(catalog.record, meta, Location(meta.sop_instance_uid, "pacs", "p1",
                                                sha, size))
            assert call(catalog.hierarchy, meta.sop_instance_uid) == (
                meta.attributes["StudyInstanceUID"], meta.attributes["SeriesInstanceUID"],
                meta.sop_class_uid, meta.transfer_syntax_uid)
            data = read_all(call(told.open, meta.sop_instance_uid))
            assert dataset_sha256_of(data) == sha
        finally:
            call(alone.stop)
            call(told.stop)


class TestOrthanc(StoreContract, ArchiveContract):
    @pytest.fixture(scope="class")
    @classmethod
    def archive(cls, tmp_path_factory, catalog):
        with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
            a = started(build({"name": "pacs", "adapter": "orthanc", "url": o.url},
                              tmp_path_factory.mktemp("orthanc-peer"), catalog))
            yield a
            a.stop()


class TestDicomWebOnOrthanc(StoreContract, ArchiveContract):
    deletes = False                       # DICOMweb (STOW/QIDO/WADO) has no delete

    @pytest.fixture(scope="class")
    @classmethod
    def archive(cls, tmp_path_factory, catalog):
        with Orthanc(tmp_path_factory.mktemp("dicomweb"),
                     config={"Plugins": [DICOMWEB_PLUGIN]}) as o:
            a = started(build({"name": "pacs", "adapter": "dicomweb",
                               "url": o.url + "/dicom-web"},
                              tmp_path_factory.mktemp("dicomweb-peer"), catalog))
            yield a
            a.stop()


class TestFolderArchive(ArchiveContract):
    """Read-only: files get in by being copied into its directory."""

    @pytest.fixture(scope="class")
    @classmethod
    def archive(cls, tmp_path_factory, catalog):
        folder = tmp_path_factory.mktemp("folder")
        a = started(build({"name": "exports", "adapter": f"{FOLDER_ADAPTER}:FolderArchive",
                           "path": str(folder)}, tmp_path_factory.mktemp("folder-peer"),
                          catalog))
        yield a
        a.stop()

    def put(self, archive, path: Path) -> None:
        target = archive.root / "in" / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)

    def test_takes_no_new_instances(self, archive):
        assert not {"store", "store_unsynced", "keep"} & archive.capabilities
