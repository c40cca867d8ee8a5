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


def test_a_fatbin_wrapper_dressed_as_ptx_is_refused() -> None:
    # __fatBinC_Wrapper_t holds a raw pointer the driver may follow: never a client's image.
    wrapper = struct.pack("<IIQQ", 0x466243B1, 1, 0x4141414141414141, 0)
    with pytest.raises(InvalidValue, match="fatbin wrapper"):
        image_kind(wrapper + b"\n.version 8.0\n.target sm_90\n")


def test_ptx_with_binary_bytes_is_refused() -> None:
    with pytest.raises(InvalidValue, match="PTX must be text"):
        image_kind(b".version 8.0\n.target sm_90\n\x01\x02\x03binary\n")
    assert image_kind(b".version 8.0\r\n.target sm_90\t\n\0\0") == "ptx"  # CR, tab, final NULs


def test_a_fatbin_entry_claiming_more_compressed_bytes_than_its_payload_is_refused() -> None:
    image = bytearray(fatbin())
    header_size = struct.unpack_from("<H", image, 6)[0]
    payload = struct.unpack_from("<Q", image, header_size + 8)[0]
    struct.pack_into("<I", image, header_size + 16, payload + 1)
    with pytest.raises(InvalidValue, match="compressed bytes"):
        image_kind(bytes(image))


def test_a_cubin_naming_a_missing_string_table_is_refused() -> None:
    image = bytearray(cubin())
    shnum = struct.unpack_from("<H", image, 0x3C)[0]
    struct.pack_into("<H", image, 0x3E, shnum)  # e_shstrndx: one past the last section
    with pytest.raises(InvalidValue, match="string table"):
        image_kind(bytes(image))
