"""The peak-memory figure in report.json: it must see a large allocation of this process."""
import numpy as np

from InverseRegLib.memory import peak_rss_mb


def test_peak_rss_sees_a_large_allocation():
    before = peak_rss_mb()
    assert before is not None and before > 10  # a Python process with torch and numpy loaded
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, every page written
    after = peak_rss_mb()
    assert after >= before and after >= 300, (before, after)
    del block
