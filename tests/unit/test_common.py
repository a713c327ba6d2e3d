"""pippo_common: the shared leaf package (issue 18 step 1). One redactor masks every credential
shape; the package imports none of the project's other packages."""
from pathlib import Path

import pytest

from pippo_common.redact import has_credentials, redact, redact_text, strip_credentials

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3tPassw0rdXYZ"

# Every shape a credential reaches us in, and what must survive next to it.
CREDENTIAL_SHAPES = [
    f"https://user:{SECRET}@host.example/path",               # userinfo user:password
    f"s3://AKIAIDENTIFIER:{SECRET}@bucket/key",                # s3fs-style KEY:SECRET@bucket
    f"https://{SECRET}@github.com/org/repo.git",               # a lone token as user
    f"https://host:8080/x?token={SECRET}&page=2",              # secret query parameter
    f"https://b.s3.amazonaws.com/o?X-Amz-Signature={SECRET}",  # presigned URL
    f"password={SECRET}",                                       # key=value in a message
    f"api_key: {SECRET}",                                       # key: value in YAML text
    f'{{"secret": "{SECRET}"}}',                                # JSON pair
    f"mlflow at http://u:{SECRET}@10.0.0.1:5000 is down",      # URL inside a sentence
    f"postgresql://user:{SECRET}@db:5432/mlflow",               # a database URI
    f"RuntimeError: password={SECRET}",                         # a pair as the value of a pair
    f"error: token={SECRET} refused",                           # (a traceback's last line)
]


@pytest.mark.parametrize("text", CREDENTIAL_SHAPES)
def test_the_one_redactor_masks_every_credential_shape(text):
    assert SECRET not in redact_text(text)
    assert SECRET not in str(redact({"value": text}))


@pytest.mark.parametrize("url", ["https://host:8080/a@b", "https://host/a@b/c", "s3://bucket/a@b",
                                 "https://host:8080/p?q=a@b", "http://[::1]:8080/x@y"])
def test_an_at_sign_after_the_authority_is_not_userinfo(url):
    """The drift of issue 18: `https://host:8080/a@b` has a port and a path holding "@"; a copy of
    the redactor that read `host:8080/a` as user:password mangled it."""
    assert not has_credentials(url)
    assert strip_credentials(url) == url
    assert redact_text(url) == url


def test_identifiers_are_kept():
    assert redact({"aws_access_key_id": "AKIAIDENTIFIER", "bucket": "s3://my-bucket/ds"}) == \
        {"aws_access_key_id": "AKIAIDENTIFIER", "bucket": "s3://my-bucket/ds"}


# The package directions (pippo_common a leaf) are checked on the AST in test_import_graph.py.


def test_importing_pippo_common_loads_no_other_project_package():
    import subprocess
    import sys

    code = ("import pkgutil, importlib, sys, pippo_common\n"
            "for m in pkgutil.iter_modules(pippo_common.__path__):\n"
            "    importlib.import_module('pippo_common.' + m.name)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & "
            "{'dataprep', 'pipelines', 'pippo_model', 'cluster'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_every_project_error_is_one_user_error_family():
    from cluster.job_env import CredentialError
    from cluster.shipping import ShippingError
    from cluster.submit import SubmitError
    from dataprep.errors import CalibrationError, CaptureError
    from pippo_common.storage import StorageError
    from pipelines.training.compat import IncompatibleCheckpoint, StageInputError
    from pippo_common.errors import ConfigError, DataError, UserError

    for cls in (ConfigError, DataError, CalibrationError, CaptureError, StorageError, SubmitError,
                ShippingError, CredentialError, StageInputError, IncompatibleCheckpoint):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)   # callers catch these


