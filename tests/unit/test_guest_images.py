"""Building and caching the boot-sector guest images (nasm only, no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cuju_libvirt.rig import guests
from cuju_libvirt.rig.guests import WriterConfig, boot_image, serial_counts

pytestmark = pytest.mark.timeout(60)


def test_counter_image_is_a_boot_sector_and_is_cached(tmp_path: Path) -> None:
    image = boot_image(cache=tmp_path)
    data = image.read_bytes()
    assert len(data) == 512 and data[510:] == b"\x55\xaa"
    assert b"cuju-boot counter" in data
    before = image.stat()
    again = boot_image(cache=tmp_path)
    assert again == image
    assert again.stat().st_ino == before.st_ino and again.stat().st_mtime_ns == before.st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [image.name]  # no temporary left behind


def test_parameters_change_the_image_and_its_name(tmp_path: Path) -> None:
    counter = boot_image(cache=tmp_path)
    slower = boot_image(cache=tmp_path, delay=guests.DEFAULT_DELAY * 2)
    writer = boot_image(WriterConfig(), cache=tmp_path)
    small = boot_image(WriterConfig(span_pages=256, writes=4), cache=tmp_path)
    names = {counter.name, slower.name, writer.name, small.name}
    assert len(names) == 4
    assert counter.read_bytes() != slower.read_bytes()
    assert b"cuju-boot writer" in writer.read_bytes()
    assert writer.read_bytes() != small.read_bytes()


def test_cache_dir_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUJU_CACHE_DIR", str(tmp_path / "cache"))
    assert guests.cache_dir() == tmp_path / "cache"
    assert boot_image().parent == tmp_path / "cache"
    monkeypatch.delenv("CUJU_CACHE_DIR")
    assert guests.cache_dir() == guests.DEFAULT_CACHE_DIR


def test_a_changed_source_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = boot_image(cache=tmp_path)
    source = guests._source_text()
    patched = source.replace(b'db "cuju-boot counter"', b'db "cuju-boot counteR"')
    assert patched != source
    monkeypatch.setattr(guests, "_source_text", lambda: patched)
    rebuilt = boot_image(cache=tmp_path)
    assert rebuilt != original and b"cuju-boot counteR" in rebuilt.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"span_base": 0x1000}, "span_base"),
        ({"span_base": 0x100001}, "span_base"),
        ({"span_pages": 0}, "span_pages"),
        ({"run_every": 12}, "run_every"),
        ({"run_pages": 0}, "run_pages"),
        ({"seed": 0}, "seed"),
    ],
)
def test_writer_config_rejects_bad_values_naming_the_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WriterConfig(**kwargs)


def test_writer_span_geometry() -> None:
    cfg = WriterConfig(span_base=0x100000, span_pages=16384)
    assert cfg.span_end == 0x100000 + (64 << 20)
    assert cfg.min_memory_mib == 65
    assert cfg.span_pfns() == range(256, 256 + 16384)
    assert not guests.GUEST_OWN_PAGES & set(cfg.span_pfns())


def test_serial_counts_reads_complete_lines_after_the_last_banner() -> None:
    text = "SeaBIOS 1\r\nBooting...\r\ncuju-boot counter\r\n1\r\n2\r\n3\r\n4"
    assert serial_counts(text) == [1, 2, 3]
    rebooted = text + "\r\ncuju-boot counter\r\n1\r\n"
    assert serial_counts(rebooted) == [1]
    assert serial_counts("SeaBIOS only\r\n") == []
