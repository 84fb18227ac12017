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


def test_the_peak_is_this_process_own_not_the_one_it_was_started_from():
    """A process started by a large one reports its own peak: Linux's ``ru_maxrss`` would carry
    the parent's size across fork and exec (report.json's figure for the Slicer module's worker,
    which Slicer starts)."""
    import subprocess
    import sys
    import pytest
    if not sys.platform.startswith("linux"):
        pytest.skip("the inherited figure is Linux's")
    code = ("import subprocess, sys; block = b'\\x01' * (600 * 2**20)\n"
            "print(subprocess.run([sys.executable, '-c', 'from InverseRegLib.memory import peak_rss_mb; "
            "print(peak_rss_mb())'], capture_output=True, text=True, check=True).stdout)")
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 5 < child < 300, child


def _huge_pages_offered() -> bool:
    try:
        setting = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _huge_kb_after_touching_64_mb(environment: dict) -> tuple[bool, int]:
    """A fresh ``python`` runs the console script's :func:`~InverseRegLib.cli.run` with a command
    that imports torch, fills a 64 MB tensor and reads the kernel's count of the process's memory
    in transparent huge pages; -> (whether torch was asked for them, that count in kB)."""
    import subprocess
    import sys
    code = ("import re, sys; from InverseRegLib import cli\n"
            "def command():\n"
            "    import torch; block = torch.ones(16_000_000)\n"
            "    from InverseRegLib.device import HUGE_PAGES_VARIABLE; import os\n"
            "    kb = re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1)\n"
            "    print(os.environ.get(HUGE_PAGES_VARIABLE) == '1', kb); return 0\n"
            "cli.main = command; sys.argv = ['inversereg', 'check']; cli.run()\n")
    out = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    applies, kb = out.stdout.split()
    return applies == "True", int(kb)


def test_the_command_line_asks_torch_for_huge_pages_unless_the_user_said_otherwise():
    """The console script, before any command imports torch, makes torch's allocator take its
    large buffers in transparent huge pages (the kernel's own count says so: each fresh 1 mm
    volume is otherwise paged in 4 kB at a time); a user's ``THP_MEM_ALLOC_ENABLE=0`` stands;
    and once torch is imported it is too late, and nothing is changed."""
    import os
    import sys
    import pytest
    from InverseRegLib.device import HUGE_PAGES_VARIABLE, allocate_in_huge_pages
    if not sys.platform.startswith("linux") or not _huge_pages_offered() \
            or not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("this kernel offers no transparent huge pages to count")
    environment = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_VARIABLE}
    applies, kb = _huge_kb_after_touching_64_mb(environment)
    assert applies and kb >= 32 * 1024, kb
    applies, kb = _huge_kb_after_touching_64_mb({**environment, HUGE_PAGES_VARIABLE: "0"})
    assert not applies
    if "[madvise]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        assert kb < 32 * 1024, kb  # unasked, this kernel gives none
    if os.environ.get(HUGE_PAGES_VARIABLE) is None:
        assert not allocate_in_huge_pages()  # this test process imported torch long ago
        assert HUGE_PAGES_VARIABLE not in os.environ
