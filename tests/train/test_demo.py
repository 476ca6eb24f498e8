"""``xling demo``: the callback behind Generate, the adapter facts, the command line, and the page in a real
browser (Debian's Chromium driven by Playwright) on the toy world and the committed toy IAP adapter.

The browser test fails when Chromium is missing and ``CI`` is set (CI installs it, see ``.ci/run``) and skips
otherwise. With ``XLING_DEMO_SCREENSHOT=PATH`` it also writes its screenshot of the page to ``PATH`` (how
``docs/images/demo.png`` is made, see ``docs/demo.md``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image

from xling.train import demo
from xling.train.cli import main as xling
from xling.train.toyworld import world

#: A held-out scene (never seen in training, in either language) that the page is asked to draw.
SCENE = world.Scene((world.Obj("yellow", "triangle", "bottom"),))
PROMPT, PROMPT_EN = world.caption_zh(SCENE), world.caption_en(SCENE)
assert world.is_heldout(SCENE)

#: Chromium's flags: this machine has no network (nothing may try to reach it) and CI runs as root.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as ``xling demo`` serves the toy world: its tensors are tiny, and on a busy two-core
    runner a second thread makes each click many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy_demo() -> demo.DemoModel:
    """The page's model with no arguments: the toy teacher and the committed toy IAP adapter."""
    return demo.load_demo()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the callback behind Generate ------------------------------------------------------------------------


def test_default_demo_is_the_toy_world(toy_demo: demo.DemoModel) -> None:
    assert toy_demo.adapter == str(demo.TOY_ADAPTER_DIR)
    assert toy_demo.teacher == "toy"
    assert (toy_demo.resolution, toy_demo.factor) == (32, 8)
    assert toy_demo.language == "zh"
    # The gallery holds held-out scenes' parallel captions, Chinese first.
    held = {(world.caption_zh(s), world.caption_en(s)) for s in world.all_single_scenes(split="heldout")}
    assert toy_demo.examples and set(toy_demo.examples) <= held


def test_generate_returns_upscaled_strips(toy_demo: demo.DemoModel) -> None:
    on_generate = demo.generate_callback(toy_demo)
    steps, guidance = 4, toy_demo.default_guidance
    teacher, student = on_generate(PROMPT, PROMPT_EN, steps, guidance, 3, 2)
    side = toy_demo.resolution * toy_demo.factor
    for strip in (teacher, student):
        assert strip.dtype == np.uint8
        assert strip.shape == (side, 2 * side, 3)
        tiles = demo.split_strip(strip, 2, toy_demo.factor)  # [2, 32, 32, 3]
        assert tiles.shape == (2, 32, 32, 3)
        # Nearest neighbour: every pixel is an f x f block, so upscaling the tiles again gives the strip back.
        assert np.array_equal(demo.strip(demo.upscale(tiles, toy_demo.factor)), strip)
        assert not np.array_equal(tiles[0], tiles[1])  # two seeds, two images
    # Image i of a click starts from seed `seed + i`: seed 4 alone is the second image of seeds 3, 4.
    _, alone = on_generate(PROMPT, PROMPT_EN, steps, guidance, 4, 1)
    second = demo.split_strip(student, 2, toy_demo.factor)[1].astype(int)
    assert np.abs(demo.split_strip(alone, 1, toy_demo.factor)[0].astype(int) - second).max() <= 1


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (("", PROMPT_EN, 20, 3.0, 0, 1), "the Chinese prompt is empty"),
        (("   ", PROMPT_EN, 20, 3.0, 0, 1), "the Chinese prompt is empty"),
        ((PROMPT, None, 20, 3.0, 0, 1), "the English prompt is empty"),
        ((PROMPT, PROMPT_EN, 0, 3.0, 0, 1), "steps must be from 1 to 200, got 0"),
        ((PROMPT, PROMPT_EN, 2.5, 3.0, 0, 1), "steps must be a whole number from 1 to 200, got 2.5"),
        ((PROMPT, PROMPT_EN, None, 3.0, 0, 1), "steps is empty"),
        ((PROMPT, PROMPT_EN, 20, float("nan"), 0, 1), "guidance must be from 0 to 30, got nan"),
        ((PROMPT, PROMPT_EN, 20, -1.0, 0, 1), "guidance must be from 0 to 30"),
        ((PROMPT, PROMPT_EN, 20, "lots", 0, 1), "guidance must be a number from 0 to 30, got 'lots'"),
        ((PROMPT, PROMPT_EN, 20, 3.0, -1, 1), "seed must be from 0 to 4294967295, got -1"),
        ((PROMPT, PROMPT_EN, 20, 3.0, 0, 0), "number of images must be from 1 to 8, got 0"),
        ((PROMPT, PROMPT_EN, 20, 3.0, 0, demo.MAX_IMAGES + 1), "number of images must be from 1 to 8, got 9"),
        ((PROMPT, PROMPT_EN, 20, 3.0, demo.MAX_SEED, 2), "runs past the largest seed"),
    ],
)
def test_bad_input_is_a_message(toy_demo: demo.DemoModel, inputs: tuple[Any, ...], message: str) -> None:
    on_generate = demo.generate_callback(toy_demo)
    with pytest.raises(gr.Error) as err:
        on_generate(*inputs)
    assert message in err.value.message
    assert err.value.__cause__ is None  # shown as a message, with no chained traceback behind it
    with pytest.raises(demo.DemoInputError, match=message.split(",")[0]):
        toy_demo.check_inputs(*inputs)


