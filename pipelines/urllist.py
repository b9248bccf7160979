"""Url lists in, validated rows out: what the shard stage hands to img2dataset's reader.

Formats: CC3M TSV (caption<TAB>url), CC12M TSV (url<TAB>caption), CSV and Parquet with named
columns. Structural problems (empty file, wrong delimiter, missing column) raise `InputError`
naming the file; a bad row never raises: it becomes a rejected row with a reason.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import fsspec
import polars as pl
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

TSV_COLUMNS = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
SNIFF_ROWS = 100
SNIFF_BYTES = 1 << 20
READ_BYTES = 1 << 24  # a TSV is read in blocks of whole lines of about this size
BATCH_ROWS = 1 << 18  # rows of a CSV or Parquet list read and validated at a time
PARTITION_ROWS = 1 << 18  # rows of one spill file of the duplicate search: bounds its memory (as BATCH_ROWS bounds the reading)
SCHEME = r"^([A-Za-z][A-Za-z0-9+.-]*):"
HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*@)?([^/?#:]*)"  # RFC 3986 authority, userinfo skipped
AUTHORITY = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*"
AUTHORITY_GROUP = r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)"

# Stable reason strings: the summary counts failures by them.
EMPTY_URL = "empty url"
BAD_SCHEME = "unsupported url scheme"
NO_HOST = "malformed url (no host)"
INTERNAL_HOST = "url host is loopback, private, link-local or localhost"
DUPLICATE_URL = "duplicate url"
EMPTY_CAPTION = "empty caption"
BAD_UTF8 = "caption is not valid UTF-8"
BAD_FIELDS = "malformed row (expected 2 tab-separated fields)"
REASONS = {EMPTY_URL, BAD_SCHEME, NO_HOST, INTERNAL_HOST, DUPLICATE_URL, EMPTY_CAPTION, BAD_UTF8, BAD_FIELDS}


class InputError(ValueError):
    """A url list that cannot be read as asked; the message names the file and what is wrong."""


def validate_url_list(path: str, workdir: str, fmt: str = "auto", url_col: str = "url", caption_col: str = "caption",
                      extra_cols: list[str] = (), allow_private: bool = False, batch_rows: int = BATCH_ROWS,
                      partition_rows: int = PARTITION_ROWS) -> dict:
    """Read and validate a url list a batch at a time into workdir's _input.parquet (valid rows) and
    _rejected.parquet (a reason per row); returns their counts and rows_digest of the valid rows.

    Memory holds one batch, or one partition of the duplicate search, at a time: the checked rows go
    to disk as they are read, then the otherwise valid ones are split by a hash of their url into
    spill files of about `partition_rows` rows, in each of which a url's first row is kept.
    """
    checked = os.path.join(workdir, "checked.parquet")
    rows, writer = 0, None
    try:
        for batch in url_batches(path, fmt, url_col, caption_col, list(extra_cols), batch_rows, workdir):
            batch = check_rows(with_row(batch, rows), allow_private).to_arrow()
            writer = writer or pq.ParquetWriter(checked, batch.schema)
            writer.write_table(batch)
            rows += batch.num_rows
    finally:
        if writer:
            writer.close()
    if rows == 0:
        raise InputError(f"{path}: the url list is empty")
    duplicates = duplicate_rows_on_disk(checked, math.ceil(rows / partition_rows), workdir, batch_rows)
    writers: dict[str, pq.ParquetWriter] = {}
    valid_rows = 0

    def valid_batches() -> Iterator[pl.DataFrame]:  # each batch split and written, its valid rows to the digest
        nonlocal valid_rows
        for batch in pq.ParquetFile(checked).iter_batches(batch_rows, use_threads=False):
            valid, rejected = split_rows(mark_duplicates(pl.from_arrow(batch), duplicates))
            for name, df in (("_input.parquet", valid), ("_rejected.parquet", rejected)):
                table = df.to_arrow()
                if name not in writers:
                    writers[name] = pq.ParquetWriter(os.path.join(workdir, name), table.schema)
                if df.height:
                    writers[name].write_table(table)
            valid_rows += valid.height
            yield valid

    try:
        digest = rows_digest(valid_batches())
    finally:
        for writer in writers.values():
            writer.close()
    os.remove(checked)
    return {"rows": rows, "valid": valid_rows, "rejected": rows - valid_rows, "digest": digest}


def read_url_list(path: str, fmt: str = "auto", url_col: str = "url", caption_col: str = "caption",
                  extra_cols: list[str] = ()) -> pl.DataFrame:
    """A whole url list in memory (small lists): columns row, url, caption, *extra_cols (all strings but row), n_fields."""
    with tempfile.TemporaryDirectory() as workdir:
        frames = list(url_batches(path, fmt, url_col, caption_col, list(extra_cols), BATCH_ROWS, workdir))
    df = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    if df.height == 0:
        raise InputError(f"{path}: the url list is empty")
    return with_row(df, 0)


def with_row(df: pl.DataFrame, offset: int) -> pl.DataFrame:
    return df.with_row_index("row", offset=offset).with_columns(pl.col("row").cast(pl.Int64))


def url_batches(path: str, fmt: str, url_col: str, caption_col: str, extra_cols: list[str], batch_rows: int,
                workdir: str) -> Iterator[pl.DataFrame]:
    """The list as frames of columns url, caption, *extra_cols, n_fields, in file order."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in TSV_COLUMNS:
        if extra_cols:
            raise InputError(f"{path}: a {fmt} TSV has no named columns, so input.extra_cols cannot be used")
        yield from tsv_batches(path, TSV_COLUMNS[fmt])
    else:
        yield from table_batches(path, fmt, url_col, caption_col, extra_cols, batch_rows, workdir)


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    head = next(line_blocks(path, SNIFF_BYTES), pl.Series(dtype=pl.String)).head(SNIFF_ROWS).to_list()
    lines = [line.split("\t") for line in head if line.strip()]
    if not lines:
        raise InputError(f"{path}: the url list is empty")
    looks_like_url = [sum(is_url_like(f[i]) for f in lines if len(f) > i) for i in (0, 1)]
    if max(looks_like_url) == 0:
        raise InputError(f"{path}: cannot find a column of http(s) urls in the first {len(lines)} rows "
                         "(tab-separated); set input.format to cc3m, cc12m, csv or parquet")
    return "cc12m" if looks_like_url[0] >= looks_like_url[1] else "cc3m"


