import polars as pl
import pytest

from pipelines import urllist
from pipelines.urllist import InputError, read_url_list, rows_digest, validate_rows


def test_real_cc3m_validation_list(cc3m_tsv):
    raw = cc3m_tsv.read_bytes().decode("utf-8").splitlines()
    rows = read_url_list(str(cc3m_tsv))  # auto-detected as caption<TAB>url
    assert rows.height == len(raw) == 15833
    valid, rejected = validate_rows(rows)
    assert valid.height + rejected.height == 15833
    # Every row of the real list is a well-formed http(s) pair; what is rejected must be a duplicate url.
    assert set(rejected["error_message"]) <= {urllist.DUPLICATE_URL}
    for i in (0, 1234, 15832):
        caption, url = raw[i].split("\t")
        row = rows.row(i, named=True)
        assert (row["caption"], row["url"], row["row"]) == (caption, url, i)
    assert valid["url"].str.starts_with("http").all()


def test_cc12m_and_cc3m_orders(tmp_path):
    (tmp_path / "a.tsv").write_text("http://x.org/1.jpg\tone\nhttp://x.org/2.jpg\ttwo\n")
    (tmp_path / "b.tsv").write_text("one\thttp://x.org/1.jpg\ntwo\thttp://x.org/2.jpg\n")
    for name in ("a.tsv", "b.tsv"):
        assert urllist.detect_format(str(tmp_path / name)) == {"a.tsv": "cc12m", "b.tsv": "cc3m"}[name]
        rows = read_url_list(str(tmp_path / name))
        assert rows["url"].to_list() == ["http://x.org/1.jpg", "http://x.org/2.jpg"]
        assert rows["caption"].to_list() == ["one", "two"]


def test_parquet_and_csv_with_named_columns(tmp_path):
    df = pl.DataFrame({"image_url": ["http://x.org/1.jpg", "http://x.org/2.jpg"], "alt": ["a, b", "c"],
                       "source": ["x.org", "x.org"]})
    df.write_parquet(tmp_path / "l.parquet")
    df.write_csv(tmp_path / "l.csv")
    for name in ("l.parquet", "l.csv"):
        rows = read_url_list(str(tmp_path / name), url_col="image_url", caption_col="alt", extra_cols=["source"])
        assert rows.columns == ["row", "url", "caption", "source", "n_fields"]
        assert rows["caption"].to_list() == ["a, b", "c"]


def test_missing_column_names_file_and_columns(tmp_path):
    pl.DataFrame({"URL": ["http://x.org/1.jpg"], "text": ["a"]}).write_parquet(tmp_path / "l.parquet")
    with pytest.raises(InputError, match=r"l.parquet: missing column\(s\) \['url', 'caption'\]; the file has \['URL', 'text'\]"):
        read_url_list(str(tmp_path / "l.parquet"))


def test_wrong_delimiter_and_empty_file(tmp_path):
    (tmp_path / "comma.tsv").write_text("one,http://x.org/1.jpg\ntwo,http://x.org/2.jpg\n")
    with pytest.raises(InputError, match=r"comma.tsv: no tab in any of its 2 rows.*input.format: csv"):
        read_url_list(str(tmp_path / "comma.tsv"), fmt="cc3m")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(InputError, match="empty.tsv: the url list is empty"):
        read_url_list(str(tmp_path / "empty.tsv"))
    (tmp_path / "nourl.tsv").write_text("a\tb\nc\td\n")
    with pytest.raises(InputError, match="cannot find a column of http"):
        read_url_list(str(tmp_path / "nourl.tsv"))
    with pytest.raises(InputError, match="no such file"):
        read_url_list(str(tmp_path / "absent.parquet"))


def test_mixed_garbage_each_row_accounted_with_its_reason(tmp_path):
    lines = [
        b"http://x.org/ok.jpg\tfine caption",
        b"\tno url",
        b"ftp://x.org/a.jpg\tftp",
        b"data:image/png;base64,AAAA\tdata url",
        b"http:///nohost.jpg\tno host",
        b"http://x.org/ok.jpg\tsame url again",
        b"http://x.org/empty.jpg\t   ",
        b"http://x.org/bad.jpg\tcaf\xe9 latin-1",
        b"http://x.org/three.jpg\tcap\textra",
        b"just one field",
        b"HTTPS://X.org/upper.jpg\tupper-case scheme is fine",
    ]
    path = tmp_path / "garbage.tsv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    valid, rejected = validate_rows(read_url_list(str(path), fmt="cc12m"))
    assert valid["row"].to_list() == [0, 10]
    assert valid["caption"].to_list() == ["fine caption", "upper-case scheme is fine"]
    reasons = dict(zip(rejected["row"].to_list(), rejected["error_message"].to_list()))
    assert reasons == {
        1: urllist.EMPTY_URL, 2: urllist.BAD_SCHEME, 3: urllist.BAD_SCHEME, 4: urllist.NO_HOST,
        5: urllist.DUPLICATE_URL, 6: urllist.EMPTY_CAPTION, 7: urllist.BAD_UTF8, 8: urllist.BAD_FIELDS,
        9: urllist.BAD_FIELDS,
    }
    assert (rejected["status"] == "failed_to_validate").all()
    assert valid.height + rejected.height == len(lines)


def test_digest_ignores_host_but_not_content():
    a = pl.DataFrame({"row": [0, 1], "url": ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg"],
                      "caption": ["x", "y"]})
    moved = a.with_columns(pl.col("url").str.replace("127.0.0.1:1", "127.0.0.1:2"))
    edited = a.with_columns(pl.Series("caption", ["x", "z"]))
    assert rows_digest(a) == rows_digest(moved) != rows_digest(edited)
