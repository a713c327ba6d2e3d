"""Typed configs: YAML + overrides into dataclasses, one clear error per bad key or value."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pippo_common.config import ConfigError, flatten, load_config, parse_overrides


@dataclass
class Source:
    kind: Literal["captures", "images"]
    uri: str


@dataclass
class Job:
    dataset: str
    resolution: int = 256
    scale: float = 1.0
    lossless: bool = False
    sources: list[Source] = field(default_factory=list)
    parent: str | None = None


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_load_into_typed_dataclasses(tmp_path):
    p = write(tmp_path, "dataset: s3://b/d\nsources:\n  - {kind: captures, uri: /c}\n")
    job = load_config(Job, p, ["resolution=512", "scale=2", "lossless=true", "parent=null"])
    assert job == Job("s3://b/d", 512, 2.0, True, [Source("captures", "/c")], None)
    assert isinstance(job.scale, float)


def test_nested_override_reaches_into_lists_of_dataclasses(tmp_path):
    p = write(tmp_path, "dataset: d\n")
    job = load_config(Job, p, ['sources=[{kind: images, uri: "s3://x/y"}]'])
    assert job.sources == [Source("images", "s3://x/y")]


@pytest.mark.parametrize("text, overrides, fragment", [
    ("dataset: d\nresoluton: 3\n", [], "unknown key 'resoluton'"),
    ("dataset: d\n", ["resolution=big"], "bad value for 'resolution': 'big' (expected an integer)"),
    ("dataset: d\n", ["lossless=3"], "bad value for 'lossless'"),
    ("dataset: d\nsources: [{kind: video, uri: x}]\n", [], "'sources[0].kind': 'video' (expected one of captures, images)"),
    ("dataset: d\nsources: [{kind: images, uri: x, extra: 1}]\n", [], "unknown key 'sources[0].extra'"),
    ("resolution: 3\n", [], "missing required key 'dataset'"),
    ("dataset: [d\n", [], "not valid YAML"),
    ("dataset: d\n", ["resolution"], "not of the form key.sub=value"),
])
def test_bad_config_names_key_value_and_file(tmp_path, text, overrides, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Job, p, overrides)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg
    if "form key.sub" not in msg:
        assert str(p) in msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(Job, tmp_path / "nope.yaml")


def test_parse_overrides_and_flatten():
    assert parse_overrides(["a.b=3", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 3, "c": "x"}, "d": [1, 2]}
    assert flatten(Job("d", sources=[Source("images", "u")]))["resolution"] == 256
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}


def test_environment_references_expand_with_pippo_store_default(tmp_path, monkeypatch):
    p = write(tmp_path, "dataset: ${PIPPO_STORE}/datasets/x\nsources: [{kind: images, uri: '${SRC:-/data}'}]\n")
    monkeypatch.delenv("PIPPO_STORE", raising=False)
    job = load_config(Job, p)
    assert job.dataset == "./.pippo/store/datasets/x" and job.sources[0].uri == "/data"
    monkeypatch.setenv("PIPPO_STORE", "s3://bucket/root")
    monkeypatch.setenv("SRC", "/mnt/photos")
    job = load_config(Job, p)
    assert job.dataset == "s3://bucket/root/datasets/x" and job.sources[0].uri == "/mnt/photos"
    with pytest.raises(ConfigError, match=r"\$\{NOPE\} is not set"):
        load_config(Job, p, ["dataset=${NOPE}"])
