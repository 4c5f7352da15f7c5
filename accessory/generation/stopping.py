"""Stop strings matched on decoded text, so a symbol is found whichever tokens spell it."""

from typing import Iterable, Optional, Tuple


class StopStringMatcher:
    """Finds the first stop string in a growing text and tells how much text is safe to show.

    Text that could be the beginning of a stop string is held back, so a streamed response never
    shows a partial symbol that later turns out to be a stop.
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = [s for s in stop_strings if s]

    def find(self, text: str, search_from: int = 0) -> Optional[int]:
        """Index in ``text`` where the earliest stop string starts, or None."""
        best = None
        for stop in self.stop_strings:
            index = text.find(stop, max(0, search_from - len(stop) + 1))
            if index != -1 and (best is None or index < best):
                best = index
        return best

    def safe_length(self, text: str) -> int:
        """Length of the prefix of ``text`` that cannot be part of a stop string starting later."""
        hold = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return len(text) - hold

    def check(self, text: str, search_from: int = 0) -> Tuple[bool, int]:
        """(stopped, visible_length): the text to show is ``text[:visible_length]``."""
        index = self.find(text, search_from)
        if index is not None:
            return True, index
        return False, self.safe_length(text)
