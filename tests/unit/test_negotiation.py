"""Which transfer syntax the facade accepts of those proposed in ONE presentation context
(``dicom.negotiation.negotiate`` with ``contexts.storage_choice``): the facade's own
supported contexts, pynetdicom's A-ASSOCIATE primitives, no network."""
from __future__ import annotations

import pytest
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
                         JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import A_ASSOCIATE, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacsp2p.dicom import contexts
from pacsp2p.dicom.negotiation import negotiate

UNCOMPRESSED = [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian]


def supported():
    ae = AE()
    contexts.add_supported(ae)
    return ae.supported_contexts


def accepted(proposals, keep_compressed=True, get_role=False) -> dict:
    """{context id: accepted syntax} for *proposals* [(abstract syntax, [syntaxes])]
    (context ids 1, 3, ...); with *get_role* the requestor offers the SCP role of
    CT storage (C-GET: the facade then sends on it)."""
    prim = A_ASSOCIATE()
    cxs = []
    for i, (abstract, syntaxes) in enumerate(proposals):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    if get_role:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CTImageStorage
        role.scu_role, role.scp_role = False, True
        prim.user_information = [role]
    results, _ = negotiate(prim, supported(), contexts.storage_choice(keep_compressed))
    assert all(cx.result == 0 for cx in results), [(cx.context_id, cx.result)
                                                    for cx in results]
    return {cx.context_id: cx.transfer_syntax[0] for cx in results}


@pytest.mark.parametrize("compressed", [RLELossless, JPEGLSLossless, JPEGLosslessSV1])
def test_a_compressed_syntax_proposed_with_uncompressed_ones_is_kept(compressed):
    # first or last in the requestor's list (storescu -xr +C proposes it first)
    assert accepted([(CTImageStorage, [compressed, *UNCOMPRESSED])]) == {1: compressed}
    assert accepted([(CTImageStorage, [*UNCOMPRESSED, compressed])]) == {1: compressed}


@pytest.mark.parametrize("other", [JPEGBaseline8Bit, JPEGLSNearLossless, JPEG2000,
                                   "1.2.840.10008.1.2.4.94",        # JPIP: no pixel data
                                   "1.2.840.10008.1.2.4.102",       # H.264 video
                                   JPEG2000Lossless])               # no decoder installed
def test_a_lossy_or_undecodable_syntax_is_not_preferred_to_uncompressed(other):
    # proposed beside explicit VR, a lossy syntax would have the sender degrade the image;
    # one the facade cannot decode could not be served to an uncompressed-only C-GET
    assert accepted([(CTImageStorage, [other, *UNCOMPRESSED])]) == {
        1: ExplicitVRLittleEndian}
    assert accepted([(CTImageStorage, [other])]) == {1: other}     # alone: taken as sent


def test_the_requestors_first_compressed_syntax_wins():
    got = accepted([(CTImageStorage, [ExplicitVRLittleEndian, JPEGLSLossless,
                                      RLELossless])])
    assert got == {1: JPEGLSLossless}


def test_without_a_compressed_syntax_explicit_then_implicit():
    assert accepted([(CTImageStorage, UNCOMPRESSED[::-1])]) == {1: ExplicitVRLittleEndian}
    assert accepted([(CTImageStorage, [ImplicitVRLittleEndian])]) == {
        1: ImplicitVRLittleEndian}


def test_keep_compressed_false_prefers_explicit_as_before():
    got = accepted([(CTImageStorage, [RLELossless, *UNCOMPRESSED])], keep_compressed=False)
    assert got == {1: ExplicitVRLittleEndian}


def test_a_context_the_facade_sends_on_takes_an_uncompressed_syntax():
    """C-GET: the facade is Storage SCU there; it can decompress what it holds into
    explicit VR, not compress an uncompressed instance into whatever was proposed."""
    got = accepted([(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian]),
                    (CTImageStorage, [RLELossless, *UNCOMPRESSED])], get_role=True)
    assert got[3] == ExplicitVRLittleEndian
    # only RLE proposed: RLE (instances held in another syntax fail their sub-operation)
    got = accepted([(CTImageStorage, [RLELossless])], get_role=True)
    assert got == {1: RLELossless}


def test_non_storage_contexts_are_left_alone():
    got = accepted([(StudyRootQueryRetrieveInformationModelFind,
                     [RLELossless, ImplicitVRLittleEndian])])
    assert got == {1: ImplicitVRLittleEndian}

