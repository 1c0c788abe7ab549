"""Security: checkpoints never run code, output names stay inside the output, and credentials
never reach error messages or error rows."""
from __future__ import annotations

import ast
import json
import io
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from psa_ray.io import storage
from psa_ray.io.rows import ManifestError
from psa_ray.io.inputs import read_corpus
from psa_ray.io.storage import join
from psa_ray.io.redact import redact
from psa_ray.models.networks import CamNet
from psa_ray.models.weights import WeightsError, load_weights
from psa_ray.pipeline.readers import decode_rows
from psa_ray.pipeline.writers import error_table

REPO = pathlib.Path(__file__).resolve().parents[1]
# Realistic-looking credentials (AWS's documentation examples, with the slashes a real secret has).
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjEHYaCXVzLWVhc3QtMSJHMEUCIQDexampleSessionTokenValue0123456789abcdefABCDEF"


class _Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("wrapped", [True, False], ids=["inside-a-state-dict", "whole-file"])
def test_a_checkpoint_that_runs_code_is_refused_and_never_runs(tmp_path, wrapped):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    payload = _Payload(marker)
    torch.save({"model": CamNet("tiny", 3).state_dict(), "extra": payload} if wrapped else payload, path)
    with pytest.raises(WeightsError, match="not a weights-only PyTorch checkpoint"):
        load_weights(CamNet("tiny", 3), str(path))
    assert not marker.exists(), "the payload must not run"
    torch.load(path, weights_only=False)  # proof that the file is live: a full unpickle runs it
    assert marker.read_text() == "pwned"


