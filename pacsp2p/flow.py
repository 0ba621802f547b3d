"""Read holds: several parties may each stop a protocol reading from its transport.

A C-STORE's file writer and each replica push pause the modality's association; each
pushed data set being written pauses the overlay link it arrives on. Pauses nest: the
transport reads again once every one of them is resumed.
"""


class ReadHolds:
    """Mixin for a Protocol. ``reading_allowed()`` says whether reading may resume at all
    (not once the connection is closing)."""

    _read_holds = 0

    def pause_reading(self) -> None:
        self._read_holds += 1
        if self._read_holds == 1 and self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._read_holds -= 1
        if self._read_holds == 0 and self.transport is not None and self.reading_allowed():
            self.transport.resumeProducing()

    def reading_allowed(self) -> bool:
        return True

    def reading_held(self) -> bool:
        """True while someone paused reading (what the other side sends waits)."""
        return self._read_holds > 0
