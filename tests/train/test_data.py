"""xling.train.data: readers, images, bad-row policy, the rows of a run, the batch and its collate, the
seeded resumable DataLoaders, tar shards."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xling.train.config import load_config
from xling.train.data import (
    BadRowReport,
    Batch,
    ColumnMap,
    DataError,
    EpochBatchSampler,
    ImageTransform,
    ParallelCorpus,
    TarShardCorpus,
    collate_rows,
    expand_braces,
    load_corpus,
    load_rows,
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
        "empty_caption": 2,
        "malformed_row": 1,
        "missing_image": 1,
        "unreadable_image": 1,
        "missing_column": 1,
    }
    summary = report.summary()
    assert summary.startswith("skipped 6 rows: 2 empty_caption (data.jsonl:4, :9)")
    assert "1 unreadable_image (data.jsonl:7)" in summary and "1 missing_column (data.jsonl:8)" in summary


def test_fail_policy_names_file_line_and_problem(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl", [json.dumps({"en": "a", "zh": "甲"}), json.dumps({"en": "b", "zh": ""})]
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: empty_caption: column 'zh' is empty") as info:
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
        assert bad["empty_caption"] == [4] if path != parquet_path else [3]
        assert bad["malformed_row"][0] == (5 if path != parquet_path else 4)
    csv_corpus = load_corpus(
        csv_path, columns={"en": "english", "target": "chinese", "image": None, "culture_only": "culture"}
    )
    assert csv_corpus[2]["en"] == "multi\nline en"
    assert [r.line for r in csv_corpus.report.examples["malformed_row"]] == [5, 8]
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
    assert len(corpus) == 1 and corpus.report.counts["unreadable_image"] == 1
    first, again = corpus[0], corpus[0]
    assert torch.equal(first["image"], again["image"])  # a random crop is fixed per row
    assert first["image"].shape == (3, 8, 8)

    text_only = _jsonl(tmp_path / "t.jsonl", [json.dumps({"en": "a", "zh": "甲"})])
    assert "image" not in load_corpus(text_only, resolution=8)[0]
    strict = load_corpus(text_only, resolution=8, with_images=True)
    assert len(strict) == 0 and strict.report.counts["missing_column"] == 1


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


def test_collate_rows_and_shapes(tmp_path: Path, image_dir: Path) -> None:
    lines = [json.dumps({"en": en, "zh": zh, "image": f"img/{i}.png"}) for i, (en, zh) in enumerate(PAIRS)]
    corpus = load_corpus(_jsonl(tmp_path / "d.jsonl", lines), resolution=8)
    batch = collate_rows([(0, corpus[0]), (2, corpus[2])])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert (
        batch.pixels is not None
        and batch.pixels.shape == (2, 3, 8, 8)
        and batch.pixels.dtype == torch.float32
    )
    assert batch.index.tolist() == [0, 2] and batch.index.dtype == torch.long
    assert batch.culture is not None and batch.culture.tolist() == [False, False]
    assert batch.en == ["a red circle", "a green triangle"] and batch.zh == ["红色圆形", "绿色三角形"]
    assert batch.latents is None and set(batch.extra) == {"original_size", "crop_top_left"}
    # the image transform's record, per row, for SDXL's time ids: (h, w) before the resize, (top, left)
    assert batch.extra["original_size"].shape == (2, 2) and batch.extra["original_size"].dtype == torch.long
    assert batch.extra["crop_top_left"].shape == (2, 2)
    assert batch.to("cpu") is not batch and torch.equal(batch.to("cpu").pixels, batch.pixels)

    # Toy-world rows (zh), cached latents and teacher embeddings; no image in one row: no pixels.
    rows = [
        {"en": "a", "zh": "甲", "latents": torch.zeros(4, 2, 2), "prompt_embeds": torch.ones(77, 8)},
        {
            "zh": "乙",
            "image": torch.zeros(3, 8, 8),
            "latents": torch.ones(4, 2, 2),
            "prompt_embeds": torch.ones(77, 8),
        },
    ]
    toy = collate_rows(list(enumerate(rows)))
    assert toy.zh == ["甲", "乙"] and toy.en == ["a", ""] and toy.pixels is None and toy.culture is None
    assert toy.latents is not None and toy.latents.shape == (2, 4, 2, 2)
    assert toy.extra["prompt_embeds"].shape == (2, 77, 8) and "pooled_prompt_embeds" not in toy.extra
    with pytest.raises(ValueError, match="target caption"):
        collate_rows([(0, {"en": "a"})])
    with pytest.raises(ValueError, match="empty batch"):
        collate_rows([])


def _text_corpus(tmp_path: Path, n: int = 10) -> ParallelCorpus:
    lines = [json.dumps({"en": f"caption {i}", "zh": f"标题 {i}"}) for i in range(n)]
    corpus = load_corpus(_jsonl(tmp_path / "many.jsonl", lines))
    assert isinstance(corpus, ParallelCorpus)
    return corpus


def _epoch(loader: torch.utils.data.DataLoader, epoch: int) -> list[list[int]]:
    loader.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
    return [batch.index.tolist() for batch in loader]


def test_dataloader_order_is_seeded_per_epoch_and_sharded(tmp_path: Path) -> None:
    corpus = _text_corpus(tmp_path)
    loader = make_dataloader(corpus, batch_size=3, seed=0)
    assert isinstance(loader.batch_sampler, EpochBatchSampler) and len(loader) == 3  # 10 rows: last 1 dropped
    first = _epoch(loader, 0)
    assert first == _epoch(make_dataloader(corpus, batch_size=3, seed=0), 0)
    # Epoch e is randperm(n, seed + e), cut into batches; the rows' index is the dataset row.
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert first == [order[0:3], order[3:6], order[6:9]]
    assert first != _epoch(loader, 1) and first != _epoch(make_dataloader(corpus, batch_size=3, seed=1), 0)
    batch = next(iter(loader))
    assert batch.zh == [f"标题 {i}" for i in batch.index.tolist()]

    # Two processes split every global batch: together they see what one process sees.
    one = _epoch(make_dataloader(corpus, batch_size=4, seed=3), 2)
    two = [_epoch(make_dataloader(corpus, batch_size=2, seed=3, num_replicas=2, rank=r), 2) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one and len(one) == 2
    # Validation: dataset order, every epoch the same.
    assert _epoch(make_dataloader(corpus, batch_size=5, seed=0, shuffle=False), 7) == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
    ]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_dataloader(corpus, batch_size=6, seed=0, num_replicas=2)


def test_dataloader_resumes_and_leaves_the_global_rng(tmp_path: Path) -> None:
    # Resume mid-epoch as the loop does: a fresh loader, set the epoch, skip the consumed batches.
    from accelerate import Accelerator

    corpus = _text_corpus(tmp_path, n=13)
    accelerator = Accelerator(cpu=True)
    uninterrupted = _epoch(make_dataloader(corpus, batch_size=3, seed=5), 2)
    assert len(uninterrupted) == 4
    resumed_loader = make_dataloader(corpus, batch_size=3, seed=5)
    resumed_loader.batch_sampler.set_epoch(2)  # type: ignore[union-attr]
    rng = torch.get_rng_state()
    resumed = [batch.index.tolist() for batch in accelerator.skip_first_batches(resumed_loader, 2)]
    assert resumed == uninterrupted[2:]
    # The loader draws its worker seed from its own generator: dropout's RNG (restored on resume) stays put.
    assert torch.equal(torch.get_rng_state(), rng)


def test_dataloader_worker_processes_give_the_same_batches(tmp_path: Path) -> None:
    corpus = _text_corpus(tmp_path)
    in_process = _epoch(make_dataloader(corpus, batch_size=3, seed=4), 1)
    assert _epoch(make_dataloader(corpus, batch_size=3, seed=4, num_workers=2), 1) == in_process


def test_load_rows_holds_out_validation_rows(tmp_path: Path) -> None:
    corpus = _text_corpus(tmp_path, n=30)
    config = load_config("align", {"data.path": corpus.paths[0], "data.val_samples": 5})
    train_rows, val_rows = load_rows(config, resolution=None, with_images=False)
    # min(val_samples, 10%) rows held out, from the start of the file.
    assert len(val_rows) == 3 and len(train_rows) == 27
    assert [row["en"] for row in val_rows] == ["caption 0", "caption 1", "caption 2"]
    assert train_rows[0]["target"] == "标题 3"
    toy_train, toy_val = load_rows(
        load_config("align", {"data.val_samples": 4}), resolution=None, with_images=False
    )
    assert len(toy_val) == 4 and len(toy_train) > 0


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
    assert counts["missing_column"] >= 1 and counts["unreadable_image"] == 1 and counts["empty_caption"] == 1
    bad = corpus.report.examples["unreadable_image"][0]
    assert bad.member == "0004.jpg" and bad.location(short=True) == "shard-000000.tar:0004.jpg"
    assert corpus.scan().total == corpus.report.total

    with pytest.raises(DataError, match=r"shard-000000\.tar:0003: missing_column"):
        list(TarShardCorpus(pattern, resolution=8, on_bad_row="fail"))

    # Two workers split the shards; every good sample still arrives exactly once, numbered -1 (the loop
    # numbers streamed rows by position).
    text_only = TarShardCorpus(pattern, with_images=False)
    loader = make_dataloader(text_only, batch_size=1, seed=0, num_workers=2)
    batches = list(loader)
    assert all(batch.index.tolist() == [-1] for batch in batches)
    assert sorted(zh for batch in batches for zh in batch.zh) == sorted(
        item["target"] for item in TarShardCorpus(pattern, with_images=False)
    )


def test_streamed_dataloader_drops_the_incomplete_batch(tmp_path: Path) -> None:
    members = [(f"{i:04d}.{lang}.txt", f"{lang}{i}".encode()) for i in range(5) for lang in ("en", "zh")]
    corpus = load_corpus(_tar(tmp_path / "five.tar", members))
    assert isinstance(corpus, TarShardCorpus)
    batches = list(make_dataloader(corpus, batch_size=2, seed=0))
    assert [batch.zh for batch in batches] == [["zh0", "zh1"], ["zh2", "zh3"]]


def test_one_rule_decides_tar_shards(tmp_path: Path) -> None:
    members = [("0001.en.txt", b"a"), ("0001.zh.txt", "甲".encode())]
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "a.tar", members)
    with tarfile.open(shards / "b.tar.gz", "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    corpus = load_corpus(shards)
    assert isinstance(corpus, TarShardCorpus) and len(corpus.shards) == 2
    # A streamed corpus is split by process (the accelerator's index), and has no validation rows.
    config = load_config("align", {"data.path": str(shards)})
    accelerator = SimpleNamespace(process_index=1, num_processes=2)
    train_rows, val_rows = load_rows(config, resolution=None, with_images=False, accelerator=accelerator)
    assert isinstance(train_rows, TarShardCorpus) and val_rows is None
    assert (train_rows.rank, train_rows.world_size) == (1, 2)
    # A folder with a table file reads the tables (and a table corpus is not split by process).
    _jsonl(shards / "pairs.csv", ["en,zh", "b,乙"])
    train_rows, val_rows = load_rows(config, resolution=None, with_images=False, accelerator=accelerator)
    assert isinstance(train_rows.dataset, ParallelCorpus) and len(train_rows) + len(val_rows) == 1
    with pytest.raises(ValueError, match="cannot mix"):
        load_corpus([shards / "a.tar", shards / "pairs.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        load_corpus(tmp_path / "empty")


def test_tar_truncated_shard_and_shuffle_is_seeded(tmp_path: Path) -> None:
    members = [(f"{i:04d}.en.txt", f"e{i}".encode()) for i in range(20)]
    members = [m for i in range(20) for m in (members[i], (f"{i:04d}.zh.txt", f"中{i}".encode()))]
    whole = _tar(tmp_path / "whole.tar", members)
    cut = _tar(tmp_path / "cut.tar", members, truncate=whole.stat().st_size // 2 + 100)
    corpus = TarShardCorpus([cut])
    got = list(corpus)
    assert 0 < len(got) < 20 and corpus.report.counts["truncated_shard"] == 1

    def order(seed: int, epoch: int) -> list[str]:
        shuffled = TarShardCorpus([whole], shuffle_buffer=8, seed=seed)
        shuffled.set_epoch(epoch)
        return [item["en"] for item in shuffled]

    assert order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1)
    assert sorted(order(0, 0)) == sorted(f"e{i}" for i in range(20))


def test_report_merge_and_bad_row_str() -> None:
    one, two = BadRowReport(max_examples=2), BadRowReport(max_examples=2)
    for line in (1, 2, 3):
        one.add(BadRow("a.jsonl", line, "empty_caption", "column 'zh' is empty"))
    two.add(BadRow("b.jsonl", 4, "empty_caption", "x"))
    one.merge(two)
    assert one.total == 4 and len(one.examples["empty_caption"]) == 2
    assert one.summary() == "skipped 4 rows: 4 empty_caption (a.jsonl:1, :2, ...)"
    assert (
        str(BadRow("a.jsonl", 3, "empty_caption", "column 'zh' is empty"))
        == "a.jsonl:3: empty_caption: column 'zh' is empty"
    )
    assert BadRowReport().summary() == "skipped 0 rows"
