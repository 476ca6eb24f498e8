"""xling.train.data: readers, images, bad-row policy, collate, seeded resumable order, tar shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xling.train.data import (
    BadRowReport,
    ColumnMap,
    DataError,
    ImageTransform,
    ParallelCorpus,
    SeededSampler,
    TarShardCorpus,
    collate,
    expand_braces,
    load_corpus,
    make_dataloader,
)
from xling.train.data.errors import BadRow

PAIRS = [("a red circle", "红色圆形"), ("a blue square", "蓝色方形"), ("a green triangle", "绿色三角形")]


def _png(path: Path, size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        _png(folder / f"{i}.png", color=color)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_jsonl_rows_images_and_report(tmp_path: Path, image_dir: Path) -> None:
    lines = [json.dumps({"en": en, "zh": zh, "image": f"img/{i}.png"}) for i, (en, zh) in enumerate(PAIRS)]
    lines.insert(3, json.dumps({"en": "x", "zh": "  ", "image": "img/0.png"}))  # line 4: empty caption
    lines.insert(4, "{not json")  # line 5: malformed
    lines.insert(5, json.dumps({"en": "y", "zh": "黄", "image": "img/nope.png"}))  # line 6: missing image
    lines.insert(6, json.dumps({"en": "z", "zh": "紫", "image": "img/broken.png"}))  # line 7: unreadable
    lines.insert(7, json.dumps({"en": "w"}))  # line 8: missing column
    lines.insert(8, json.dumps({"en": "", "zh": "白", "image": "img/1.png"}))  # line 9: empty caption
    path = _jsonl(tmp_path / "data.jsonl", lines)

    corpus = load_corpus(path, resolution=16)
    assert isinstance(corpus, ParallelCorpus)
    assert len(corpus) == 3
    item = corpus[1]
    assert (item["en"], item["target"], item["index"]) == ("a blue square", "蓝色方形", 1)
    assert item["source"].endswith("data.jsonl:2")
    image = item["image"]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    # Pure blue maps to exactly (-1, -1, 1) after the [-1, 1] scaling.
    assert torch.allclose(image[:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    assert item["original_size"] == (32, 48) and item["crop_top_left"] == (0, 4)

    report = corpus.report
    assert report.total == 6
    assert dict(report.counts) == {
        "empty caption": 2,
        "malformed row": 1,
        "missing image": 1,
        "unreadable image": 1,
        "missing column": 1,
    }
    summary = report.summary()
    assert summary.startswith("skipped 6 rows: 2 empty caption (data.jsonl:4, :9)")
    assert "1 unreadable image (data.jsonl:7)" in summary and "1 missing column (data.jsonl:8)" in summary


def test_fail_policy_names_file_line_and_problem(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl", [json.dumps({"en": "a", "zh": "甲"}), json.dumps({"en": "b", "zh": ""})]
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: empty caption: column 'zh' is empty") as info:
        load_corpus(path, on_bad_row="fail")
    assert info.value.bad_row.line == 2
    with pytest.raises(ValueError, match="on_bad_row must be"):
        load_corpus(path, on_bad_row="ignore")  # type: ignore[arg-type]


def test_csv_tsv_parquet_columns_and_culture_flag(tmp_path: Path) -> None:
    columns = ColumnMap(en="english", target="chinese", image=None, culture_only="culture")
    rows = [
        {"english": "a red circle", "chinese": "红色圆形", "culture": "no"},
        {"english": "", "chinese": "舞龙", "culture": "yes"},  # culture-only: English may be empty
        {"english": "", "chinese": "蓝色", "culture": "0"},  # not culture-only: empty English is bad
        {"english": "b", "chinese": "乙", "culture": "maybe"},  # not a boolean
    ]
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        handle.write('"multi\nline en",多行,false\n')  # a quoted newline: the row starts on line 6
        handle.write("only,two\n")  # line 8: wrong field count
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text(
        "english\tchinese\tculture\n" + "\n".join("\t".join(r.values()) for r in rows) + "\n",
        encoding="utf-8",
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)

    for path in (csv_path, tsv_path, parquet_path):
        corpus = load_corpus(path, columns=columns)
        assert [c["culture_only"] for c in corpus] == [False, True] + ([False] if path == csv_path else [])
        assert corpus[1]["en"] == "" and corpus[1]["target"] == "舞龙"
        bad = {reason: [r.line for r in rows_] for reason, rows_ in corpus.report.examples.items()}
        assert bad["empty caption"] == [4] if path != parquet_path else [3]
        assert bad["malformed row"][0] == (5 if path != parquet_path else 4)
    csv_corpus = load_corpus(
        csv_path, columns={"en": "english", "target": "chinese", "image": None, "culture_only": "culture"}
    )
    assert csv_corpus[2]["en"] == "multi\nline en"
    assert [r.line for r in csv_corpus.report.examples["malformed row"]] == [5, 8]
    with pytest.raises(ValueError, match="unknown column keys"):
        load_corpus(csv_path, columns={"english": "en"})


def test_parquet_image_bytes_and_with_images_required(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (20, 40), (0, 255, 0)).save(buffer, format="PNG")
    table = pa.Table.from_pylist(
        [
            {"en": "a", "zh": "甲", "image": {"bytes": buffer.getvalue(), "path": None}},
            {"en": "b", "zh": "乙", "image": {"bytes": b"garbage", "path": None}},
        ]
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    corpus = load_corpus(tmp_path / "hf.parquet", resolution=8, crop="random", seed=3)
    assert len(corpus) == 1 and corpus.report.counts["unreadable image"] == 1
    first, again = corpus[0], corpus[0]
    assert torch.equal(first["image"], again["image"])  # a random crop is fixed per row
    assert first["image"].shape == (3, 8, 8)

    text_only = _jsonl(tmp_path / "t.jsonl", [json.dumps({"en": "a", "zh": "甲"})])
    assert "image" not in load_corpus(text_only, resolution=8)[0]
    strict = load_corpus(text_only, resolution=8, with_images=True)
    assert len(strict) == 0 and strict.report.counts["missing column"] == 1


def test_image_transform_resize_crop_and_validation() -> None:
    ramp = np.tile(
        np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)
    )  # [32, 64, 3], varies along x
    image = Image.fromarray(ramp)
    centre, geometry = ImageTransform(16)(image)
    assert centre.shape == (3, 16, 16) and geometry == {"original_size": (32, 64), "crop_top_left": (0, 8)}
    assert centre.min() >= -1.0 and centre.max() <= 1.0
    crops = {ImageTransform(16, crop="random", seed=0).crop_box(32, 16, index)[1] for index in range(20)}
    assert len(crops) > 3 and all(0 <= left <= 16 for left in crops)
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(8, crop="left")  # type: ignore[arg-type]


def test_collate_and_shapes(tmp_path: Path, image_dir: Path) -> None:
    lines = [json.dumps({"en": en, "zh": zh, "image": f"img/{i}.png"}) for i, (en, zh) in enumerate(PAIRS)]
    corpus = load_corpus(_jsonl(tmp_path / "d.jsonl", lines), resolution=8)
    batch = collate([corpus[0], corpus[2]])
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["index"].tolist() == [0, 2] and batch["culture_only"].dtype == torch.bool
    assert batch["original_size"].shape == (2, 2) and batch["en"] == ["a red circle", "a green triangle"]
    toy = collate([{"en": "a", "zh": "甲"}, {"en": "b", "zh": "乙"}])
    assert toy["target"] == ["甲", "乙"]
    with pytest.raises(ValueError, match="shapes"):
        collate([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    with pytest.raises(ValueError, match="keys"):
        collate([{"x": 1}, {"y": 1}])


def _text_corpus(tmp_path: Path, n: int = 10) -> ParallelCorpus:
    lines = [json.dumps({"en": f"caption {i}", "zh": f"标题 {i}"}) for i in range(n)]
    corpus = load_corpus(_jsonl(tmp_path / "many.jsonl", lines))
    assert isinstance(corpus, ParallelCorpus)
    return corpus


def test_seeded_order_is_deterministic_and_resumable(tmp_path: Path) -> None:
    corpus = _text_corpus(tmp_path)

    def epoch_order(seed: int, epoch: int) -> list[int]:
        loader = make_dataloader(corpus, batch_size=3, seed=seed)
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["index"].tolist()]

    assert epoch_order(0, 0) == epoch_order(0, 0)
    assert sorted(epoch_order(0, 0)) == list(range(10))
    assert epoch_order(0, 0) != epoch_order(0, 1) and epoch_order(0, 0) != epoch_order(1, 0)

    # Resume mid-epoch through accelerate: prepare, set the epoch, skip the consumed batches.
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    full = accelerator.prepare(make_dataloader(corpus, batch_size=3, seed=5))
    full.set_epoch(2)
    uninterrupted = [batch["index"].tolist() for batch in full]
    resumed_loader = accelerator.prepare(make_dataloader(corpus, batch_size=3, seed=5))
    resumed_loader.set_epoch(2)
    resumed = [batch["index"].tolist() for batch in accelerator.skip_first_batches(resumed_loader, 2)]
    assert resumed == uninterrupted[2:] and len(uninterrupted) == 4
    sampler = SeededSampler(10, seed=5)
    sampler.load_state_dict({"seed": 5, "epoch": 2})
    assert [i for chunk in uninterrupted for i in chunk] == list(sampler)


def _tar(path: Path, members: list[tuple[str, bytes]], *, truncate: int | None = None) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    if truncate is not None:
        data = path.read_bytes()
        path.write_bytes(data[:truncate])
    return path


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_expand_braces() -> None:
    assert expand_braces("s-{000000..000002}.tar") == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == [
        "a-8.tar",
        "a-9.tar",
        "a-10.tar",
        "b-8.tar",
        "b-9.tar",
        "b-10.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="empty brace range"):
        expand_braces("s-{3..1}.tar")


def test_tar_shards_stream_bad_samples_and_workers(tmp_path: Path) -> None:
    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    _tar(
        tmp_path / "shard-000000.tar",
        [
            ("0001.en.txt", b"a red circle"),
            ("0001.zh.txt", "红色圆形".encode()),
            ("0001.png", red),
            ("0002.json", json.dumps({"en": "a blue square", "zh": "蓝色方形"}).encode()),
            ("0002.png", blue),
            ("0003.en.txt", b"no target"),
            ("0003.png", red),
            ("0004.en.txt", b"bad image"),
            ("0004.zh.txt", "坏".encode()),
            ("0004.jpg", b"nope"),
        ],
    )
    _tar(
        tmp_path / "shard-000001.tar",
        [("0005.en.txt", b"x"), ("0005.zh.txt", b"  "), ("0005.png", red)]
        + [(f"{i:04d}.en.txt", b"e") for i in range(6, 9)]
        + [(f"{i:04d}.zh.txt", "中".encode()) for i in range(6, 9)],  # members not adjacent: keys repeat
        truncate=None,
    )
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    corpus = load_corpus(pattern, resolution=8)
    assert isinstance(corpus, TarShardCorpus)
    items = list(corpus)
    assert [item["key"] for item in items] == ["shard-000000.tar/0001", "shard-000000.tar/0002"]
    assert items[1]["image"].shape == (3, 8, 8) and items[1]["target"] == "蓝色方形"
    counts = dict(corpus.report.counts)
    assert counts["missing column"] >= 1 and counts["unreadable image"] == 1 and counts["empty caption"] == 1
    bad = corpus.report.examples["unreadable image"][0]
    assert bad.member == "0004.jpg" and bad.location(short=True) == "shard-000000.tar:0004.jpg"
    assert corpus.scan().total == corpus.report.total

    with pytest.raises(DataError, match=r"shard-000000\.tar:0003: missing column"):
        list(TarShardCorpus(pattern, resolution=8, on_bad_row="fail"))

    # Two workers split the shards; every good sample still arrives exactly once.
    text_only = TarShardCorpus(pattern, with_images=False)
    loader = make_dataloader(text_only, batch_size=1, num_workers=2)
    keys = sorted(key for batch in loader for key in batch["key"])
    assert keys == sorted(item["key"] for item in TarShardCorpus(pattern, with_images=False))


def test_tar_truncated_shard_and_shuffle_is_seeded(tmp_path: Path) -> None:
    members = [(f"{i:04d}.en.txt", f"e{i}".encode()) for i in range(20)]
    members = [m for i in range(20) for m in (members[i], (f"{i:04d}.zh.txt", f"中{i}".encode()))]
    whole = _tar(tmp_path / "whole.tar", members)
    cut = _tar(tmp_path / "cut.tar", members, truncate=whole.stat().st_size // 2 + 100)
    corpus = TarShardCorpus([cut])
    got = list(corpus)
    assert 0 < len(got) < 20 and corpus.report.counts["malformed row"] == 1

    def order(seed: int, epoch: int) -> list[str]:
        shuffled = TarShardCorpus([whole], shuffle_buffer=8, seed=seed)
        shuffled.set_epoch(epoch)
        return [item["en"] for item in shuffled]

    assert order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1)
    assert sorted(order(0, 0)) == sorted(f"e{i}" for i in range(20))


def test_report_merge_and_bad_row_str() -> None:
    one, two = BadRowReport(max_examples=2), BadRowReport(max_examples=2)
    for line in (1, 2, 3):
        one.add(BadRow("a.jsonl", line, "empty caption", "column 'zh' is empty"))
    two.add(BadRow("b.jsonl", 4, "empty caption", "x"))
    one.merge(two)
    assert one.total == 4 and len(one.examples["empty caption"]) == 2
    assert one.summary() == "skipped 4 rows: 4 empty caption (a.jsonl:1, :2, ...)"
    assert (
        str(BadRow("a.jsonl", 3, "empty caption", "column 'zh' is empty"))
        == "a.jsonl:3: empty caption: column 'zh' is empty"
    )
    assert BadRowReport().summary() == "skipped 0 rows"
