"""Which compressed transfer syntaxes a remote archive keeps as they are.

The facade accepts a modality's lossless compressed syntax (RLE, JPEG Lossless, JPEG-LS) when
every archive of its peer that stores can take it unchanged (``contexts.storage_choice``,
``Cluster.compressed_kept``): the embedded archive, Orthanc's REST API and STOW-RS take
any; an archive reached over DIMSE takes what it accepts in association negotiation
(PS3.8 9.3.3.2), and a DCMTK dcmqrscp with its default settings accepts none. So the
``dimse`` adapter asks it once at start: one association proposing CT Image Storage in
each compressed syntax, one presentation context each; what it accepts is kept
(``stored_syntaxes``). An archive that cannot be asked counts as taking none (the
facade then prefers the uncompressed syntaxes: the sender decompresses).
"""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage
from twisted.logger import Logger

from pacsp2p.adapters.associations import DimseError
from pacsp2p.dicom.contexts import KEPT_COMPRESSED

log = Logger()


def accepted(associate, where: str) -> frozenset:
    """The compressed syntaxes the archive accepts for storage; *associate(contexts)*
    opens an association (``Associations.associate``). Blocking: a thread pool's."""
    contexts = [build_context(CTImageStorage, [ts]) for ts in sorted(KEPT_COMPRESSED)]
    try:
        assoc = associate(contexts)
    except DimseError as e:
        log.info("archive {where}: takes no compressed transfer syntax for storage "
                 "({err})", where=where, err=e)
        return frozenset()
    try:
        return frozenset(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
    finally:
        assoc.release()
