"""Issue 15 items 3 and 10: one redactor for the whole project; secret values (keys, tokens,
passwords), never identifiers, are kept out of every file, MLflow entry, log and output line; names
and paths never derive from a secret; `pippo compare` prints no terminal escapes.

The redactor's cases run in-process; the end-to-end checks run the real `pippo pipeline run` /
`pippo data build` / a Ray task in fresh processes (their own Ray temp dir, their own MLflow
sqlite file) and then search every byte they wrote for the secrets."""
import io

import pytest

from pippo_common import redact as redactor
from pippo_common.text import printable
from pippo_common.redact import (RedactingStream, check_not_secret, is_secret_env_name, is_secret_name, redact,
                             redact_text, register_secret, strip_credentials)

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET15"     # AWS_SECRET_ACCESS_KEY
TOKEN = "hf_t0kenValue15xyzw"                                   # HF_TOKEN
BUCKET_ID = "humans-bucket-15"                                  # AWS_ACCESS_KEY_ID == a bucket name


# ---- the one redactor ------------------------------------------------------------------------------

def test_tracking_has_no_redactor_of_its_own():
    from pipelines import tracking
    assert tracking.redact is redactor.redact and tracking.redact_text is redactor.redact_text


@pytest.mark.parametrize("url", ["https://host:8080/a@b", "https://host:8080/a@b?x=1", "s3://b/key@v2",
                                 "https://medium.com/@user/p"])
def test_a_port_then_a_path_with_at_is_no_userinfo(url):
    # RFC 3986: the authority ends at the first "/", so "host:8080" is a host and a port
    assert strip_credentials(url) == url and redact_text(url) == url and redact({"u": url}) == {"u": url}


@pytest.mark.parametrize("url, shown", [
    ("https://user:pa/ss@host/x", "https://***@host/x"),          # a password with "/" (AWS keys)
    ("https://user:8080@host/x", "https://***@host/x"),           # digits then "@": a password
    ("https://ghp_tokenAsUser@github.com/o/r", "https://***@github.com/o/r"),
    ("see s3://AKID:se/cr+et@bucket/k here", "see s3://***@bucket/k here"),
])
def test_userinfo_is_masked(url, shown):
    assert redact_text(url) == shown and redact({"u": url})["u"] == shown


def test_secret_names_are_secrets_and_identifiers_are_not():
    for name in ("aws_secret_access_key", "password", "db_pwd", "hf_token", "X-Amz-Signature",
                 "api_key", "storage_options.key", "auth", "client_secret"):
        assert is_secret_name(name), name
    for name in ("aws_access_key_id", "AWS_ACCESS_KEY_ID", "access_key", "client_id", "max_tokens",
                 "tokenizer", "sort_key", "key_id", "author"):
        assert not is_secret_name(name), name
    for name in ("OPENAI_KEY", "WANDB_KEY", "GITHUB_PAT", "DB_PASS", "HF_AUTH", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_env_name(name), name
    for name in ("AWS_ACCESS_KEY_ID", "PWD", "OLDPWD", "MONKEY", "PIPPO_STORE", "AWS_REGION"):
        assert not is_secret_env_name(name), name


def test_env_secrets_are_redacted_and_identifiers_kept(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BUCKET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("OPENAI_KEY", "sk-openai-0123456789")
    monkeypatch.setenv("PWD", "/work/some/dir")
    line = f"s3://{BUCKET_ID}/datasets/humans in /work/some/dir with {SECRET_KEY} and sk-openai-0123456789"
    assert redact_text(line) == (f"s3://{BUCKET_ID}/datasets/humans in /work/some/dir with "
                                 "${AWS_SECRET_ACCESS_KEY} and ${OPENAI_KEY}")
    tree = {"dataset": f"s3://{BUCKET_ID}/datasets/humans", "aws_access_key_id": BUCKET_ID,
            "storage_options": {"secret": "x" * 9}, "resolution": 64, "max_tokens": 3}
    assert redact(tree) == {**tree, "storage_options": {"secret": "***"}}


def test_config_loader_registers_secret_named_variables_only(monkeypatch):
    from pippo_common.config import expand_env
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bucket-as-key-id-1")
    monkeypatch.setenv("T15_DATASET_BUCKET", "plain-bucket-name")
    monkeypatch.setenv("T15_DB_PASSWORD", "pw-short")
    got = expand_env({"a": "s3://${AWS_ACCESS_KEY_ID}/x", "b": "s3://${T15_DATASET_BUCKET}/y",
                      "c": "postgres://u:${T15_DB_PASSWORD}@h/db"})
    assert got["c"] == "postgres://u:pw-short@h/db"
    monkeypatch.delenv("T15_DB_PASSWORD")              # still known: the loader registered it
    assert redact(got) == {"a": "s3://bucket-as-key-id-1/x", "b": "s3://plain-bucket-name/y",
                           "c": "postgres://***@h/db"}
    assert redact_text("pw-short") == "${T15_DB_PASSWORD}"


def test_names_never_derive_from_a_secret(monkeypatch):
    register_secret("registered-s3cret-15", "${T15_SECRET}")
    with pytest.raises(ValueError) as err:
        check_not_secret("run-registered-s3cret-15", "run_name")
    assert "registered-s3cret-15" not in str(err.value) and "${T15_SECRET}" in str(err.value)
    check_not_secret("run-plain", "run_name")
    check_not_secret("s3://user:registered-s3cret-15@b/x", "dataset")   # userinfo: storage refuses it


def test_redacting_stream_and_printable():
    register_secret("streamed-s3cret-15", "${T15_STREAM}")
    buf = io.StringIO()
    stream = RedactingStream(buf)
    print("result streamed-s3cret-15 https://u:pw@h/x", file=stream)
    assert buf.getvalue() == "result ${T15_STREAM} https://***@h/x\n"
    assert redactor.redacting(stream) is stream
    assert printable("run\x1b]0;pwned\x07\x1b[31mred\x1b[0m\x9b2J\u202eevil\nx") == "runred evil x"


# ---- through the real commands ---------------------------------------------------------------------


@pytest.mark.parametrize("tag, var, fragment", [
    ("${HF_TOKEN}", TOKEN, "comes from a secret"),           # secret-derived: refused, not shown
    ("${T15_RELEASE}", "../../escape", "invalid tag name"),  # validated after substitution
])
def test_a_tag_from_a_variable_is_checked_after_substitution(tag, var, fragment, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("T15_RELEASE", var)
    (tmp_path / "photos").mkdir()
    (tmp_path / "b.yaml").write_text(f"dataset: {tmp_path / 'ds'}\nsources: [{{kind: images, uri: {tmp_path / 'photos'}}}]\n"
                                     f"tags: ['{tag}']\n")
    try:
        assert main(["data", "build", str(tmp_path / "b.yaml")]) == 2
    finally:
        from pippo_common.logs import unconfigure
        unconfigure()
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert TOKEN not in err and not (tmp_path / "ds").exists()
