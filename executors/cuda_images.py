"""Recognising and checking the code images clients load: PTX, cubin (ELF) and fatbin.

``cuModuleLoadData`` takes a pointer and no length: the driver trusts the sizes written inside a
cubin or fatbin. An image that claims more bytes than the client sent would make the driver read
past the buffer, in the server's process. So every size field the driver will follow is checked
against the bytes actually received before an image gets near it; PTX is text and is handed over
NUL-terminated.
"""

from __future__ import annotations

import struct

from .errors import InvalidValue

__all__ = ["FATBIN_MAGIC", "image_kind"]

FATBIN_MAGIC = 0xBA55ED50
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_ELF_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_ELF_SEGMENT = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHT_NOBITS = 8  # a section that occupies no bytes in the file (.bss, .nv.shared.*)
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of what follows
_FATBIN_ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size


def image_kind(image: bytes) -> str:
    """'cubin', 'fatbin' or 'ptx', after checking that the image is self-consistent.

    Raises ``InvalidValue`` for anything else, naming what is wrong.
    """
    if image.startswith(b"\x7fELF"):
        _check_elf(image, "cubin")
        return "cubin"
    if len(image) >= 4 and struct.unpack_from("<I", image)[0] == FATBIN_MAGIC:
        _check_fatbin(image)
        return "fatbin"
    head = image[:4096]
    if b".version" in head and b".target" in head:
        return "ptx"
    raise InvalidValue(
        f"not a PTX, cubin or fatbin image ({len(image)} bytes starting {image[:8]!r})"
    )


def _within(image: bytes, offset: int, size: int, what: str, where: str) -> None:
    if offset < 0 or size < 0 or offset + size > len(image):
        raise InvalidValue(
            f"{where} is truncated or corrupt: its {what} ({size} bytes at offset {offset}) "
            f"ends past the {len(image)} bytes received"
        )


def _check_elf(image: bytes, where: str) -> None:
    _within(image, 0, _ELF_HEADER.size, "ELF header", where)
    (ident, _type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _ELF_HEADER.unpack_from(image)  # fmt: skip
    if ident[4] != 2 or ident[5] != 1:
        raise InvalidValue(f"{where} is not a 64-bit little-endian ELF image, as CUDA's are")
    if phnum:
        if phentsize < _ELF_SEGMENT.size:
            raise InvalidValue(f"{where} has program headers of {phentsize} bytes")
        _within(image, phoff, phnum * phentsize, "program header table", where)
        for index in range(phnum):
            segment = _ELF_SEGMENT.unpack_from(image, phoff + index * phentsize)
            _within(image, segment[2], segment[5], f"segment {index}", where)
    if shnum:
        if shentsize < _ELF_SECTION.size:
            raise InvalidValue(f"{where} has section headers of {shentsize} bytes")
        _within(image, shoff, shnum * shentsize, "section header table", where)
        for index in range(shnum):
            section = _ELF_SECTION.unpack_from(image, shoff + index * shentsize)
            if section[1] != _SHT_NOBITS:
                _within(image, section[4], section[5], f"section {index}", where)


def _check_fatbin(image: bytes) -> None:
    _within(image, 0, _FATBIN_HEADER.size, "fatbin header", "fatbin")
    _magic, _version, header_size, size = _FATBIN_HEADER.unpack_from(image)
    if header_size < _FATBIN_HEADER.size:
        raise InvalidValue(f"fatbin header claims {header_size} bytes, less than its own fields")
    _within(image, header_size, size, "contents", "fatbin")
    offset, end = header_size, header_size + size
    while offset < end:
        _within(image, offset, _FATBIN_ENTRY.size, "entry header", "fatbin")
        kind, _entry_version, entry_header, payload = _FATBIN_ENTRY.unpack_from(image, offset)
        if entry_header < _FATBIN_ENTRY.size or offset + entry_header + payload > end:
            raise InvalidValue(
                f"fatbin entry at offset {offset} ({entry_header}-byte header, {payload}-byte "
                f"payload) does not fit in the {size} bytes the fatbin declares"
            )
        body = image[offset + entry_header : offset + entry_header + payload]
        if body.startswith(b"\x7fELF"):  # machine code; PTX entries are text, maybe compressed
            _check_elf(body, f"cubin in fatbin entry at offset {offset}")
        offset += entry_header + payload
