"""Url lists in, validated rows out: what the shard stage hands to img2dataset's reader.

Formats: CC3M TSV (caption<TAB>url), CC12M TSV (url<TAB>caption), CSV and Parquet with named
columns. Structural problems (empty file, wrong delimiter, missing column) raise `InputError`
naming the file; a bad row never raises: it becomes a rejected row with a reason.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from urllib.parse import urlsplit

import fsspec
import polars as pl

TSV_COLUMNS = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
SNIFF_ROWS = 100
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


def read_url_list(path: str, fmt: str = "auto", url_col: str = "url", caption_col: str = "caption",
                  extra_cols: list[str] = ()) -> pl.DataFrame:
    """Read any supported url list into columns row, url, caption, *extra_cols (all strings but row)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in TSV_COLUMNS:
        if extra_cols:
            raise InputError(f"{path}: a {fmt} TSV has no named columns, so input.extra_cols cannot be used")
        df = read_tsv(path, TSV_COLUMNS[fmt])
    else:
        df = read_table(path, fmt, url_col, caption_col, list(extra_cols))
    if df.height == 0:
        raise InputError(f"{path}: the url list is empty")
    return df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    lines = [line.split("\t") for line in read_lines(path)[:SNIFF_ROWS] if line.strip()]
    if not lines:
        raise InputError(f"{path}: the url list is empty")
    looks_like_url = [sum(is_url_like(f[i]) for f in lines if len(f) > i) for i in (0, 1)]
    if max(looks_like_url) == 0:
        raise InputError(f"{path}: cannot find a column of http(s) urls in the first {len(lines)} rows "
                         "(tab-separated); set input.format to cc3m, cc12m, csv or parquet")
    return "cc12m" if looks_like_url[0] >= looks_like_url[1] else "cc3m"


def is_url_like(field: str) -> bool:
    return field.strip().lower().startswith(("http://", "https://"))


def read_lines(path: str) -> list[str]:
    # Decoding with replacement keeps every row: a bad byte becomes U+FFFD, which validation reports.
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            text = f.read().decode("utf-8", errors="replace").removeprefix("\ufeff")  # a BOM is not data
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_tsv(path: str, columns: tuple[str, str]) -> pl.DataFrame:
    lines = pl.Series("line", read_lines(path), dtype=pl.String)
    if len(lines) and not lines.str.contains("\t", literal=True).any():
        raise InputError(f"{path}: no tab in any of its {len(lines)} rows, but this format is "
                         f"{columns[0]}<TAB>{columns[1]}; for a comma-separated file set input.format: csv")
    fields = lines.str.split("\t")
    return pl.DataFrame({
        columns[0]: fields.list.get(0, null_on_oob=True),
        columns[1]: fields.list.get(1, null_on_oob=True),
        "n_fields": fields.list.len(),
    }).select("url", "caption", "n_fields")


def read_table(path: str, fmt: str, url_col: str, caption_col: str, extra_cols: list[str]) -> pl.DataFrame:
    wanted = [url_col, caption_col, *extra_cols]
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                df = pl.read_parquet(f)
            else:
                df = pl.read_csv(f, infer_schema=False, encoding="utf8-lossy")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as err:  # polars/pyarrow errors are long; keep the first line
        raise InputError(f"{path}: cannot read as {fmt}: {str(err).splitlines()[0]}") from None
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the file has {df.columns} "
                         "(set input.url_col / input.caption_col)")
    reserved = {"row", "key", "status", "error_message", "width", "height", "n_fields"} & set(extra_cols)
    if reserved:
        raise InputError(f"input.extra_cols: {sorted(reserved)} are reserved column names")
    for name in (url_col, caption_col):
        if not (df.schema[name] in (pl.String, pl.Binary, pl.Categorical) or df.schema[name].is_numeric()):
            raise InputError(f"{path}: column {name!r} holds {df.schema[name]}, not text")
    return df.select(as_text(df, url_col).alias("url"), as_text(df, caption_col).alias("caption"),
                     *[pl.col(c) for c in extra_cols],
                     pl.lit(2, pl.UInt32).alias("n_fields"))


def as_text(df: pl.DataFrame, name: str) -> pl.Expr:
    """A column as strings; binary is decoded as the TSV is (bad bytes become U+FFFD, which validation reports)."""
    if df.schema[name] != pl.Binary:
        return pl.col(name).cast(pl.String)
    return pl.col(name).map_elements(lambda b: b.decode("utf-8", errors="replace"), return_dtype=pl.String)


def validate_rows(df: pl.DataFrame, allow_private: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split rows into (valid, rejected). Rejected rows keep their data plus an error_message.

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
    df = df.with_columns(error_message=reason)
    # Among otherwise valid rows the first occurrence of a url wins; later ones are duplicates.
    first = pl.col("error_message").is_null() & pl.col("url").is_first_distinct().over(pl.col("error_message").is_null())
    df = df.with_columns(error_message=pl.when(pl.col("error_message").is_null() & ~first)
                         .then(pl.lit(DUPLICATE_URL)).otherwise(pl.col("error_message")))
    keep = [c for c in df.columns if c not in ("n_fields", "scheme", "host", "internal", "error_message")]
    valid = df.filter(pl.col("error_message").is_null()).select(keep)
    rejected = df.filter(pl.col("error_message").is_not_null()).select(
        *keep, pl.lit("failed_to_validate").alias("status"), "error_message")
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


def rows_digest(df: pl.DataFrame) -> str:
    """Identity of a validated list for resuming: rows, captions and url paths.

    The url's host is left out so a re-served demo world (a new loopback port) still resumes.
    """
    lines = df.select(pl.concat_str(pl.col("row").cast(pl.String), pl.col("url").str.replace(AUTHORITY, ""),
                                    "caption", separator="\t"))
    return hashlib.sha256("\n".join(lines.to_series().to_list()).encode()).hexdigest()
