"""Bad inputs, one test per class, over every format the class applies to: each bad row is either an error that
names the file and line (column, key) or a counted skip in the corpus's row accounting, and a run's end carries
that accounting (``RunResult.rows``, ``metrics.json``, ``report.md``, the CLI's last line)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.train.conftest import tiny_config
from xling.train.config import load_config
from xling.train.data import (
    DataError,
    ParallelCorpus,
    RowAccounting,
    TarShardCorpus,
    load_corpus,
    load_rows,
    make_dataloader,
)
from xling.train.data.corpus import FIELD_LIMIT
from xling.train.data.errors import BadRow
from xling.train.recipes import run_recipe

Value = str | bytes
TABLES = ("jsonl", "csv", "tsv", "parquet")
FORMATS = (*TABLES, "tar")


def _png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], *, cut: int | None = None) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data[:cut] if cut is not None else data)
    return path


def _quoted(value: Value) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode()
    return b'"' + raw.replace(b'"', b'""') + b'"'


def write_corpus(folder: Path, fmt: str, rows: list[dict[str, Value]], *, bom: bool = False) -> Path:
    """Write ``rows`` (``en``, ``zh``, optionally ``image`` as PNG bytes) as one file of ``fmt``; ``bytes``
    caption values go in raw (e.g. invalid UTF-8), ``bom`` starts the file (table text formats) or every
    caption (Parquet, tar) with a UTF-8 byte-order mark."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "tar":
        members = []
        for i, row in enumerate(rows):
            for column, value in row.items():
                raw = value if isinstance(value, bytes) else (("\ufeff" if bom else "") + value).encode()
                members.append((f"{i:04d}.png" if column == "image" else f"{i:04d}.{column}.txt", raw))
        return _tar(folder / "shard-000000.tar", members)
    rows = [dict(row) for row in rows]
    for i, row in enumerate(rows):
        if "image" in row and fmt != "parquet":
            (folder / f"{i}.png").write_bytes(row["image"])  # type: ignore[arg-type]
            row["image"] = f"{i}.png"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = folder / f"pairs.{fmt}"
    if fmt == "parquet":
        table = {
            c: [("\ufeff" + r[c] if bom and c != "image" else r[c]) if c in r else None for r in rows]
            for c in columns
        }
        pq.write_table(pa.table(table), path)
        return path
    if fmt == "jsonl":
        lines = [
            b"{"
            + b", ".join(
                json.dumps(k).encode()
                + b": "
                + (b'"' + v + b'"' if isinstance(v, bytes) else json.dumps(v, ensure_ascii=False).encode())
                for k, v in row.items()
            )
            + b"}"
            for row in rows
        ]
    else:
        sep = b"," if fmt == "csv" else b"\t"
        lines = [sep.join(c.encode() for c in columns)] + [
            sep.join(_quoted(row.get(c, "")) for c in columns) for row in rows
        ]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    return path


def read_all(path: Path, **kwargs: Any) -> tuple[list[dict[str, Any]], RowAccounting]:
    """Every item of the corpus at ``path`` (streamed for tar shards) and its accounting."""
    corpus = load_corpus(path, **kwargs)
    items = list(corpus) if isinstance(corpus, TarShardCorpus) else [corpus[i] for i in range(len(corpus))]
    return items, corpus.accounting()


def where(fmt: str, path: Path, i: int) -> str:
    """The short location of row ``i`` (0-based) of a file written by :func:`write_corpus`."""
    if fmt == "tar":
        return f"{path.name}:{i:04d}"
    return f"{path.name}:{i + (2 if fmt in ('csv', 'tsv') else 1)}"


PAIRS = [(f"a shape number {i}", f"第{i}个形状") for i in range(6)]


def _rows(n: int = 6) -> list[dict[str, Value]]:
    return [{"en": en, "zh": zh} for en, zh in PAIRS[:n]]


def _reason_at(acc: RowAccounting, reason: str) -> list[str]:
    return [row.location(short=True) for row in acc.skipped.examples.get(reason, [])]


