"""Issue 10 items 6-8: credentials are never stored or printed; hostile or careless input ends as
one clear line on stderr (exit 2), never a traceback or a hang; -q/-v anywhere; quiet libraries.

Each test builds its hostile input itself and runs `pippo` in-process (pipelines.cli.main), so
the whole file takes seconds: no Ray, one subprocess (a real closed pipe)."""
import json
import logging
import os
import shutil
import sys
import time

import pytest

from support import free_port
from pippo_common.redact import redact_config, redact_text, register_secret, strip_credentials
from pipelines.cli import build_parser, main
from support import AWS_SECRET, KEY_ID, run, one_line, fake_version  # shared with this file's other half


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# ---- 6. secrets --------------------------------------------------------------------------------

def test_strip_credentials_and_redact():
    assert strip_credentials("http://user:pa55word@host:8080/a/b.jpg") == "http://host:8080/a/b.jpg"
    assert strip_credentials(f"s3://{KEY_ID}:{AWS_SECRET}@bucket/k") == "s3://bucket/k"
    assert strip_credentials("https://h/x.jpg?X-Amz-Signature=ab12&size=2") == \
        "https://h/x.jpg?X-Amz-Signature=***&size=2"
    for same in ("https://host:8080/a@b", "https://medium.com/@user/p", "s3://b/key@v2", "file:///tmp/a@b.jpg"):
        assert strip_credentials(same) == same                 # no userinfo there
    text = redact_text(f"GET https://bob:hunter2xx@h/x?token=t0k3nval failed; password=pw1234 {KEY_ID}")
    assert not any(s in text for s in ("hunter2xx", "t0k3nval", "pw1234")), text
    assert KEY_ID in text              # an access key id is an identifier, not a secret (issue 15)
    register_secret("expanded-T0KEN-value", "${T10_TOKEN}")
    cfg = redact_config({"sources": [{"uri": "https://h/list.txt?sig=expanded-T0KEN-value"}],
                         "storage_options": {"secret": "abc"}, "resolution": 64, "max_tokens": 3})
    assert cfg == {"sources": [{"uri": "https://h/list.txt?sig=${T10_TOKEN}"}],
                   "storage_options": {"secret": "***"}, "resolution": 64, "max_tokens": 3}


def test_env_token_is_recorded_unexpanded_and_never_logged(tmp_path, capsys, monkeypatch):
    """${TOKEN} in a source URI: the config handed to the build (and so the version record) says
    ${TOKEN}, and a log line printing the expanded URI shows ${TOKEN} too."""
    import dataprep.build.job

    token = "tok-5ecret-9f8e7d"
    monkeypatch.setenv("T10_TOKEN", token)
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"dataset: {tmp_path / 'ds'}\nsources:\n"
                   "  - {kind: urls, uri: 'https://h.example/list.txt?sig=${T10_TOKEN}'}\n"
                   "  - {kind: images, uri: 'https://bob:pw-${T10_TOKEN}@h.example/photos'}\n")
    seen = {}

    def fake_run_build(cfg, config_dict, dry_run=False):
        assert token in cfg.sources[0].uri              # the build itself gets the real URI
        logging.getLogger("pippo.data.build").info("source %s", cfg.sources[0].uri)
        logging.getLogger("pippo.data.build").info("source %s", cfg.sources[1].uri)
        seen["config"] = config_dict
        return "v1"

    monkeypatch.setattr(dataprep.build.job, "run_build", fake_run_build)
    code, out, err = run(capsys, "data", "build", cfg)
    assert code == 0 and out.strip() == "v1"
    recorded = json.dumps(seen["config"])
    assert token not in recorded and token not in out and token not in "\n".join(err)
    assert seen["config"]["sources"][0]["uri"] == "https://h.example/list.txt?sig=${T10_TOKEN}"
    assert seen["config"]["sources"][1]["uri"] == "https://***@h.example/photos"   # userinfo masked
    assert any("sig=${T10_TOKEN}" in line for line in err)


