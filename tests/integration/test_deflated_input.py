"""Deflated data sets (PS3.5 A.5) from the network, at a real peer: a few hundred kilobytes
of DEFLATE that inflate to hundreds of megabytes (a "deflate bomb") in a C-FIND
identifier or a C-STORE data set, a stream that is not DEFLATE at all, and a genuine
deflated image in an ISO 2022 character set.

The bombs are refused with 0xC000 while the peer's memory stays bounded and it keeps
answering others; garbage is the requestor's fault (0xC000), not a lack of resources
(0xA700, which a modality retries for ever); the genuine image is kept and found.
"""
from __future__ import annotations

import io
import zlib

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import build_context, build_role, evt
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyGet

from pacsp2p.testing import charsets, datasets, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.fuzz.watch import RssPeak

MIB = 1 << 20
BOMB = 400                      # MiB of inflated zeros, about 400 KB on the wire
GROWTH = 160 * MIB // 1024      # KiB the peer's RSS may grow by while refusing a bomb


def deflated(head: bytes, zeros_mib: int = 0) -> bytes:
    """*head* then *zeros_mib* MiB of zero bytes, as one raw DEFLATE stream."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(head)]
    zeros = bytes(MIB)
    out += [z.compress(zeros) for _ in range(zeros_mib)]
    return b"".join(out) + z.flush()


def send(assoc, req, data_attr: str, data: bytes) -> list:
    """Send *req* with *data* as its data set on the association's only context."""
    setattr(req, data_attr, io.BytesIO(data))
    return dn.send_request(assoc, req, assoc.accepted_contexts[0].context_id)


def image(tag: str, **attrs) -> Dataset:
    return datasets.make_image("CT", size=8, PatientID="DEFLATE1",
                               StudyInstanceUID=datasets.uid("deflate-study"),
                               SeriesInstanceUID=datasets.uid("deflate-series"),
                               SOPInstanceUID=datasets.uid("deflate", tag), **attrs)


def store(peer, uid: str, data: bytes) -> list:
    req = C_STORE()
    req.MessageID, req.Priority = 5, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, uid
    with dn.association(peer.port, peer.ae_title, [
            build_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])]) as assoc:
        return send(assoc, req, "DataSet", data)


def test_a_deflated_identifier_bomb_is_refused_in_bounded_memory(peer):
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    bomb = deflated(datasets.explicit_le(query), BOMB)
    assert len(bomb) < MIB                  # within the bound of a plain identifier
    req = C_FIND()
    req.MessageID, req.Priority, req.AffectedSOPClassUID = 3, 2, StudyFind
    with RssPeak(peer.pid) as rss, dn.association(peer.port, peer.ae_title, [
            build_context(StudyFind, [DeflatedExplicitVRLittleEndian])]) as assoc:
        statuses = send(assoc, req, "Identifier", bomb)
        assert echo(peer.port, peer.ae_title)
    assert statuses == [0xC000]
    assert rss.peak - rss.first < GROWTH, (rss.first, rss.peak)
    assert "inflates past" in peer.log_path.read_text()


def test_deflated_store_of_garbage_or_a_bomb_is_refused(peer):
    ds = image("bomb")
    bomb = deflated(datasets.explicit_le(ds)[:-200], BOMB)   # a header, then zeros for ever
    with RssPeak(peer.pid) as rss:
        assert store(peer, ds.SOPInstanceUID, bomb) == [0xC000]
    assert rss.peak - rss.first < GROWTH, (rss.first, rss.peak)
    garbage = image("garbage")
    assert store(peer, garbage.SOPInstanceUID, b"\x00not deflate" * 50) == [0xC000]
    cut = image("cut")
    cut_bytes = deflated(datasets.explicit_le(cut))[:-40]
    assert store(peer, cut.SOPInstanceUID, cut_bytes) == [0xC000]
    assert dn.archive_files(peer.data_dir) == []
    assert echo(peer.port, peer.ae_title)


def test_a_deflated_image_in_iso_2022_japanese_is_kept_and_found(peer):
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds = image("jis", PatientName=name)
    ds.SpecificCharacterSet = charsets.JIS
    raw = datasets.explicit_le(ds)
    assert store(peer, ds.SOPInstanceUID, deflated(raw)) == [0x0000]
    rows = charsets.find(peer.port, peer.ae_title, "PATIENT",
                         {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
                         charsets.JIS, returns=["PatientName"])
    assert [r.PatientID for r in rows] == ["DEFLATE1"]
    got = []
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    with dn.association(peer.port, peer.ae_title, [
            build_context(StudyGet),
            build_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])],
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE,
                           lambda e: got.append(e.dataset) or 0x0000)]) as assoc:
        final = list(assoc.send_c_get(query, StudyGet))[-1][0]
    assert final.Status == 0x0000 and len(got) == 1
    assert str(got[0].PatientName) == name and got[0].PixelData == ds.PixelData