def test_upscale_and_split_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="upscaling factor must be >= 1"):
        demo.upscale(np.zeros((1, 2, 2, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="does not hold 3 images upscaled 2 times"):
        demo.split_strip(np.zeros((4, 8, 3), np.uint8), 3, 2)
    assert demo.upscale_factor(32) == 8 and demo.upscale_factor(512) == 1 and demo.upscale_factor(100) == 3


# --- the adapter's facts ---------------------------------------------------------------------------------


def test_facts_of_the_committed_adapter() -> None:
    facts = demo.read_adapter_facts(demo.TOY_ADAPTER_DIR)
    assert facts.source == "config.json"
    assert (facts.language, facts.teacher, facts.student, facts.recipe, facts.head) == (
        "zh",
        "toy (sd2)",
        "toy",
        "iap",
        "linear",
    )
    assert facts.widths == "student 64 -> teacher 64"
    # The numbers of the run that trained it (its eval.json): every held-out scene right, the teacher too.
    rows = dict(facts.evaluation)
    assert rows["checker accuracy, student, held-out scenes"] == "100.0%"
    assert rows["checker accuracy, teacher on English"] == "100.0%"
    assert rows["checker accuracy, student on Chinese (48 scenes x 1 seeds)"] == "95.8%"
    text = facts.to_markdown()
    assert "| recipe | iap |" in text and "| checker accuracy, student, held-out scenes | 100.0% |" in text


def _copy_adapter(tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(demo.TOY_ADAPTER_DIR, adapter)
    (adapter / "eval.json").unlink()
    return adapter


def test_facts_from_a_model_card(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path)
    config = json.loads((adapter / "config.json").read_text())
    del config["recipe"]  # the card's tags name it
    (adapter / "config.json").write_text(json.dumps(config))
    data = ModelCardData(
        language="zh",
        base_model="org/english-teacher",
        library_name="xling",
        license="apache-2.0",
        pipeline_tag="text-to-image",
        tags=["xling", "pea", "text-to-image"],
        model_name="toy-pea",
        eval_results=[
            EvalResult(
                task_type="text-to-image",
                dataset_type="toy-world",
                dataset_name="toy world",
                metric_type="accuracy",
                metric_name="checker accuracy",
                metric_value=0.958333,
            )
        ],
    )
    ModelCard.from_template(data, model_description="A toy adapter.").save(adapter / "README.md")
    facts = demo.read_adapter_facts(adapter)
    assert facts.source == "model card"
    assert (facts.language, facts.teacher, facts.recipe, facts.license) == (
        "zh",
        "org/english-teacher",
        "pea",
        "apache-2.0",
    )
    assert facts.student == "toy" and facts.head == "linear"  # from config.json, which the card lacks
    assert facts.evaluation == [("checker accuracy (toy world)", "0.9583")]
    assert "| license | apache-2.0 |" in facts.to_markdown()


def test_facts_from_a_card_evaluation_table(tmp_path: Path) -> None:
    adapter = _copy_adapter(tmp_path)
    card = (
        "---\nlanguage: zh\nbase_model: toy\nlibrary_name: xling\n---\n# toy adapter\n\n"
        "## Evaluation\n\n| condition | all |\n|---|---|\n| student (Chinese) | 95.8% |\n"
        "| teacher (English) | 100.0% |\n\n## Usage\n\n| not | this |\n|---|---|\n| x | y |\n"
    )
    (adapter / "README.md").write_text(card)
    facts = demo.read_adapter_facts(adapter)
    assert facts.evaluation == [("student (Chinese)", "95.8%"), ("teacher (English)", "100.0%")]
    assert facts.recipe == "iap"  # config.json's, the card names none


def test_facts_from_the_card_xling_writes(tmp_path: Path) -> None:
    from xling.adapters.card import write_model_card
    from xling.train.evaluation import EvalResult as XlingEvalResult
    from xling.train.evaluation import report_markdown
    from xling.train.recipes.base import adapter_card

    adapter = _copy_adapter(tmp_path)
    metrics = json.loads((demo.TOY_ADAPTER_DIR / "eval.json").read_text())
    metrics.pop("rows", None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text(report_markdown(XlingEvalResult(**metrics), grid=None))
    write_model_card(adapter, adapter_card({"recipe": "iap", "teacher": "toy"}, run))
    facts = demo.read_adapter_facts(adapter)
    assert (facts.source, facts.language, facts.recipe, facts.license) == (
        "model card",
        "zh",
        "iap",
        "apache-2.0",
    )
    rows = dict(facts.evaluation)
    assert (
        rows["Student (Chinese prompts), held-out scenes"]
        == "color 100.0%, shape 100.0%, position 100.0%, all 100.0%"
    )
    assert rows["mean-token cosine"] == "0.9979"  # a one-row table of metrics: one entry per column
    assert rows["PSNR (dB)"] == "36.28"


def test_facts_of_broken_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter config at"):
        demo.read_adapter_facts(tmp_path)
    adapter = _copy_adapter(tmp_path)
    (adapter / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        demo.read_adapter_facts(adapter)


# --- the command line ------------------------------------------------------------------------------------


def test_help_does_not_import_gradio() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from xling.train.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['demo', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert '--adapter' in out.getvalue() and '--port' in out.getvalue(), out.getvalue()\n"
        "print('gradio' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_option_is_documented() -> None:
    import argparse

    from xling.train.commands import demo as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    (sub,) = next(a for a in parser._actions if a.choices).choices.values()
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    text = (Path(__file__).resolve().parents[2] / "docs" / "demo.md").read_text(encoding="utf-8")
    assert len(options) == 8
    assert [o for o in options if f"`{o}" not in text] == []


def test_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert xling(["demo", "--port", "70000"]) == 2
    assert "--port: must be from 1 to 65535, got 70000" in capsys.readouterr().err
    assert xling(["demo", "--adapter", str(tmp_path)]) == 2
    assert f"no language-encoder config at {tmp_path / 'config.json'}" in capsys.readouterr().err


def test_serve_prints_only_xling_lines(capfd: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    stop = threading.Event()
    port = _free_port()
    status: list[int] = []
    thread = threading.Thread(
        target=lambda: status.append(demo.serve(port=port, print_fn=lines.append, stop=stop)), daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not any("open http" in line for line in lines):
            assert thread.is_alive() and time.monotonic() < deadline, lines
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        assert lines[-1] == f"xling demo: open {url} (Ctrl-C stops it)"
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and "<!doctype html>" in page.read().decode().lower()
        with urllib.request.urlopen(f"{url}config", timeout=30) as config:
            served = json.loads(config.read())
        assert served["title"] == "xling demo" and served["analytics_enabled"] is False
        assert any(c.get("props", {}).get("elem_id") == "xling-generate" for c in served["components"])
    finally:
        stop.set()
        thread.join(30)
    assert status == [0]
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    captured = capfd.readouterr()
    assert "Running on" not in captured.out + captured.err  # Gradio's own banner stays quiet
    assert "gradio" not in captured.out.lower()


# --- the page in a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system Chromium (module-scoped, so a missing browser is reported before the toy world loads)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser test")
        pytest.skip(reason)
    return path


def test_page_in_a_browser(chromium: str, toy_demo: demo.DemoModel, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    app = demo.build_app(toy_demo)
    assert app.analytics_enabled is False
    url = demo.launch(app, port=_free_port())
    origin = url.rstrip("/")
    requests: list[str] = []
    errors: list[str] = []
    seed, num_images = 1, 2
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh user-data dir
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            browser.on("request", lambda request: requests.append(request.url))
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.set_default_timeout(120_000)
            page.goto(url)
            ids = demo.ELEM_IDS
            prompt = page.locator(f"#{ids['prompt']} textarea")
            prompt_en = page.locator(f"#{ids['prompt_en']} textarea")

            # Clicking an example fills both prompts.
            third_zh, third_en = toy_demo.examples[2]
            page.locator(f"#{ids['examples']} tbody tr").nth(2).click()
            page.wait_for_function(
                "([sel, value]) => document.querySelector(sel).value === value",
                arg=[f"#{ids['prompt_en']} textarea", third_en],
            )
            assert (prompt.input_value(), prompt_en.input_value()) == (third_zh, third_en)

            prompt.fill(PROMPT)
            prompt_en.fill(PROMPT_EN)
            page.locator(f"#{ids['seed']} input").fill(str(seed))
            count = page.locator(f"#{ids['num_images']} input[type=number]")
            count.fill(str(num_images))
            count.press("Enter")
            page.locator(f"#{ids['generate']}").click()
            clicked = time.perf_counter()
            images = {}
            for side in ("teacher_image", "student_image"):
                img = page.locator(f"#{ids[side]} img")
                img.wait_for()
                page.wait_for_function(
                    "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0 }",
                    arg=f"#{ids[side]} img",
                )
                natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                png = page.request.get(img.get_attribute("src")).body()
                images[side] = (natural, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            generate_seconds = time.perf_counter() - clicked
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
    finally:
        app.close()

    side_px = toy_demo.resolution * toy_demo.factor
    for natural, pixels in images.values():
        assert natural == [num_images * side_px, side_px]
        assert pixels.shape == (side_px, num_images * side_px, 3)
    # The page shows what the callback draws for the typed prompts, seed and count (to one intensity level:
    # the server's worker thread may sum in another order than this one).
    teacher, student = toy_demo.generate(PROMPT, PROMPT_EN, seed=seed, num_images=num_images)
    assert np.abs(images["teacher_image"][1].astype(int) - teacher).max() <= 1
    assert np.abs(images["student_image"][1].astype(int) - student).max() <= 1
    # The toy checker scores the student's images, downscaled back, against the prompt's scene: the committed
    # adapter gets colour, shape and position right on both (measured: every held-out scene at seeds 0-3).
    verdicts = [world.check(tile, SCENE) for tile in demo.split_strip(student, num_images, toy_demo.factor)]
    assert [v["all"] for v in verdicts] == [True] * num_images, verdicts
    assert all(world.check(t, SCENE)["all"] for t in demo.split_strip(teacher, num_images, toy_demo.factor))
    # Nothing left this machine: every request went to the page's own server.
    assert requests and all(r.startswith(origin) or r.startswith(("data:", "blob:")) for r in requests), [
        r for r in requests if not r.startswith(origin)
    ]
    assert errors == []
    shot = Image.open(tmp_path / "demo.png")
    assert shot.width == 1280 and shot.height > 900
    if target := os.environ.get("XLING_DEMO_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "demo.png", target)
    print(
        f"\nbrowser test: page + Generate {time.perf_counter() - start:.1f} s, "
        f"Generate click {generate_seconds:.1f} s, student checker score "
        f"{sum(v['all'] for v in verdicts)}/{num_images}"
    )