def test_every_torch_load_in_the_code_is_weights_only():
    """A guard for code added later: each torch.load of the library and jobs (they load files
    users point them at) says weights_only=True, whatever torch's default or environment."""
    calls = []
    for source in [*REPO.glob("psa_ray/**/*.py"), *REPO.glob("jobs/**/*.py")]:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{source.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "the weights loader itself calls torch.load"
    assert [where for where, safe in calls if not safe] == []


# --------------------------------------------------------------------------- output names


def test_ids_that_would_escape_the_output_are_rejected(tmp_path):
    ids = ["../escape", "../../../etc/cron.d/job", "a/../../b", "..", "sub/dir", "/abs", "..\\win", "ok-1", "x..y.z"]
    (tmp_path / "m.csv").write_text("image_id,image,tags\n" + "".join(f"{i},a.png,cat\n" for i in ids))
    corpus, errors = read_corpus(str(tmp_path / "m.csv"), classes=["cat"])
    accepted = [r.image_id for r in corpus.rows]
    assert accepted == ["ok-1"]
    assert sorted(e.image_id for e in errors) == sorted(set(ids) - {"ok-1"})
    assert {e.error for e in errors} == {"bad_id"}
    labels = tmp_path / "out" / "labels"
    for image_id in accepted:  # where the writer would put the label
        assert os.path.dirname(os.path.normpath(join(str(labels), f"{image_id}.png"))) == str(labels)


def test_voc_split_lines_that_would_escape_are_rejected_unread(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n../../secret\n")
    (root / "Annotations" / "2007_000032.xml").write_text(
        "<annotation><object><name>cat</name></object></annotation>")
    (tmp_path / "secret.xml").write_text("<annotation><object><name>dog</name></object></annotation>")
    corpus, errors = read_corpus(str(root))
    assert [r.image_id for r in corpus.rows] == ["2007_000032"]
    assert [(e.image_id, e.error) for e in errors] == [("../../secret", "bad_id")]
    assert "dog" not in repr(errors), "the file outside the folder was never read"


# --------------------------------------------------------------------------- credentials


def test_credentials_in_an_image_uri_are_rejected_and_never_written(tmp_path):
    uri = f"s3://{KEY_ID}:{SECRET.replace('/', '%2F')}@bucket/images/a.jpg"
    (tmp_path / "m.jsonl").write_text(
        f'{{"image_id": "a", "image": "{uri}", "tags": ["cat"]}}\n'
        '{"image_id": "b", "image": "s3://bucket/images/b.jpg", "tags": ["cat"]}\n')
    corpus, errors = read_corpus(str(tmp_path / "m.jsonl"), classes=["cat"])
    assert [r.image_id for r in corpus.rows] == ["b"]
    assert [(e.image_id, e.error) for e in errors] == [("a", "bad_image")]
    assert "credentials do not belong in URIs" in errors[0].message
    sink = io.BytesIO()
    pq.write_table(error_table([e.to_dict() for e in errors]), sink)  # the errors/ file
    for leaked in (KEY_ID, SECRET, SECRET.replace("/", "%2F")):
        assert leaked not in sink.getvalue().decode("latin-1") and leaked not in repr(errors)


def test_credentials_in_a_manifest_uri_never_reach_the_error(monkeypatch):
    with pytest.raises(ManifestError) as info:
        read_corpus(f"s3://{KEY_ID}:{SECRET}@bucket/corpus/manifest.csv", classes=["cat"])
    assert "s3://***@bucket/corpus/manifest.csv" in str(info.value)
    assert KEY_ID not in str(info.value) and SECRET not in str(info.value)


def test_storage_errors_are_redacted_in_error_rows(tmp_path, monkeypatch):
    """A storage library that echoes the credentials it was given (env or presigned URL)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    leaky = (f"AccessDenied for {KEY_ID} signing with {SECRET} (token {TOKEN}); "
             f"https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential={KEY_ID}%2F20260101&X-Amz-Signature=0f9e8d7c6b")

    class LeakyFilesystem:
        def open_input_stream(self, path):
            raise OSError(leaky)

    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda uri, endpoint_url=None: (LeakyFilesystem(), real(uri)[1]))
    out = decode_rows({"image_id": np.array(["a"], object), "image": np.array([str(tmp_path / "a.jpg")], object)})
    message = out["message"][0]
    assert out["error"][0] == "read" and "AccessDenied" in message and "a.jpg" in message
    for leaked in (KEY_ID, SECRET, TOKEN, "0f9e8d7c6b"):
        assert leaked not in message, message
    assert redact(message) == message


# --------------------------------------------------------------------------- cluster credentials


RAY_TOKEN = "7f3a9c1e5b2d4f608a1c3e5f7092b4d6e8f0a2c4b6d8e0f1a3c5e7f9b1d3f5a7"  # `ray get-auth-token` form


def test_the_ray_token_is_redacted_wherever_the_process_holds_it(tmp_path, monkeypatch):
    """KubeRay pods hold the token in RAY_AUTH_TOKEN, `ray up` nodes in ~/.ray/auth_token, others
    in a RAY_AUTH_TOKEN_PATH file. 64 hex digits look like any hash, so only the value finds it:
    a sha256 digest in the same text stays."""
    digest = "9b74c9897bac770ffc029102a200c5de0c3b8cba1a47c4c8a7c6d8a3e5f0b1c2"
    text = f"connect failed (token {RAY_TOKEN}); image sha256 {digest}"
    for where in ("env", "path", "home"):
        for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        if where == "env":
            monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
        elif where == "path":
            (tmp_path / "token").write_text(RAY_TOKEN + "\n")
            monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
        else:
            (tmp_path / "home" / ".ray").mkdir(parents=True)
            (tmp_path / "home" / ".ray" / "auth_token").write_text(RAY_TOKEN)
        out = redact(text)
        assert RAY_TOKEN not in out and digest in out, (where, out)
    monkeypatch.setenv("HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert RAY_TOKEN in redact(text), "without the token at hand it is not recognised (the test can fail)"


def test_credentials_in_headers_uris_and_runtime_envs_are_redacted(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    runtime_env = json.dumps({"working_dir": f"https://ci:{TOKEN[:20]}@git.example.com/psa/ray/main.zip",
                              "env_vars": {"AWS_SECRET_ACCESS_KEY": "hunter2-not-base64",
                                           "RAY_AUTH_TOKEN": "short-but-secret", "HF_TOKEN": "hf_abc123",
                                           "DB_PASSWORD": "pw1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    lines = [f"runtime_env={runtime_env}",
             "GET /api/jobs/ Authorization: Bearer tok-123.abc", "x-ray-authorization: Bearer tok-456",
             "Authorization: Basic dXNlcjpwYXNzd29yZA==", "curl -H 'Bearer tok-789' http://head:8265",
             "https://acct.blob.core.windows.net/c/w.pth?sv=2024-01-01&sig=AbC%2Fdef%3D",
             "https://storage.googleapis.com/b/w.pth?X-Goog-Signature=0a1b2c3d&X-Goog-Date=20260101"]
    out = redact("\n".join(lines))
    for leaked in (TOKEN[:20], "hunter2-not-base64", "short-but-secret", "hf_abc123", "pw1", "tok-123.abc",
                   "tok-456", "dXNlcjpwYXNzd29yZA==", "tok-789", "AbC%2Fdef%3D", "0a1b2c3d"):
        assert leaked not in out, (leaked, out)
    kept = ('"RAY_DATA_DISABLE_PROGRESS_BARS": "1"', "git.example.com/psa/ray/main.zip", "http://head:8265",
            "sv=2024-01-01", "X-Goog-Date=20260101", "Authorization: Bearer ***")
    assert all(k in out for k in kept), out


def test_redaction_keeps_what_a_run_record_holds(tmp_path):
    """Nothing in an ordinary run record looks like a credential (redact runs on run.json)."""
    record = {"run_id": "3f2a9c1e5b2d", "output": "s3://my-bucket/psa-ray/run1",
              "input": str(tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"),
              "preset": {"cam": {"max_tokens": 5, "sort_key": "image_id", "crf_iterations": 10}},
              "checkpoints": {"cam": "s3://my-bucket/psa-ray/run1/checkpoints/cam/model.pt"},
              "versions": {"ray": "2.60.0", "torch": "2.14.1"},
              "sha1": "3f786850e387550fdab836ed7e6dc881de23001b"}
    text = json.dumps(record, indent=2)
    assert redact(text) == text
