"""Storage: URI helpers, typed options (fsspec and pyarrow), local and real-S3 round trips."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.io import storage as st
from pipeline.io.storage import StorageOptions


def test_join_parent_basename():
    assert st.join_uri("s3://b/data", "vol", "x.nii.gz") == "s3://b/data/vol/x.nii.gz"
    assert st.join_uri("/data", "vol/x.npy") == "/data/vol/x.npy"
    assert st.join_uri("/data", "/abs/x.npy") == "/abs/x.npy"
    assert st.join_uri("/data", "s3://b/k") == "s3://b/k"
    assert st.join_uri("file:///data", "x") == "file:///data/x"
    assert st.parent_uri("s3://b/a/m.json") == "s3://b/a"
    assert st.parent_uri("/x/y/m.json") == "/x/y"
    assert st.basename("s3://b/a/folder/") == "folder"
    assert st.split_protocol("s3a://b/k") == ("s3", "b/k")
    assert st.is_local("file:///x") and st.is_local("rel/path") and not st.is_local("s3://b")


def test_options_reject_typos_and_hide_secrets():
    with pytest.raises(ValidationError, match="endpoint"):
        StorageOptions(endpoint="http://x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="retries"):
        StorageOptions(retries=-1)
    opts = StorageOptions(key="AK", secret="very-secret-value")
    assert ("very-secret-value" not in repr(opts)
            and "very-secret-value" not in str(opts.model_dump()))
    assert pickle.loads(pickle.dumps(opts)) == opts


def test_options_read_standard_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    kwargs = StorageOptions(retries=2).s3fs_kwargs()
    assert kwargs["key"] == "envkey" and kwargs["secret"] == "envsecret"
    assert kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert kwargs["client_kwargs"]["region_name"] == "eu-west-3"
    assert kwargs["config_kwargs"]["retries"]["max_attempts"] == 3
    explicit = StorageOptions(key="mine", secret="s", use_env=False).s3fs_kwargs()
    assert explicit["key"] == "mine" and "endpoint_url" not in explicit
    assert StorageOptions(anon=True).s3fs_kwargs()["anon"] is True
    assert "key" not in StorageOptions(anon=True).s3fs_kwargs()


def test_pyarrow_filesystem_from_same_options():
    from pyarrow import fs as pafs

    opts = StorageOptions(endpoint_url="http://127.0.0.1:9", key="k", secret="s", use_env=False)
    fs, path = st.pyarrow_filesystem("s3://bucket/dir/file.parquet", opts)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/dir/file.parquet"
    local, lpath = st.pyarrow_filesystem("file:///tmp/x", None)
    assert isinstance(local, pafs.LocalFileSystem) and lpath == "/tmp/x"


@pytest.mark.parametrize("as_file_uri", [False, True])
def test_local_round_trip(tmp_path, as_file_uri):
    base = f"file://{tmp_path}" if as_file_uri else str(tmp_path)
    uri = st.join_uri(base, "sub", "a.bin")
    st.write_bytes(uri, b"abc")
    st.write_bytes(st.join_uri(base, "sub", "b.txt"), b"hello")
    assert st.read_bytes(uri) == b"abc" and st.file_size(uri) == 3
    assert st.exists(uri) and st.is_dir(st.join_uri(base, "sub"))
    listed = st.list_uri(st.join_uri(base, "sub"))
    assert listed == [st.join_uri(base, "sub", "a.bin"), st.join_uri(base, "sub", "b.txt")]
    assert st.list_uri(st.join_uri(base, "sub"), suffixes=(".TXT",)) == [listed[1]]
    assert st.read_many(listed) == [b"abc", b"hello"]
    with pytest.raises(FileNotFoundError):
        st.read_bytes(st.join_uri(base, "missing"))


@pytest.mark.s3
def test_s3_round_trip(s3_storage, s3_prefix):
    uri = f"{s3_prefix}/dir/a.bin"
    st.write_bytes(uri, b"x" * 1000, s3_storage)
    st.write_bytes(f"{s3_prefix}/dir/b.bin", b"yz", s3_storage)
    st.write_bytes(f"{s3_prefix}/dir/deeper/c.bin", b"c", s3_storage)
    assert st.read_bytes(uri, s3_storage) == b"x" * 1000
    assert st.file_size(uri, s3_storage) == 1000 and st.exists(uri, s3_storage)
    assert (st.list_with_sizes(f"{s3_prefix}/dir", s3_storage)
            == [(uri, 1000), (f"{s3_prefix}/dir/b.bin", 2)])
    assert len(st.list_uri(f"{s3_prefix}/dir", s3_storage, recursive=True)) == 3
    assert st.read_many([uri, f"{s3_prefix}/dir/b.bin"], s3_storage) == [b"x" * 1000, b"yz"]
    with st.open_uri(uri, "rb", s3_storage) as fh:
        fh.seek(990)
        assert fh.read() == b"x" * 10
    assert not st.exists(f"{s3_prefix}/nothing", s3_storage)


@pytest.mark.s3
def test_s3_auth_is_enforced(s3_server, s3_storage, s3_prefix):
    st.write_bytes(f"{s3_prefix}/k", b"1", s3_storage)
    wrong = StorageOptions(**(s3_storage.model_dump() | {"secret": "not-the-secret"}))
    with pytest.raises(PermissionError):
        st.read_bytes(f"{s3_prefix}/k", wrong)


@pytest.mark.s3
def test_s3_pyarrow_parquet_with_same_options(s3_storage, s3_prefix):
    fs, path = st.pyarrow_filesystem(f"{s3_prefix}/table.parquet", s3_storage)
    table = pa.table({"id": list(range(100)), "x": [float(i) for i in range(100)]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert st.exists(f"{s3_prefix}/table.parquet", s3_storage)  # visible through fsspec too
