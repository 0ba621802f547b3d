"""The DIMSE status codes the facade and the ingest answer (PS3.4 annexes B and C,
PS3.7 annex C), and the pace of C-MOVE/C-GET Pending responses, in one place."""

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000                 # sub-operations finished with failures or warnings
PROCESSING_FAILURE = 0x0110      # e.g. a placement strategy plugin failed
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124           # Refused: Not Authorized (PS3.7 annex C)
OUT_OF_RESOURCES = 0xA700        # C-STORE: the write quorum could not be met
TOO_MANY_MATCHES = 0xA701        # more sub-operations than a response can count
ALL_FAILED = 0xA702              # every sub-operation failed
MOVE_DEST_UNKNOWN = 0xA801
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001
GET_TOO_MANY = 0xC416

PENDING_MIN_GAP = 0.05           # at most ~20 Pending responses per second
PENDING_MAX_GAP = 1.0            # at least one per second
