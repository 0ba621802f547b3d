"""Presentation contexts: what the facade accepts, and what a C-MOVE proposes.

The facade accepts every standard storage SOP class pynetdicom knows, current
(``AllStoragePresentationContexts``: beyond its 120 default contexts, Breast Projection
X-Ray, Parametric Map, the radiation dose SRs ... as DCMTK's dcmqrscp and Orthanc do) or
retired (old archives keep Ultrasound and Nuclear Medicine images of the retired classes) in
every transfer syntax, so that C-STORE keeps what the modality sent; private and unknown
SOP classes are refused at negotiation, as both do by default. Of the syntaxes a
requestor proposes in ONE storage context, the acceptor picks one (PS3.8 9.3.3.2: the
acceptor's choice): where the facade only receives (Storage SCP), ``storage_choice``
takes the requestor's first lossless compressed syntax — the data set is then kept as
it arrives, as Orthanc and dcm4chee do, instead of being decompressed by the sender (an
archive that takes no compressed syntax, a DCMTK dcmqrscp behind the dimse adapter, gets
its copy decompressed by the adapter: ``adapters.syntaxes``) — then Explicit VR Little
Endian, then Implicit (``[facade] keep_compressed = false``: the uncompressed ones
first). Where the facade also sends on the context (the requestor
gave it the SCU role for C-GET sub-operations), the uncompressed syntaxes come first:
the facade must send what it holds in the accepted syntax, and it can decompress what it
holds (RLE, JPEG, JPEG-LS) but not compress to an arbitrary syntax.

A C-MOVE association proposes, for each SOP class it will send, the exact transfer
syntaxes the instances are stored in, plus the uncompressed ones as a fallback, so
C-MOVE stays byte-identical.
"""

from __future__ import annotations

from pydicom.uid import (JPEG2000, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)
from pynetdicom import (ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts,
                        StoragePresentationContexts, build_context)
from pynetdicom import sop_class as sc

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
MAX_CONTEXTS = 128
# pynetdicom accepts the first of the acceptor's syntaxes that the requestor proposed:
# prefer explicit VR (keeps VRs of private tags) over implicit, as DCMTK does.
ACCEPTED_SYNTAXES = [ExplicitVRLittleEndian] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]

# compressed syntaxes a C-STORE keeps as it arrives (encapsulated: the header is explicit
# VR little endian, which the ingest path reads; archives keep the bytes they are given):
# LOSSLESS ones only — proposed beside an uncompressed syntax, a lossy one (JPEG baseline,
# JPEG 2000, video, JPIP references without pixel data) would have the sender degrade
# the image — and only those the facade can decode again (pylibjpeg: RLE, libjpeg) for a
# C-GET requestor that takes uncompressed data only.
KEPT_COMPRESSED = frozenset((RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless))
# (pynetdicom's 120 default classes first: what a requestor proposes in one association,
# at most MAX_CONTEXTS, takes them in that order)
STORAGE_ORDER = tuple(dict.fromkeys(cx.abstract_syntax for cx in (
    *StoragePresentationContexts, *AllStoragePresentationContexts)))
STORAGE_CLASSES = frozenset(STORAGE_ORDER)

# what archives commonly keep besides the uncompressed syntaxes
COMMON_STORED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless,
                 JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless,
                 JPEG2000Lossless, JPEG2000, JPEGLSLossless)

QR_FIND = {sc.PatientRootQueryRetrieveInformationModelFind: "PATIENT",
           sc.StudyRootQueryRetrieveInformationModelFind: "STUDY"}
QR_MOVE = {sc.PatientRootQueryRetrieveInformationModelMove: "PATIENT",
           sc.StudyRootQueryRetrieveInformationModelMove: "STUDY"}
QR_GET = {sc.PatientRootQueryRetrieveInformationModelGet: "PATIENT",
          sc.StudyRootQueryRetrieveInformationModelGet: "STUDY"}


def add_supported(ae) -> None:
    """Everything the facade accepts."""
    ae.add_supported_context(sc.Verification, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(sc.StorageCommitmentPushModel, UNCOMPRESSED[:2])
    for uid in (*QR_FIND, *QR_MOVE, *QR_GET):
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    # as C-GET SCP we act as Storage SCU on the requester's association
    for uid in sorted(STORAGE_CLASSES):
        ae.add_supported_context(uid, ACCEPTED_SYNTAXES,
                                 scu_role=True, scp_role=True)


def storage_choice(keep_compressed: bool = True):
    """The facade's pick among the syntaxes proposed in one context (``negotiate``'s
    *choose*): ``choose(abstract syntax, proposed syntaxes, as_scu)`` -> a syntax, or
    None for the default order (``ACCEPTED_SYNTAXES``: explicit, implicit, ...)."""
    def choose(abstract_syntax: str, proposed, as_scu: bool) -> str | None:
        if not keep_compressed or as_scu or abstract_syntax not in STORAGE_CLASSES:
            return None
        return next((ts for ts in proposed if ts in KEPT_COMPRESSED), None)
    return choose


def for_sending(pairs: set[tuple[str, str]]) -> list:
    """Requested contexts to send instances of (SOP class, transfer syntax) *pairs*."""
    by_class: dict[str, set[str]] = {}
    for sop_class, ts in pairs:
        syntaxes = by_class.setdefault(sop_class, set())
        if ts:
            syntaxes.add(ts)
        else:       # unknown (found by crawling an archive): the usual stored syntaxes
            syntaxes.update(COMMON_STORED)
    contexts = []
    exact_budget = MAX_CONTEXTS - len(by_class)
    for sop_class, syntaxes in sorted(by_class.items()):
        if len(contexts) + len(syntaxes) <= exact_budget:
            for ts in sorted(syntaxes):         # one context each: the archive's own bytes
                contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts[:MAX_CONTEXTS]
