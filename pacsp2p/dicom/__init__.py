"""DICOM on the wire: the facade (SCP handlers), header reading, identifiers, contexts."""