@pytest.mark.parametrize("args", [
    ["data", "versions", f"s3://{KEY_ID}:{AWS_SECRET}@bucket/ds"],
    ["data", "show", f"s3://{KEY_ID}:{AWS_SECRET}@bucket/ds@latest"],
    ["data", "build", "CFG", f"dataset=s3://{KEY_ID}:{AWS_SECRET}@bucket/ds"],
])
def test_credentials_in_an_s3_url_are_never_echoed(args, tmp_path, capsys, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    (tmp_path / "photos").mkdir()
    (tmp_path / "c.yaml").write_text(f"dataset: x\nsources: [{{kind: images, uri: {tmp_path / 'photos'}}}]\n")
    line = one_line(capsys, *[str(tmp_path / "c.yaml") if a == "CFG" else a for a in args])
    assert "credentials in an object-store URL" in line
    assert AWS_SECRET not in line and "wJalr" not in line and KEY_ID not in line


def test_unexpected_errors_keep_their_traceback_but_lose_credentials(capsys, monkeypatch):
    import pipelines.cli.data as dc

    def boom(args):
        raise RuntimeError(f"bug while reading https://bob:hunter2zz@host/x ({AWS_SECRET})")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setattr(dc, "versions", boom)
    code, _, err = run(capsys, "data", "versions", "x")
    text = "\n".join(err)
    assert code == 1 and "Traceback" in text and "RuntimeError" in text     # a bug stays visible
    assert "hunter2zz" not in text and AWS_SECRET not in text


def test_errors_inside_ray_tasks_are_judged_by_their_cause():
    from pippo_common.errors import user_error_message

    class RayTaskError(Exception):          # the shape of ray.exceptions.RayTaskError
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    assert user_error_message(RayTaskError(PermissionError(13, "Permission denied", "/x"))) == \
        "/x: Permission denied"
    assert user_error_message(RayTaskError(KeyError("bug"))) is None


def test_a_version_without_samples_is_committed_with_a_warning(tmp_path, capsys, monkeypatch):
    import dataprep.build.job

    (tmp_path / "photos").mkdir()
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"dataset: {tmp_path / 'ds'}\nsources: [{{kind: images, uri: {tmp_path / 'photos'}}}]\n")

    def fake_run_build(cfg, config_dict, dry_run=False):
        fake_version(tmp_path / "ds", "e" * 20)
        return "e" * 20

    monkeypatch.setattr(dataprep.build.job, "run_build", fake_run_build)
    code, out, err = run(capsys, "data", "build", cfg)
    assert code == 0 and out.strip() == "e" * 20
    assert len(err) == 1 and "WARNING" in err[0] and "keeps 0 samples" in err[0]


# ---- 7. one clear line: object stores ----------------------------------------------------------

def test_dead_endpoint_fails_fast_in_one_line(capsys, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    line = one_line(capsys, "data", "versions", "s3://bucket/ds")
    assert time.monotonic() - start < 5, "retried instead of failing fast"
    assert "cannot reach the object store" in line and AWS_SECRET not in line


# ---- 7. one clear line: configs and arguments --------------------------------------------------

@pytest.mark.parametrize("override, fragment", [
    ("workers=0", "workers must be >= 1"),
    ("plucker_stride=0", "plucker_stride must be >= 1"),
    ("filters.max_pixels=-1", "max_pixels must be >= 1"),
    ("dataset=", "'dataset' (the target dataset URI) must not be empty"),
    ("sources=[{kind: images, uri: ''}]", "source uri must not be empty"),
    ('tags=["ok", "bad\\x01tag"]', "invalid tag name"),
    (f"tags=[{'t' * 300}]", "300 characters"),
    ("tags=[latest]", "invalid tag name 'latest'"),
    ("cameras=[]", "selects no camera"),
    ("cameras=['../../outside/cam']", "invalid camera id"),
    ("http.timeout_s=.nan", "timeout_s must be a finite number"),
    ("resolution=1048576", "resolution (1048576) must be within"),
])
def test_bad_build_configs_fail_before_anything_is_built(override, fragment, tmp_path, capsys, monkeypatch):
    (tmp_path / "photos").mkdir()
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"dataset: {tmp_path / 'ds'}\nsources: [{{kind: images, uri: {tmp_path / 'photos'}}}]\n"
                   "resolution: 64\nplucker_stride: 16\n")
    monkeypatch.chdir(tmp_path)
    line = one_line(capsys, "data", "build", cfg, override)
    assert fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.yaml", "photos"]   # nothing built, anywhere