def test_report_is_one_redacted_line_exit_2_for_a_user_error_and_a_traceback_exit_1_for_a_bug():
    import io

    from pippo_common.errors import UserError, report

    out = io.StringIO()
    assert report(UserError(f"cannot reach https://u:{SECRET}@h/x\nsecond line"), stream=out) == 2
    assert out.getvalue() == "pippo: error: cannot reach https://***@h/x second line\n"
    out = io.StringIO()
    try:
        raise RuntimeError(f"password={SECRET}")
    except RuntimeError as exc:
        assert report(exc, stream=out) == 1
    assert "Traceback" in out.getvalue() and SECRET not in out.getvalue()


def test_the_cluster_commands_report_through_the_cli_convention(capsys, monkeypatch):
    """`pippo jobs list` without a cluster address: the SubmitError reaches the CLI's one report,
    not a printer of the cluster's own."""
    from pipelines.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "")
    assert main(["jobs", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pippo: error: no cluster address"), err


def test_one_code_version_follows_the_source(tmp_path):
    """The digest is the workflow cache keys' code part: same tree, same digest; an edited file or
    a new pin, a new one. code_version() says both the package and the digest."""
    from pippo_common.versions import CODE_DIRS, code_version, package_version, source_digest

    assert "pippo_common" in CODE_DIRS
    for d in ("dataprep", "pipelines"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.py").write_text("x = 1\n")
    first = source_digest(tmp_path, ("dataprep", "pipelines"))
    assert source_digest(tmp_path, ("dataprep", "pipelines")) == first and len(first) == 16
    (tmp_path / "pipelines" / "m.py").write_text("x = 2\n")
    second = source_digest(tmp_path, ("dataprep", "pipelines"))
    (tmp_path / "requirements.lock").write_text("numpy==2.0\n")
    assert len({first, second, source_digest(tmp_path, ("dataprep", "pipelines"))}) == 3
    assert code_version() == f"{package_version()}+{source_digest()}"


@pytest.mark.parametrize("side,ok", [(64, True), (48, True), (40, False), (0, False), (-16, False), (272, False)])
def test_one_resolution_check(side, ok):
    """Training, sampling, evaluation and the model config share it: one message, one type, a
    ValueError (model config callers) and a UserError (one line, exit 2)."""
    from pippo_common.checks import check_resolution
    from pippo_common.errors import ConfigError, UserError

    if ok:
        assert check_resolution(side, 16, at_most=256) == side
        return
    with pytest.raises(ConfigError, match=rf"^--resolution {side} is not a positive multiple of 16 .*at most 256$") as err:
        check_resolution(side, 16, "--resolution", at_most=256)
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_the_model_config_refuses_a_resolution_off_the_token_grid():
    from pippo_model.config import ModelConfig

    with pytest.raises(ValueError, match="resolution 100 is not a positive multiple of"):
        ModelConfig(resolution=100)


def test_a_failure_that_explains_itself_is_one_line_with_its_exit_code():
    import io

    from pippo_common.errors import Failed, report

    out = io.StringIO()
    assert report(Failed("job raysubmit_1 is still PENDING after 5 s"), stream=out) == 1
    assert out.getvalue() == "pippo: error: job raysubmit_1 is still PENDING after 5 s\n"


def test_own_records_print_pippo_lines_once_through_our_handler():
    """A Ray Train worker: another handler on the root (Ray Train's, plain, stdout) must not print
    pippo's records a second time, unredacted."""
    import io
    import logging

    from pippo_common import logs

    ours, theirs = io.StringIO(), io.StringIO()
    other = logging.StreamHandler(theirs)
    root = logging.getLogger()
    root.addHandler(other)
    import sys
    saved = sys.stderr
    try:
        sys.stderr = ours
        logs.configure(0)
        logs.configure_once(own_records=True)
        logging.getLogger("pippo.train").info("step 1 password=%s", SECRET)
    finally:
        sys.stderr = saved
        root.removeHandler(other)
        logs.unconfigure()
    assert "step 1 password=***" in ours.getvalue() and SECRET not in ours.getvalue()
    assert theirs.getvalue() == ""
    assert logging.getLogger("pippo").propagate