def is_url_like(field: str) -> bool:
    return field.strip().lower().startswith(("http://", "https://"))


def line_blocks(path: str, block_bytes: int = READ_BYTES) -> Iterator[pl.Series]:
    """The file's lines, a block of whole lines at a time.

    Decoding with replacement keeps every row: a bad byte becomes U+FFFD, which validation reports.
    A block ends at a newline, which no multi-byte character contains, so it decodes as the whole file would.
    """
    try:
        f = fsspec.open(path, "rb", compression="infer").open()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    with f:
        rest, first = b"", True
        while data := f.read(block_bytes):
            data = rest + data
            if first:
                data, first = data.removeprefix(b"\xef\xbb\xbf"), False  # a BOM is not data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1:]
            yield lines_of(data[:cut])
        if rest:
            yield lines_of(rest)


def lines_of(data: bytes) -> pl.Series:
    text = pl.Series("line", data.decode("utf-8", errors="replace").split("\n"), dtype=pl.String)
    return text.str.strip_suffix("\r")


def tsv_batches(path: str, columns: tuple[str, str]) -> Iterator[pl.DataFrame]:
    n_lines, any_tab = 0, False
    for lines in line_blocks(path):
        n_lines += len(lines)
        any_tab = any_tab or bool(lines.str.contains("\t", literal=True).any())
        fields = lines.str.split("\t")
        yield pl.DataFrame({
            columns[0]: fields.list.get(0, null_on_oob=True),
            columns[1]: fields.list.get(1, null_on_oob=True),
            "n_fields": fields.list.len(),
        }).select("url", "caption", "n_fields")
    if n_lines and not any_tab:
        raise InputError(f"{path}: no tab in any of its {n_lines} rows, but this format is "
                         f"{columns[0]}<TAB>{columns[1]}; for a comma-separated file set input.format: csv")


