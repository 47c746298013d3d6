"""GPU utilisation while a block runs, sampled from ``nvidia-smi`` (the GPU scripts' shared helper).

    with Utilisation() as util:
        ...  # the pass
    util.mean  # mean of the samples (percent), nan without nvidia-smi or a sample
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading


class Utilisation:
    """Polls ``nvidia-smi --query-gpu=utilization.gpu`` every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.2, index: int = 0) -> None:
        self.interval, self.index = interval, index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        command = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.interval):
            try:
                out = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return

    def __enter__(self) -> "Utilisation":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else math.nan
