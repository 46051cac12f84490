import subprocess
import sys

import pytest
import torch

from course_lib.device import course_device, device_of, own_code, pick_device


def test_auto_picks_what_is_here():
    want = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == want and pick_device(None).type == want
    assert pick_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", 3.5])
def test_unknown_device_names_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="cuda:N"):
        pick_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pick_device("cuda")


def _device_in_child(value: str) -> subprocess.CompletedProcess:
    code = "import course_lib; print(course_lib.course_device())"
    env = {"COURSE_DEVICE": value, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, **env})


def test_course_device_reads_the_environment_once():
    res = _device_in_child("cpu")
    assert res.returncode == 0 and res.stdout.strip() == "cpu", res.stderr
    bad = _device_in_child("gpu")
    assert bad.returncode != 0 and "COURSE_DEVICE='gpu'" in bad.stderr
    assert course_device() is course_device()  # cached: one device per process


def test_device_of():
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


def test_release_memory_gives_freed_blocks_back():
    """Freed blocks inside glibc's heap stay resident until malloc_trim: release_memory returns them (a fresh
    process, so nothing else shapes its heap)."""
    import ctypes.util

    libc = ctypes.util.find_library("c") if sys.platform == "linux" else None
    if not libc or not hasattr(ctypes.CDLL(libc), "malloc_trim"):
        pytest.skip("glibc's malloc_trim only (not macOS, not musl)")
    code = """
import psutil, torch
from course_lib.device import release_memory
p = psutil.Process()
big = torch.ones(8 * 1024 * 1024); del big  # freeing a 32 MB block raises glibc's mmap threshold
keep = [torch.ones(256 * 1024) for _ in range(200)]  # 1 MB each: now in the heap
del keep[::2]  # 100 MB of holes inside it; glibc's automatic trim only returns a free top
before = p.memory_info().rss
release_memory()
print((before - p.memory_info().rss) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout.split()[-1]) > 80  # MB given back, of the 100 freed


def test_own_code_gives_each_copy_a_code_object_of_its_own():
    # dynamo's recompile limit counts per code object: each compiled copy must have its own budget
    def scaled(x, k=2):
        return x * k

    class Holder:
        base = 10

        def add(self, x):
            return self.base + x

    a, b = own_code(scaled), own_code(scaled)
    assert a.__code__ is not b.__code__ and a.__code__ is not scaled.__code__
    assert a(3) == b(3) == 6 and a(3, k=5) == 15
    h = Holder()
    m = own_code(h.add)
    assert m.__self__ is h and m.__func__.__code__ is not Holder.add.__code__ and m(1) == 11
