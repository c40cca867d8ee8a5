"""Recognising and checking the code images clients load: PTX, cubin (ELF) and fatbin.

``cuModuleLoadData`` takes a pointer and no length: the driver trusts the sizes written inside a
cubin or fatbin. An image that claims more bytes than the client sent would make the driver read
past the buffer, in the server's process. So the sizes that frame an image (the ELF header,
program and section tables and each section's extent; the fatbin header and each entry, and the
ELF inside uncompressed entries) are checked against the bytes actually received before an image
gets near the driver. It is a sanity check of the framing, not a validation of everything the
driver parses: a compressed fatbin entry is checked only as a whole (its size fields), since its
contents are only visible after decompression. PTX must be text and is handed over NUL-terminated.
"""

from __future__ import annotations

import re
import struct

from .errors import InvalidValue

__all__ = ["FATBIN_MAGIC", "image_kind"]

FATBIN_MAGIC = 0xBA55ED50
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_ELF_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_ELF_SEGMENT = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SHT_NOBITS = 8  # a section that occupies no bytes in the file (.bss, .nv.shared.*)
_FATBIN_HEADER = struct.Struct("<IHHQ")  # magic, version, header size, size of what follows
_FATBIN_ENTRY = struct.Struct("<HHIQI")  # kind, version, header size, payload, compressed size
# __fatBinC_Wrapper_t and the host-side fatbin link structure: host memory structures whose fields
# are pointers, which the driver may follow; never a client's image.
_WRAPPER_MAGICS = frozenset({0x466243B1, 0x1EE55A01})
_PTX_HEAD = 64 * 1024  # where .version and .target must appear (after comments, say a licence)
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
    if len(image) >= 4 and struct.unpack_from("<I", image)[0] in _WRAPPER_MAGICS:
        raise InvalidValue(
            "a fatbin wrapper (a host structure pointing at a fatbin) is not a loadable image; "
            "send the fatbin itself"
        )
    head = image[:_PTX_HEAD]
    if b".version" in head and b".target" in head:
        # PTX is text: a binary byte means something else wearing PTX's words, which the driver
        # might read as a structure with pointers in it.
        if _BINARY.search(image.rstrip(b"\0")) is not None:
            raise InvalidValue("PTX must be text, but this image holds binary bytes")
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
     shentsize, shnum, shstrndx) = _ELF_HEADER.unpack_from(image)  # fmt: skip
    if ident[4] != 2 or ident[5] != 1:
        raise InvalidValue(f"{where} is not a 64-bit little-endian ELF image, as CUDA's are")
    if phnum:
        if phentsize < _ELF_SEGMENT.size:
            raise InvalidValue(f"{where} has program headers of {phentsize} bytes")
        _within(image, phoff, phnum * phentsize, "program header table", where)
        for index in range(phnum):
            segment = _ELF_SEGMENT.unpack_from(image, phoff + index * phentsize)
            _within(image, segment[2], segment[5], f"segment {index}", where)
    if shnum and shstrndx >= shnum:
        raise InvalidValue(f"{where} names section {shstrndx} of {shnum} as its string table")
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
        kind, _entry_version, entry_header, payload, compressed = _FATBIN_ENTRY.unpack_from(
            image, offset
        )
        if entry_header < _FATBIN_ENTRY.size or offset + entry_header + payload > end:
            raise InvalidValue(
                f"fatbin entry at offset {offset} ({entry_header}-byte header, {payload}-byte "
                f"payload) does not fit in the {size} bytes the fatbin declares"
            )
        if compressed > payload:
            raise InvalidValue(
                f"fatbin entry at offset {offset} claims {compressed} compressed bytes in a "
                f"{payload}-byte payload"
            )
        body = image[offset + entry_header : offset + entry_header + payload]
        if body.startswith(b"\x7fELF"):  # machine code; PTX entries are text, maybe compressed
            _check_elf(body, f"cubin in fatbin entry at offset {offset}")
        offset += entry_header + payload
