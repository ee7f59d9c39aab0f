"""The objfs command line."""

from pathlib import Path

import pytest

from fusefront.options import UsageError, parse_args, parse_source


def test_source_forms() -> None:
    assert parse_source("127.0.0.1:9400/demo") == ("127.0.0.1:9400", "demo")
    assert parse_source("objfs://meta.example:1/v-1") == ("meta.example:1", "v-1")


@pytest.mark.parametrize("bad", ["demo", "host/demo", "host:x/demo", "h:1/", "h:1/a/b", "h:99999/v"])
def test_bad_sources(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_source(bad)


def test_mount_helper_options() -> None:
    cfg = parse_args(["h:1/v", "/mnt/x", "-o", "rw,_netdev,dev,suid,allow_other,secret_file=/s,"
                      "attr_timeout=2.5,cache_size=1000,nofail"])
    assert cfg.mountpoint == Path("/mnt/x")
    assert cfg.secret_file == Path("/s")
    assert cfg.attr_timeout == 2.5 and cfg.cache_size == 1000
    assert set(cfg.fuse_options) == {"rw", "dev", "suid", "allow_other"}


def test_relative_paths_are_taken_from_where_the_mount_was_asked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The daemon changes to / once mounted: a relative path given at mount
    time must still name the same file then."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["h:1/v", "mnt", "-o", "secret_file=s,cache_dir=c,log=l"])
    assert cfg.secret_file == tmp_path / "s" and cfg.cache_path() == tmp_path / "c"
    assert cfg.log == str(tmp_path / "l")


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(UsageError, match="unknown option"):
        parse_args(["h:1/v", "/mnt/x", "-o", "frobnicate=1"])


def test_numbers_checked() -> None:
    with pytest.raises(UsageError):
        parse_args(["h:1/v", "/mnt/x", "-o", "attr_timeout=soon"])