def table_batches(path: str, fmt: str, url_col: str, caption_col: str, extra_cols: list[str], batch_rows: int,
                  workdir: str) -> Iterator[pl.DataFrame]:
    wanted = [url_col, caption_col, *extra_cols]
    try:
        schema, batches = open_table(path, fmt, batch_rows, workdir)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as err:  # polars/pyarrow errors are long; keep the first line
        raise InputError(f"{path}: cannot read as {fmt}: {str(err).splitlines()[0]}") from None
    missing = [c for c in wanted if c not in schema]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the file has {list(schema)} "
                         "(set input.url_col / input.caption_col)")
    reserved = {"row", "key", "status", "error_message", "width", "height", "n_fields"} & set(extra_cols)
    if reserved:
        raise InputError(f"input.extra_cols: {sorted(reserved)} are reserved column names")
    for name in (url_col, caption_col):
        if not (schema[name] in (pl.String, pl.Binary, pl.Categorical) or schema[name].is_numeric()):
            raise InputError(f"{path}: column {name!r} holds {schema[name]}, not text")
    batches = batches(wanted)
    while True:
        try:
            df = next(batches)
        except StopIteration:
            return
        except Exception as err:
            raise InputError(f"{path}: cannot read as {fmt}: {str(err).splitlines()[0]}") from None
        yield df.select(as_text(df, url_col).alias("url"), as_text(df, caption_col).alias("caption"),
                        *[pl.col(c) for c in extra_cols], pl.lit(2, pl.UInt32).alias("n_fields"))


