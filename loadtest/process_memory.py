"""The peak resident set of a server process, by process id, for the side-by-side comparison, where each system is a
process of its own (``loadtest.side_by_side``); its sizes from Linux /proc (``service.model.process_status``)."""
from __future__ import annotations

from dataclasses import dataclass

from service.model.process_status import proc_status


@dataclass
class ServerMemory:
    """The high-water mark of process ``pid``'s resident set (VmHWM). ``start_load`` returns the peak so far (the
    server's start included, on the first call) and resets the mark to the current size (writing 5 to
    /proc/PID/clear_refs: needs the process's owner or root), so that ``peak`` then gives the peak of one load."""

    pid: int

    def start_load(self) -> int:
        """The peak since the start or the last reset, in bytes, and reset the mark. Raises FileNotFoundError when
        the process is gone, PermissionError when its mark cannot be reset."""
        so_far = self.peak()
        with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")
        return so_far

    def peak(self) -> int:
        """The peak resident set since the start or the last reset, in bytes."""
        return proc_status("VmHWM", self.pid)
