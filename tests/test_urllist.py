import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import urllist
from pipelines.urllist import InputError, read_url_list, rows_digest, validate_rows, validate_url_list


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
    assert rows_digest([a]) == rows_digest([moved]) != rows_digest([edited])
    assert rows_digest([a.head(1), a.tail(1)]) == rows_digest([a])  # batches hash as the whole list


def reference_outputs(path: str, fmt: str, **columns) -> tuple[bytes, bytes, int, str]:
    """The in-memory implementation the streaming one replaced: the whole list read and validated at once."""
    with open(path, "rb") as f:
        data = f.read()
    if fmt == "parquet":
        df = pl.read_parquet(io.BytesIO(data))
    elif fmt == "csv":
        df = pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8-lossy")
    else:
        lines = data.decode("utf-8", errors="replace").removeprefix("\ufeff").split("\n")
        lines = pl.Series([line.removesuffix("\r") for line in (lines[:-1] if lines[-1] == "" else lines)], dtype=pl.String)
        fields = lines.str.split("\t")
        order = {"cc12m": (0, 1), "cc3m": (1, 0)}[fmt]
        df = pl.DataFrame({"url": fields.list.get(order[0], null_on_oob=True),
                           "caption": fields.list.get(order[1], null_on_oob=True), "n_fields": fields.list.len()})
    if fmt in ("csv", "parquet"):
        url, caption, extra = columns.get("url_col", "url"), columns.get("caption_col", "caption"), columns.get("extra_cols", [])
        text = [pl.col(c).map_elements(lambda b: b.decode("utf-8", errors="replace"), return_dtype=pl.String)
                if df.schema[c] == pl.Binary else pl.col(c).cast(pl.String) for c in (url, caption)]
        df = df.select(text[0].alias("url"), text[1].alias("caption"), *extra, pl.lit(2, pl.UInt32).alias("n_fields"))
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    df = df.with_columns(pl.col("url").fill_null("").str.strip_chars(), pl.col("caption").fill_null("").str.strip_chars())
    df = df.with_columns(scheme=pl.col("url").str.extract(urllist.SCHEME, 1).str.to_lowercase().fill_null(""),
                         host=pl.col("url").str.extract(urllist.HOST, 2).fill_null(""),
                         internal=urllist.internal_urls(df["url"]))
    reason = (pl.when(pl.col("n_fields") != 2).then(pl.lit(urllist.BAD_FIELDS))
              .when(pl.col("url") == "").then(pl.lit(urllist.EMPTY_URL))
              .when(~pl.col("scheme").is_in(["http", "https"])).then(pl.lit(urllist.BAD_SCHEME))
              .when(pl.col("host") == "").then(pl.lit(urllist.NO_HOST))
              .when(pl.col("internal")).then(pl.lit(urllist.INTERNAL_HOST))
              .when(pl.col("caption").str.contains("\ufffd", literal=True)).then(pl.lit(urllist.BAD_UTF8))
              .when(pl.col("caption") == "").then(pl.lit(urllist.EMPTY_CAPTION)))
    df = df.with_columns(error_message=reason)
    first = pl.col("error_message").is_null() & pl.col("url").is_first_distinct().over(pl.col("error_message").is_null())
    df = df.with_columns(error_message=pl.when(pl.col("error_message").is_null() & ~first)
                         .then(pl.lit(urllist.DUPLICATE_URL)).otherwise(pl.col("error_message")))
    keep = [c for c in df.columns if c not in ("n_fields", "scheme", "host", "internal", "error_message")]
    valid = df.filter(pl.col("error_message").is_null()).select(keep)
    rejected = df.filter(pl.col("error_message").is_not_null()).select(
        *keep, pl.lit("failed_to_validate").alias("status"), "error_message")
    out = []
    for frame in (valid, rejected):
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        out.append(buffer.getvalue())
    return out[0], out[1], df.height, rows_digest([valid])


def messy_lines(n: int) -> list[bytes]:
    """Duplicates far apart (across batches and partitions), malformed rows, bad UTF-8, empty captions."""
    lines = []
    for i in range(n):
        url = (f"http://x.org/{i % 97}.jpg" if i % 3 == 0 else f"http://x{i % 7}.org/{i}.jpg").encode()
        kind = i % 11
        caption = {0: b"caf\xe9", 1: b"  ", 2: b"fine " + str(i).encode()}.get(kind, f"caption {i}".encode())
        if kind == 3:
            lines.append(url)  # one field
        elif kind == 4:
            lines.append(b"ftp://x.org/" + str(i).encode() + b"\t" + caption)
        elif kind == 5:
            lines.append(b"http://127.0.0.1/a.jpg\t" + caption)
        else:
            lines.append(url + b"\t" + caption)
    return lines


@pytest.mark.parametrize("fmt", ["cc12m", "cc3m", "csv", "parquet"])
def test_streaming_matches_the_in_memory_validation(tmp_path, fmt, monkeypatch):
    lines = messy_lines(600)
    if fmt == "cc12m":
        path = tmp_path / "list.tsv"
        path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines))  # BOM, CRLF, no final newline
    elif fmt == "cc3m":
        path = tmp_path / "list.tsv"
        path.write_bytes(b"\n".join(b"\t".join(line.split(b"\t")[::-1]) for line in lines) + b"\n")
    else:
        pairs = [line.split(b"\t") + [b""] for line in lines]
        table = pa.table({"u": [p[0] for p in pairs], "text": [p[1] for p in pairs], "src": [str(i % 5) for i in range(len(pairs))]})
        path = tmp_path / f"list.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=100)  # caption as binary: bad bytes decoded on read
        else:
            path.write_bytes(b"u,text,src\n" + b"".join(b"%s,%s,%d\n" % (p[0], p[1], i % 5) for i, p in enumerate(pairs)))
    columns = {"url_col": "u", "caption_col": "text", "extra_cols": ["src"]} if fmt in ("csv", "parquet") else {}
    valid, rejected, rows, digest = reference_outputs(str(path), fmt, **columns)
    reasons = set(pl.read_parquet(io.BytesIO(rejected))["error_message"])
    assert {urllist.DUPLICATE_URL, urllist.BAD_UTF8, urllist.EMPTY_CAPTION, urllist.BAD_SCHEME} <= reasons
    blocks = urllist.line_blocks  # a TSV is read in blocks of about 1 KiB: its duplicates fall in other blocks
    monkeypatch.setattr(urllist, "line_blocks", lambda path, block_bytes=1024: blocks(path, min(block_bytes, 1024)))
    for auto in (fmt, "auto"):
        work = tmp_path / f"work-{auto}"
        work.mkdir()
        # small batches and many partitions: duplicates lie in other batches than their first occurrence
        counts = validate_url_list(str(path), str(work), auto if auto == "auto" or fmt in ("csv", "parquet") else fmt,
                                   batch_rows=64, partition_rows=50, **columns)
        assert counts == {"rows": rows, "valid": pl.read_parquet(io.BytesIO(valid)).height,
                          "rejected": rows - pl.read_parquet(io.BytesIO(valid)).height, "digest": digest}
        # the same rows, columns and types (written a batch at a time, so other row groups than one write)
        assert pl.read_parquet(work / "_input.parquet").equals(pl.read_parquet(io.BytesIO(valid)))
        assert pl.read_parquet(work / "_rejected.parquet").equals(pl.read_parquet(io.BytesIO(rejected)))
