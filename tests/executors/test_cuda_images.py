"""Module images are recognised, and cubin/fatbin images whose size fields point past the bytes
received are refused before the driver (which trusts those fields) can read past the buffer.
The images are real: nvcc builds them from the built-in kernels (nvcc is installed here and on CI).
"""

from __future__ import annotations

import functools
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from executors import InvalidValue
from executors.cuda_build import BUILTINS_SOURCE, compile_cuda, find_nvcc
from executors.cuda_images import image_kind


@functools.cache
def cubin() -> bytes:
    return compile_cuda(BUILTINS_SOURCE, "cubin", "sm_90", use_cache=False)


@functools.cache
def fatbin() -> bytes:
    out = Path(tempfile.mkdtemp(prefix="bitfusion-test-")) / "b.fatbin"
    subprocess.run(
        [find_nvcc(), "-fatbin", "-gencode", "arch=compute_90,code=sm_90",
         "-gencode", "arch=compute_80,code=compute_80", "-o", str(out), str(BUILTINS_SOURCE)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out.read_bytes()


def test_real_images_are_recognised() -> None:
    assert image_kind(cubin()) == "cubin"
    assert image_kind(fatbin()) == "fatbin"
    ptx = compile_cuda(BUILTINS_SOURCE, "ptx", "compute_90", use_cache=False)
    assert image_kind(ptx) == "ptx"


@pytest.mark.parametrize("keep", [0.99, 0.75, 0.5, 0.1])
@pytest.mark.parametrize("which", ["cubin", "fatbin"])
def test_truncated_images_are_refused(which: str, keep: float) -> None:
    image = cubin() if which == "cubin" else fatbin()
    with pytest.raises(InvalidValue, match="truncated or corrupt|does not fit"):
        image_kind(image[: int(len(image) * keep)])


def test_a_cubin_whose_section_table_points_outside_is_refused() -> None:
    image = bytearray(cubin())
    struct.pack_into("<Q", image, 0x28, len(image) - 10)  # e_shoff: the section table
    with pytest.raises(InvalidValue, match="section header table"):
        image_kind(bytes(image))


def test_a_fatbin_entry_claiming_more_than_the_fatbin_is_refused() -> None:
    image = bytearray(fatbin())
    header_size = struct.unpack_from("<H", image, 6)[0]
    struct.pack_into("<Q", image, header_size + 8, 2**40)  # the first entry's payload size
    with pytest.raises(InvalidValue, match="does not fit"):
        image_kind(bytes(image))


def test_a_cubin_inside_a_fatbin_is_checked_too() -> None:
    image = bytearray(fatbin())
    header_size = struct.unpack_from("<H", image, 6)[0]
    entry_header = struct.unpack_from("<I", image, header_size + 4)[0]
    elf = header_size + entry_header
    assert image[elf : elf + 4] == b"\x7fELF"
    struct.pack_into("<Q", image, elf + 0x28, 2**32)  # its section table, far outside
    with pytest.raises(InvalidValue, match="cubin in fatbin entry"):
        image_kind(bytes(image))


@pytest.mark.parametrize("image", [b"", b"hello", b"MZ\x90\x00" + bytes(100), b"\x7fELF\x01"])
def test_anything_else_is_refused(image: bytes) -> None:
    with pytest.raises(InvalidValue):
        image_kind(image)