def test_config_bombs_are_one_line_and_cheap(tmp_path, capsys):
    laughs = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    cases = {
        "laughs.yaml": ("\n".join(laughs) + "\n").encode(),            # 9^10 strings if expanded
        "deep.yaml": b"x: " + b"[" * 200_000 + b"]" * 200_000 + b"\n",
        "huge.yaml": b"# " + b"x" * (2 << 20) + b"\n",
        "binary.yaml": b"dataset: \xff\xfe\n",
        "keys.yaml": b"dataset: d\n1: x\nb: y\n",                      # int and str keys together
    }
    expected = {"laughs.yaml": "expands to more than 100000 values", "deep.yaml": "nested deeper than",
                "huge.yaml": "larger than", "binary.yaml": "not UTF-8", "keys.yaml": "unknown key"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        start = time.monotonic()
        line = one_line(capsys, "data", "build", tmp_path / name)
        assert expected[name] in line and time.monotonic() - start < 5, (name, line)
    os.mkfifo(tmp_path / "fifo.yaml")                                  # would block a plain read
    assert "not a regular file" in one_line(capsys, "data", "build", tmp_path / "fifo.yaml")
    assert "refers to itself" in one_line(capsys, "data", "build", tmp_path / "keys.yaml", "x=&a [*a]")


def test_yaml_aliases_of_shared_objects_still_load(tmp_path):
    """PyYAML's own dumper writes &id001/*id001 for an object used twice: such configs stay valid."""
    import yaml

    from dataprep.build_config import BuildConfig
    from pippo_common.config import load_config

    source = {"kind": "images", "uri": str(tmp_path)}
    text = yaml.safe_dump({"dataset": str(tmp_path / "ds"), "sources": [source, source],
                           "resolution": 64, "plucker_stride": 16})
    assert "*id001" in text
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(BuildConfig, tmp_path / "c.yaml")
    assert [s.uri for s in cfg.sources] == [str(tmp_path)] * 2


@pytest.mark.parametrize("args, fragment", [
    (["data", "synth-images", "OUT", "--count", "-3"], "--count: -3 is not within"),
    (["data", "synth-captures", "OUT", "--cameras", "0"], "--cameras: 0 is not within"),
    (["data", "synth-captures", "OUT", "--height", "99999999"], "--height"),
    (["data", "gc", "OUT", "--grace-seconds", "nan"], "--grace-seconds"),
])
def test_bad_arguments_are_one_line(args, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "out") if a == "OUT" else a for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_synth_functions_refuse_bad_counts(tmp_path):
    from dataprep.studio.synth import synth_capture, synth_images

    with pytest.raises(ValueError, match="count"):
        synth_images(tmp_path / "p", count=-3)
    with pytest.raises(ValueError, match="cameras"):
        synth_capture(tmp_path / "c", cameras=0)
    assert not any(tmp_path.iterdir())


# ---- 7. one clear line: stores and versions ----------------------------------------------------

def test_store_paths_tags_and_stray_files(tmp_path, capsys):
    not_a_dataset = tmp_path / "passwd"
    not_a_dataset.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert "is not a dataset" in one_line(capsys, "data", "show", f"{not_a_dataset}@latest")

    ds = tmp_path / "ds"
    fake_version(ds, "a" * 20)
    (ds / "versions" / "notes.json").write_text('{"note": "built on friday"}')     # stray files
    (ds / "versions" / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (ds / "tags").mkdir()
    (ds / "tags" / "README.json").write_text("[]")
    code, out, err = run(capsys, "data", "versions", ds)
    assert code == 0 and out.startswith("a" * 20) and len(out.splitlines()) == 1
    assert all("ignoring" in line for line in err) and len(err) == 3
    for bad in ("t" * 300, "bad\x01tag", "a/b", "../x", "latest", ""):
        assert "invalid tag name" in one_line(capsys, "data", "tag", f"{ds}@latest", bad)
    assert sorted(p.name for p in (ds / "tags").iterdir()) == ["README.json"]
    code, out, _ = run(capsys, "data", "tag", f"{ds}@latest", "v1.0-rc+1")
    assert code == 0 and out.strip() == "a" * 20
    assert (ds / "tags" / "v1.0-rc+1.json").exists()


def test_broken_pipe_in_process(tmp_path, capsys, monkeypatch):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    fake_version(tmp_path / "ds", "b" * 20)
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["data", "versions", str(tmp_path / "ds")]) == 141
    assert capsys.readouterr().err == ""


# ---- 7. one clear line: calibrations -----------------------------------------------------------

def test_hostile_calibrations(synth_capture_dir, tmp_path, capsys):
    from dataprep.studio.capture import Capture
    from dataprep.errors import CalibrationError

    deep = tmp_path / "deep"
    shutil.copytree(synth_capture_dir, deep)
    (deep / "camera_calibration.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in one_line(capsys, "data", "inspect", deep)

    huge = tmp_path / "huge"
    shutil.copytree(synth_capture_dir, huge)
    calib = json.loads((huge / "camera_calibration.json").read_text())
    calib["KRT"][0]["K"][0][0] = 1.7e308            # finite, but overflows in any maths
    bad_id = calib["KRT"][0]["cameraId"]
    (huge / "camera_calibration.json").write_text(json.dumps(calib))
    cap = Capture(str(huge), strict=False)
    assert bad_id not in cap.cameras and "fx=1.7e+308 is outside" in cap.invalid_cameras[bad_id]
    assert len(cap.cameras) == len(calib["KRT"]) - 1
    with pytest.raises(CalibrationError, match="outside"):
        Capture(str(huge))
    code, out, _ = run(capsys, "data", "inspect", huge)
    assert code == 0 and f"cam {bad_id}: INVALID" in out


# ---- 8. quiet libraries, -q/-v anywhere --------------------------------------------------------

@pytest.mark.parametrize("argv, verbose, quiet", [
    (["data", "build", "c.yaml"], False, False),
    (["-v", "data", "build", "c.yaml"], True, False),
    (["data", "build", "c.yaml", "-v"], True, False),
    (["data", "-v", "build", "c.yaml", "x=1"], True, False),
    (["data", "build", "c.yaml", "x=1", "-q"], False, True),
    (["-q", "data", "versions", "d"], False, True),
    (["train", "s.yaml", "--verbose"], True, False),
])
def test_verbosity_flags_work_before_and_after_the_subcommand(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_log_levels_and_redaction(capsys, tmp_path):
    from pippo_common.logs import configure

    fake_version(tmp_path / "ds", "c" * 20)
    try:
        for flag, pippo_info, library_info in ((None, True, False), ("-v", True, True), ("-q", False, False)):
            assert main(["data", "versions", str(tmp_path / "ds")] + ([flag] if flag else [])) == 0
            capsys.readouterr()
            assert logging.getLogger("pippo.data").isEnabledFor(logging.INFO) is pippo_info
            assert logging.getLogger("pippo.data").isEnabledFor(logging.DEBUG) is (flag == "-v")
            for name in ("botocore.credentials", "urllib3.connectionpool", "s3fs", "fsspec"):
                assert logging.getLogger(name).isEnabledFor(logging.INFO) is library_info, (flag, name)
        configure(0)
        logging.getLogger("pippo.data").info("fetching https://bob:hunter2yy@h/x?token=abc123zz")
        logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
        err = capsys.readouterr().err
        assert "https://***@h/x?token=***" in err and "hunter2yy" not in err and "abc123zz" not in err
        assert "Found credentials" not in err
    finally:
        configure(0)