# ---- encodings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_byte_order_mark_is_stripped(tmp_path: Path, fmt: str) -> None:
    path = write_corpus(tmp_path, fmt, _rows(), bom=True)
    items, acc = read_all(path)
    assert (acc.read, acc.used, acc.skipped.total) == (6, 6, 0)
    assert [(item["en"], item["target"]) for item in items] == PAIRS


@pytest.mark.parametrize("fmt", ("jsonl", "csv", "tsv", "tar"))
def test_invalid_utf8_costs_its_row_only(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    rows[2]["zh"] = "第2个".encode() + b"\xff\xfe"
    path = write_corpus(tmp_path, fmt, rows)
    _, acc = read_all(path)
    assert (acc.read, acc.used, dict(acc.skipped.counts)) == (6, 5, {"bad_utf8": 1})
    assert _reason_at(acc, "bad_utf8")[0].startswith(where(fmt, path, 2))
    assert "0xff" in acc.skipped.examples["bad_utf8"][0].detail
    with pytest.raises(
        DataError, match=rf"{path.name}:{where(fmt, path, 2).split(':')[1]}\S*: bad_utf8: .*0xff"
    ):
        read_all(path, on_bad_row="fail")


@pytest.mark.parametrize("fmt", FORMATS)
def test_control_characters_skip_the_row(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    rows[1]["zh"] = "第1\x00个"
    rows[4]["en"] = "bell\x07"
    rows[3]["en"] = "tabs\tand spaces are fine"
    path = write_corpus(tmp_path, fmt, rows)
    items, acc = read_all(path)
    assert (acc.used, dict(acc.skipped.counts)) == (4, {"control_characters": 2})
    found = _reason_at(acc, "control_characters")
    assert found[0].startswith(where(fmt, path, 1)) and found[1].startswith(where(fmt, path, 4))
    assert "U+0000" in acc.skipped.examples["control_characters"][0].detail
    assert any(item["en"] == "tabs\tand spaces are fine" for item in items)


# ---- CSV ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ("csv", "tsv"))
def test_long_fields_are_read_and_over_long_ones_skipped(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    rows[1]["en"] = "x" * 200_000  # over csv's default limit of 131,072: read, not a crash
    rows[3]["en"] = "y" * (FIELD_LIMIT + 10)
    path = write_corpus(tmp_path, fmt, rows)
    items, acc = read_all(path)
    assert (acc.read, acc.used, dict(acc.skipped.counts)) == (6, 5, {"field_too_long": 1})
    assert _reason_at(acc, "field_too_long") == [where(fmt, path, 3)]
    assert len(items[1]["en"]) == 200_000


@pytest.mark.parametrize("fmt", ("csv", "tsv"))
@pytest.mark.parametrize("closes_later", [False, True])
def test_an_unclosed_quote_costs_its_row_only(tmp_path: Path, fmt: str, closes_later: bool) -> None:
    sep = "," if fmt == "csv" else "\t"
    lines = ["en" + sep + "zh"] + [f"row {i}{sep}第{i}行" for i in range(100)]
    lines[3] = f'row 2{sep}"第2行 never closes'
    if closes_later:
        lines[50] = (
            f'"row 49"{sep}第49行'  # a later quote "closes" it: csv would glue lines 4-51 into a field
        )
    path = tmp_path / f"pairs.{fmt}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items, acc = read_all(path)
    assert (acc.read, acc.used, dict(acc.skipped.counts)) == (100, 99, {"unclosed_quote": 1})
    assert _reason_at(acc, "unclosed_quote") == [f"{path.name}:4"]
    assert "line 4" in acc.skipped.examples["unclosed_quote"][0].detail
    assert items[-1]["target"] == "第99行" and len({item["target"] for item in items}) == 99


# ---- tar shards -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["tar header", "tar data", "gzip stream"])
def test_a_cut_shard_keeps_every_complete_sample(tmp_path: Path, cut: str) -> None:
    rng = np.random.default_rng(0)  # incompressible captions: a cut gzip stream ends inside the samples
    members = [
        (f"{i:04d}.{lang}.txt", rng.integers(97, 123, 300, dtype=np.uint8).tobytes())
        for i in range(8)
        for lang in ("en", "zh")
    ]
    if cut == "gzip stream":
        path = _tar(tmp_path / "cut.tar.gz", members)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        # Each member is one 512-byte header and 512 bytes of data: sample 5's zh member starts at 5 * 2048 + 1024.
        path = _tar(
            tmp_path / "cut.tar", members, cut=5 * 2048 + 1024 + (100 if cut == "tar header" else 700)
        )
    corpus = TarShardCorpus([path])
    items = list(corpus)
    acc = corpus.accounting()
    n = len(items)
    assert [item["key"] for item in items] == [f"{path.name}/{i:04d}" for i in range(n)]
    assert (acc.read, acc.used, dict(acc.skipped.counts)) == (n + 1, n, {"truncated_shard": 1})
    assert _reason_at(acc, "truncated_shard") == [f"{path.name}:{n:04d}"]
    if cut != "gzip stream":
        assert n == 5  # samples 0-4 are complete; 5 is the cut one


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_skips_reach_the_accounting_once(tmp_path: Path, num_workers: int) -> None:
    def shard(name: str, bad: int) -> Path:
        members = []
        for i in range(6):
            members += [
                (f"{i:04d}.en.txt", f"e{i}".encode()),
                (f"{i:04d}.zh.txt", b" " if i < bad else "中".encode()),
            ]
        return _tar(tmp_path / name, members)

    corpus = TarShardCorpus([shard("a.tar", 1), shard("b.tar", 2)])
    loader = make_dataloader(corpus, batch_size=2, seed=0, num_workers=num_workers)
    for epoch in range(2):  # a second epoch reads the shards again: still counted once
        corpus.set_epoch(epoch)
        assert sum(len(batch) for batch in loader) == 8
    acc = corpus.accounting()
    assert (acc.read, acc.used, dict(acc.skipped.counts)) == (12, 9, {"empty_caption": 3})
    assert _reason_at(acc, "empty_caption") == ["a.tar:0000.zh.txt", "b.tar:0000.zh.txt", "b.tar:0001.zh.txt"]


# ---- messages: empty files and wrong columns -------------------------------------------------------------------


def _zero_rows_parquet(path: Path) -> None:
    pq.write_table(pa.table({"en": pa.array([], pa.string()), "zh": pa.array([], pa.string())}), path)


def _cut_parquet(path: Path) -> None:
    pq.write_table(pa.table({"en": ["a"] * 50, "zh": ["甲"] * 50}), path)
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("pairs.jsonl", lambda p: p.write_bytes(b""), r"pairs\.jsonl is empty \(0 bytes\)"),
        ("pairs.jsonl", lambda p: p.write_text("\n  \n"), r"pairs\.jsonl holds no JSON line"),
        ("pairs.csv", lambda p: p.write_bytes(b""), r"pairs\.csv is empty \(0 bytes\)"),
        (
            "pairs.tsv",
            lambda p: p.write_text("en\tzh\n"),
            r"pairs\.tsv has a header row \(en, zh\) but no data rows",
        ),
        (
            "pairs.parquet",
            lambda p: p.write_bytes(b""),
            r"pairs\.parquet is not a readable Parquet file \(0 bytes",
        ),
        ("pairs.parquet", _cut_parquet, r"pairs\.parquet is not a readable Parquet file .*cut short"),
        ("pairs.parquet", _zero_rows_parquet, r"pairs\.parquet has no rows \(columns: en, zh\)"),
        (
            "only.json",
            lambda p: p.write_text('{"en": "a", "zh": "甲"}\n'),
            r"no corpus files .* holds only\.json; a \.json",
        ),
    ],
)
def test_an_empty_or_unreadable_file_is_named(tmp_path: Path, name: str, make: Any, message: str) -> None:
    make(tmp_path / name)
    target = tmp_path if name.endswith(".json") else tmp_path / name  # a folder with only a .json file
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_corpus(target)


def test_an_empty_shard_is_named(tmp_path: Path) -> None:
    empty = _tar(tmp_path / "empty.tar", [])
    with pytest.raises(
        ValueError, match=r"no sample in .*empty\.tar: the tar shard\(s\) hold no file member"
    ):
        list(TarShardCorpus([empty]))
    full = _tar(tmp_path / "full.tar", [("0000.en.txt", b"a"), ("0000.zh.txt", "甲".encode())])
    corpus = TarShardCorpus([empty, full])
    assert len(list(corpus)) == 1 and corpus.accounting().empty_files == [str(empty)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_wrong_column_name_names_file_column_and_the_closest(tmp_path: Path, fmt: str) -> None:
    path = write_corpus(tmp_path, fmt, _rows())
    config = load_config("align", {"data.path": str(path), "data.zh_column": "zhh"})
    if fmt == "tar":
        rows, _ = load_rows(config, resolution=None, with_images=False)
        with pytest.raises(
            ValueError, match=r"no usable sample in .*shard-000000\.tar: .*'zhh'.*did you mean 'zh'"
        ):
            list(rows)
        return
    with pytest.raises(
        ValueError,
        match=rf"{path.name} has no column 'zhh' \(data\.zh_column\).*'en', 'zh'.*did you mean 'zh'",
    ):
        load_rows(config, resolution=None, with_images=False)


# ---- images ---------------------------------------------------------------------------------------------------


def _gray16(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ("jsonl", "parquet", "tar"))  # a path, image bytes, a tar member
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    rows = [{"en": en, "zh": zh, "image": _gray16(v)} for (en, zh), v in zip(PAIRS, (0, 32896, 65535))]
    items, acc = read_all(write_corpus(tmp_path, fmt, rows), resolution=8)
    means = [float(item["image"].mean()) for item in items]  # [-1, 1]
    assert acc.used == 3 and means[0] == pytest.approx(-1.0) and means[2] == pytest.approx(1.0)
    assert means[1] == pytest.approx(128 / 127.5 - 1, abs=0.01)  # mid-gray, not white


@pytest.mark.parametrize("fmt", ("jsonl", "csv", "parquet", "tar"))
def test_images_below_the_minimum_side_are_skipped(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"en": en, "zh": zh, "image": _png((1, 1) if i == 1 else (40, 24))}
        for i, (en, zh) in enumerate(PAIRS)
    ]
    path = write_corpus(tmp_path, fmt, rows)
    _, acc = read_all(path, resolution=32)  # default minimum: 32 // 8 = 4 pixels
    assert (acc.used, dict(acc.skipped.counts)) == (5, {"image_too_small": 1})
    assert _reason_at(acc, "image_too_small")[0].startswith(where(fmt, path, 1))
    assert "1x1 pixels" in acc.skipped.examples["image_too_small"][0].detail
    _, kept = read_all(path, resolution=32, min_image_size=0)
    assert kept.used == 6


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_duplicates_are_kept_and_counted(tmp_path: Path, fmt: str) -> None:
    red, blue = _png(color=(255, 0, 0)), _png(color=(0, 0, 255))
    rows = [{"en": "a", "zh": "甲", "image": red}, {"en": "a", "zh": "甲", "image": blue}]
    rows += [{"en": "a", "zh": "甲", "image": red}, {"en": "b", "zh": "乙", "image": red}]
    path = write_corpus(tmp_path, fmt, rows)
    if fmt != "parquet" and fmt != "tar":  # a path corpus compares paths: point row 2 at row 0's image
        path.write_text(path.read_text(encoding="utf-8").replace("2.png", "0.png"), encoding="utf-8")
    items, acc = read_all(path, resolution=8)
    assert len(items) == 4 and (acc.used, acc.duplicates) == (4, 1)
    assert where(fmt, path, 2) in acc.duplicate_examples[0]
    assert "duplicates" in acc.to_dict() and "1 exact duplicate kept" in acc.summary()


# ---- the accounting at the end of a run ------------------------------------------------------------------------


def test_row_accounting_summary_dict_and_merge() -> None:
    one, two = RowAccounting(), RowAccounting()
    for line in (17, 20):
        one.skip(BadRow("data/a.jsonl", line, "bad_utf8", "invalid UTF-8"))
    one.use()
    two.skip(BadRow("b.tar", None, "missing_image", "no image member", member="0003"))
    two.use(duplicate_at="b.tar:0004 (as :0001)")
    total = RowAccounting.merged([one, two])
    assert total.summary() == (
        "rows: 5 read, 2 used, 3 skipped (bad_utf8 2, missing_image 1); first: a.jsonl:17, b.tar:0003; "
        "1 exact duplicate kept (first b.tar:0004 (as :0001))"
    )
    as_dict = total.to_dict()
    assert as_dict["by_reason"] == {"bad_utf8": 2, "missing_image": 1}
    assert as_dict["first"]["bad_utf8"] == ["data/a.jsonl:17", "data/a.jsonl:20"]
    assert (as_dict["read"], as_dict["used"], as_dict["skipped"], as_dict["duplicates"]) == (5, 2, 3, 1)
    assert "| bad_utf8 | 2 | `data/a.jsonl:17`, `data/a.jsonl:20` |" in total.to_markdown()
    assert RowAccounting(read=3, used=3).summary() == "rows: 3 read, 3 used, 0 skipped"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_run_ends_with_its_row_accounting(tiny_sd1_path, tiny_bert_path, tmp_path: Path, fmt: str) -> None:
    rows = [{"en": en, "zh": zh} for en, zh in PAIRS * 4]  # 24 rows
    rows[5]["zh"] = "bad\x00"
    rows[9]["zh"] = " "
    path = write_corpus(tmp_path / "data", fmt, rows)
    config = tiny_config(
        tiny_sd1_path,
        tiny_bert_path,
        tmp_path / "run",
        max_steps=6,  # past the first epoch: a streamed corpus counts what it has read
        batch_size=4,
        data={"path": str(path), "val_samples": 2},
        eval={"enabled": fmt == "tar"},  # a tar corpus has no held-out rows: the report is the unscored one
    )
    result = run_recipe("align", config)
    assert result.rows is not None
    assert (result.rows.read, result.rows.used, dict(result.rows.skipped.counts)) == (
        24,
        22,
        {"control_characters": 1, "empty_caption": 1},
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["rows"]["by_reason"] == {"control_characters": 1, "empty_caption": 1}
    assert metrics["rows"]["first"]["empty_caption"][0].startswith(str(tmp_path / "data"))
    assert metrics["rows"]["duplicates"] == 22 - 6  # PAIRS * 4: every pair after its first time
    if fmt == "tar":
        report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
        assert "## Data" in report and "| control_characters | 1 |" in report


def test_the_cli_prints_the_accounting(tiny_sd1_path, tiny_bert_path, tmp_path: Path, capsys) -> None:
    from xling.train.cli import main

    rows = [{"en": en, "zh": zh} for en, zh in PAIRS * 2]
    rows[3]["zh"] = "第3个".encode() + b"\xff"
    path = write_corpus(tmp_path / "data", "jsonl", rows)
    code = main(
        [
            "train", "align", "--teacher", str(tiny_sd1_path), "--student", str(tiny_bert_path),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "2", "--log_with", "none",
            "--checkpoint_every", "0", "--eval.enabled", "false", "--data", str(path),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "rows: 12 read, 11 used, 1 skipped (bad_utf8 1); first: pairs.jsonl:4" in out
    assert isinstance(load_corpus(path), ParallelCorpus)
