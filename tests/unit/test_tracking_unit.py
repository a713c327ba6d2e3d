"""The default tracking URI and the redaction RunTracker applies, without an MLflow store
(the sqlite store and `mlflow server`: tests/integration/test_tracking.py)."""


from pipelines.tracking import tracking_uri
from pippo_common.redact import redact

SECRET_CONFIG = {
    "data": {"uri": "s3://AKIAIOSFODNN7EXAMPLE:s3cr3t/Val+ue@bucket/x",
             "mirror": "https://user:pw123zz@host/a?token=abcTOK987&page=2"},
    "storage_options": {"aws_secret_access_key": "xyzSECRET42", "endpoint": "http://127.0.0.1:9"},
    "cmd": "sync --password=hunter2qq",
    "model": {"max_tokens": 77, "sort_key": "camera"},
}


def test_default_uri_is_local_sqlite(tmp_path, monkeypatch):
    from pipelines.tracking import _artifact_location
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri()
    assert uri == f"sqlite:///{tmp_path / '.pippo' / 'mlflow.db'}"
    assert _artifact_location(uri, "pippo smoke") == (tmp_path / ".pippo/mlartifacts/pippo_smoke").as_uri()
    assert _artifact_location("http://127.0.0.1:5000", "x") is None


def test_redact():
    out = redact(SECRET_CONFIG)
    assert out["data"]["uri"] == "s3://***@bucket/x"
    assert out["data"]["mirror"] == "https://***@host/a?token=***&page=2"
    assert out["storage_options"] == {"aws_secret_access_key": "***", "endpoint": "http://127.0.0.1:9"}
    assert out["cmd"] == "sync --password=***"
    assert out["model"] == SECRET_CONFIG["model"]          # config words that only look like secrets
    assert redact("https://h/x?X-Amz-Signature=ab12&X-Amz-Credential=AKIA/2024") == \
        "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***"