def open_table(path: str, fmt: str, batch_rows: int, workdir: str):
    """A table's schema and a function of the wanted columns giving an iterator over its batches."""
    if fmt == "parquet":
        f = fsspec.open(path, "rb", compression="infer").open()
        source = pq.ParquetFile(f)
        schema = pl.from_arrow(source.schema_arrow.empty_table()).schema
        return schema, lambda columns: (pl.from_arrow(b) for b in source.iter_batches(batch_rows, columns=columns,
                                                                                        use_threads=False))
    fs, local = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem) or path.lower().endswith(".gz"):  # polars scans a plain local file
        with fsspec.open(path, "rb", compression="infer") as src, open(os.path.join(workdir, "list.csv"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        local = os.path.join(workdir, "list.csv")
    scan = pl.scan_csv(local, infer_schema=False, encoding="utf8-lossy")
    return scan.collect_schema(), lambda columns: iter(scan.select(columns).collect_batches(chunk_size=batch_rows))


def as_text(df: pl.DataFrame, name: str) -> pl.Expr:
    """A column as strings; binary is decoded as the TSV is (bad bytes become U+FFFD, which validation reports)."""
    if df.schema[name] != pl.Binary:
        return pl.col(name).cast(pl.String)
    return pl.col(name).map_elements(lambda b: b.decode("utf-8", errors="replace"), return_dtype=pl.String)


def validate_rows(df: pl.DataFrame, allow_private: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split rows held in memory into (valid, rejected); validate_url_list does the same on disk."""
    df = check_rows(df, allow_private)
    valid, rejected = split_rows(mark_duplicates(df, duplicate_rows(df)))
    return valid, rejected


def check_rows(df: pl.DataFrame, allow_private: bool = False) -> pl.DataFrame:
    """The rows (stripped) with an error_message for what is wrong with a row on its own, null when nothing is.

    Unless `allow_private`, a url whose host is a loopback, private, link-local (cloud metadata)
    address or localhost is rejected: url lists are untrusted and must not reach internal services.
    """
    url = pl.col("url").fill_null("").str.strip_chars()
    caption = pl.col("caption").fill_null("").str.strip_chars()
    df = df.with_columns(url.alias("url"), caption.alias("caption"))
    df = df.with_columns(scheme=pl.col("url").str.extract(SCHEME, 1).str.to_lowercase().fill_null(""),
                         host=pl.col("url").str.extract(HOST, 2).fill_null(""),
                         internal=pl.lit(False) if allow_private else internal_urls(df["url"]))
    reason = (
        pl.when(pl.col("n_fields") != 2).then(pl.lit(BAD_FIELDS))
        .when(pl.col("url") == "").then(pl.lit(EMPTY_URL))
        .when(~pl.col("scheme").is_in(["http", "https"])).then(pl.lit(BAD_SCHEME))
        .when(pl.col("host") == "").then(pl.lit(NO_HOST))
        .when(pl.col("internal")).then(pl.lit(INTERNAL_HOST))
        .when(pl.col("caption").str.contains("\ufffd", literal=True)).then(pl.lit(BAD_UTF8))
        .when(pl.col("caption") == "").then(pl.lit(EMPTY_CAPTION))
    )
    return df.with_columns(error_message=reason).drop("n_fields", "scheme", "host", "internal")


def duplicate_rows(df: pl.DataFrame) -> pl.Series:
    """Among otherwise valid rows the first occurrence of a url wins; the rows of the later ones."""
    return df.filter(pl.col("error_message").is_null()).filter(~pl.col("url").is_first_distinct())["row"]


def duplicate_rows_on_disk(checked: str, n_parts: int, workdir: str, batch_rows: int) -> pl.Series:
    """duplicate_rows of a checked list on disk: its otherwise valid (row, url) pairs split by a hash of
    the url into n_parts spill files (a url's rows all in one, in row order), one read at a time."""
    paths = [os.path.join(workdir, f"part-{i}.parquet") for i in range(n_parts)]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in pq.ParquetFile(checked).iter_batches(batch_rows, columns=["row", "url", "error_message"],
                                                          use_threads=False):
            df = pl.from_arrow(batch).filter(pl.col("error_message").is_null())
            df = df.select("row", "url", part=(pl.col("url").hash() % n_parts).cast(pl.Int64))
            for (part,), group in df.partition_by("part", as_dict=True, include_key=False).items():
                table = group.to_arrow()
                if part not in writers:
                    writers[part] = pq.ParquetWriter(paths[part], table.schema)
                writers[part].write_table(table)
    finally:
        for writer in writers.values():
            writer.close()
    found = []
    for part in sorted(writers):
        found.append(duplicate_rows(pl.read_parquet(paths[part]).with_columns(error_message=pl.lit(None, pl.String))))
        os.remove(paths[part])
    return pl.concat(found).sort() if found else pl.Series("row", [], pl.Int64)


def mark_duplicates(df, rows: pl.Series):
    """A DataFrame or LazyFrame of checked rows with the given rows rejected as duplicates."""
    duplicate = pl.col("error_message").is_null() & pl.col("row").is_in(rows.implode())
    return df.with_columns(error_message=pl.when(duplicate).then(pl.lit(DUPLICATE_URL)).otherwise("error_message"))


def split_rows(df):
    """(valid, rejected) of a DataFrame or LazyFrame of checked rows; a rejected row keeps its data."""
    valid = df.filter(pl.col("error_message").is_null()).drop("error_message")
    rejected = df.filter(pl.col("error_message").is_not_null()).select(
        pl.exclude("error_message"), pl.lit("failed_to_validate").alias("status"), "error_message")
    return valid, rejected


def internal_urls(urls: pl.Series) -> pl.Series:
    """Whether each url's host is internal (internal_host); Python runs once per distinct authority."""
    authority = urls.str.extract(AUTHORITY_GROUP, 1).fill_null("")
    flags = {a: authority_is_internal(a) for a in authority.unique().to_list()}
    return authority.replace_strict(flags, return_dtype=pl.Boolean)


def authority_is_internal(authority: str) -> bool:
    try:
        host = urlsplit("//" + authority).hostname  # drops userinfo and port, unbrackets IPv6, lower-cases
    except ValueError:  # e.g. an unclosed "[": the download fails and says so
        return False
    return bool(host) and internal_host(host)


def internal_ip(address: str) -> bool:
    """True for anything but a global unicast address (loopback, private, link-local, CGNAT, reserved, ...)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone (fe80::1%eth0) does not matter here
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 (Python < 3.13 does not look through it)
    return not ip.is_global or ip.is_multicast


def internal_host(host: str) -> bool:
    """The literal check of a url's host (as urlsplit gives it: no brackets, no port, lower case)."""
    host = host.strip().rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return internal_ip(host)
    except ValueError:
        pass
    # The shorthand IPv4 forms the resolver accepts (127.1, 2130706433, 0x7f.0.0.1) are literals too.
    if host and all(c in "0123456789abcdefx." for c in host):
        try:
            return internal_ip(socket.inet_ntoa(socket.inet_aton(host)))
        except OSError:
            return False
    return False


def rows_digest(frames: Iterable[pl.DataFrame]) -> str:
    """Identity of a validated list for resuming: rows, captions and url paths (frames in row order).

    The url's host is left out so a re-served demo world (a new loopback port) still resumes.
    """
    digest, separator = hashlib.sha256(), ""
    for df in frames:
        lines = df.select(pl.concat_str(pl.col("row").cast(pl.String), pl.col("url").str.replace(AUTHORITY, ""),
                                        "caption", separator="\t")).to_series().to_list()
        if lines:
            digest.update((separator + "\n".join(lines)).encode())
            separator = "\n"
    return digest.hexdigest()
