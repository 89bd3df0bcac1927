"""Shared pieces of the benchmark scripts: fixed inputs, llama.cpp tool discovery,
timing statistics and markdown output; `reference.py` builds llama-cpp-python's
`Llama` the way llamba loads models.

Importing this module has no side effects: llama-cpp-python and llamba are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reference import repack_supported  # the AMX workaround lives in reference.py, once

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BUILD_SCRIPT = REPO_ROOT.parent / "shared" / "tools" / "build-llama-cpp-tools.sh"
LLAMA_CPP_TOOLS = ("llama-batched-bench", "llama-server")

# -- fixed inputs -------------------------------------------------------------------

PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "List five tips for staying focused while working from home.",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
    "What are the main differences between a violin and a viola?",
    "Write a polite email asking a landlord to fix a leaking kitchen tap.",
    "Summarize the plot of a heist movie in three sentences.",
    "Give a recipe for a simple tomato soup.",
    "Why is the sky blue? Answer in plain language.",
    "Write a haiku about the first snow of winter.",
    "Describe a busy train station at rush hour.",
    "What should a beginner know before planting a vegetable garden?",
    "Explain the rules of chess in a few short paragraphs.",
    "Write a product description for a waterproof hiking backpack.",
    "Tell me about the history of the bicycle.",
    "Write a limerick about a cat who loves cardboard boxes.",
    "How does a refrigerator keep food cold?",
    "Give three arguments for and against school uniforms.",
    "Describe a sunrise over the ocean from a sailor's point of view.",
    "Write the opening paragraph of a mystery novel set in Venice.",
    "What is the difference between weather and climate?",
    "Suggest a weekend itinerary for a first visit to Lisbon.",
    "Explain what a budget is and why households use one.",
    "Write a short speech for a friend's wedding toast.",
    "How do bees make honey?",
    "Describe the sound of rain on a tin roof.",
    "Write a dialogue between a robot and a gardener.",
    "What are good habits for getting a full night of sleep?",
    "Explain how a bill becomes a law, step by step.",
    "Write a short poem about an old wooden bridge.",
    "Give advice to someone learning to cook for the first time.",
    "Describe the life cycle of a butterfly.",
    "Write a thank-you note to a teacher who made a difference.",
    "What makes a good job interview answer?",
    "Explain the water cycle using simple words.",
    "Write a short fable about a fox and a crow with a moral at the end.",
    "Describe a market in Marrakech on a Saturday morning.",
    "How do airplanes stay in the air?",
    "Write a short review of an imaginary science fiction film.",
    "What are three ways to reduce food waste at home?",
)

# (review, gold label) pairs: 32 positive, 32 negative, interleaved.
REVIEWS: tuple[tuple[str, str], ...] = (
    ("Battery lasts all week and the screen is bright even outdoors.", "positive"),
    ("Stopped charging after ten days and support never answered.", "negative"),
    ("Comfortable shoes, true to size, and they look great.", "positive"),
    ("The zipper broke the first time I used the bag.", "negative"),
    ("Best coffee grinder I have owned; quiet and consistent.", "positive"),
    ("Arrived with a cracked lid and a strange smell.", "negative"),
    ("Setup took two minutes and it just works.", "positive"),
    ("The colors faded after a single wash.", "negative"),
    ("My kids love this puzzle and it has kept them busy for hours.", "positive"),
    ("Much smaller than the photos suggest. Disappointed.", "negative"),
    ("Sturdy desk, easy assembly, and the instructions were clear.", "positive"),
    ("The headphones hiss constantly and hurt my ears.", "negative"),
    ("Keeps drinks cold all day, even in the car.", "positive"),
    ("Software is buggy and crashes every time I export.", "negative"),
    ("Great value for the price, would buy again.", "positive"),
    ("It leaked all over my counter on day one.", "negative"),
    ("The blender crushes ice like nothing and cleans up fast.", "positive"),
    ("Cheap plastic that snapped when I tightened the screw.", "negative"),
    ("Soft, warm blanket that still looks new after many washes.", "positive"),
    ("Delivery was three weeks late and the box was empty.", "negative"),
    ("This lamp makes my reading corner feel cozy.", "positive"),
    ("The app keeps logging me out and losing my data.", "negative"),
    ("Excellent sound for such a small speaker.", "positive"),
    ("The knife was dull out of the box and rusted quickly.", "negative"),
    ("Fits my phone perfectly and the buttons are easy to press.", "positive"),
    ("Instructions were missing and two parts did not fit.", "negative"),
    ("The tent stayed dry through a night of heavy rain.", "positive"),
    ("Overpriced for what it is and it feels flimsy.", "negative"),
    ("Fast shipping and the seller included a kind note.", "positive"),
    ("The vacuum loses suction after a few minutes.", "negative"),
    ("My dog adores this toy and it survived his chewing.", "positive"),
    ("The mattress sagged within a month.", "negative"),
    ("Beautiful watch, keeps perfect time, and the strap is comfy.", "positive"),
    ("Returned it because the fan was louder than a hair dryer.", "negative"),
    ("The pan heats evenly and nothing sticks to it.", "positive"),
    ("The charger got dangerously hot and smelled like burning.", "negative"),
    ("Easy to use camera with sharp photos in low light.", "positive"),
    ("The printer jams on every other page.", "negative"),
    ("These gloves are warm and still let me use my phone.", "positive"),
    ("The paint peeled off the chair after a week.", "negative"),
    ("A lovely novel; I could not put it down.", "positive"),
    ("The book arrived with pages missing from the middle.", "negative"),
    ("The keyboard feels great and the backlight is even.", "positive"),
    ("The mouse double-clicks on its own and is useless.", "negative"),
    ("Plants thrive under this grow light.", "positive"),
    ("The scale gives a different weight every time.", "negative"),
    ("Exactly as described and beautifully packaged.", "positive"),
    ("The seams came apart on the first hike.", "negative"),
    ("This kettle boils water quickly and shuts off reliably.", "positive"),
    ("The remote stopped working and batteries did not help.", "negative"),
    ("The stroller folds with one hand and rolls smoothly.", "positive"),
    ("Terrible customer service and a refund that never came.", "negative"),
    ("The yoga mat has great grip and no chemical smell.", "positive"),
    ("The frame arrived bent and the glass was shattered.", "negative"),
    ("My favorite purchase this year, hands down.", "positive"),
    ("The sound cuts out every few seconds over Bluetooth.", "negative"),
    ("The backpack has clever pockets and feels very durable.", "positive"),
    ("The lock jammed and I had to cut it off.", "negative"),
    ("Delicious tea with a fresh, bright aroma.", "positive"),
    ("The snacks were stale and past their date.", "negative"),
    ("The monitor is crisp and the stand adjusts easily.", "positive"),
    ("The drill battery died after twenty minutes of light use.", "negative"),
    ("Wonderful gift; my mother uses it every day.", "positive"),
    ("It broke the second time I used it. Waste of money.", "negative"),
)

CLASSIFY_HEADER_SHORT = (
    "Classify the sentiment of each product review as positive or negative. "
    "Answer with one word.\n\n"
    "Review: Works perfectly and arrived early.\nSentiment: positive\n\n"
    "Review: Broke after two days of use.\nSentiment: negative\n\n"
)

CLASSIFY_HEADER_LONG = (
    "You are a careful assistant that reads customer reviews of products sold in an "
    "online store and decides whether the customer is happy with the purchase. Answer "
    "with a single word: positive if the review expresses satisfaction, praise or a "
    "recommendation, and negative if it expresses disappointment, a defect, a delay, a "
    "refund request or a warning to other buyers. Mixed reviews are labelled by their "
    "overall conclusion. Ignore spelling mistakes and judge only the sentiment, not "
    "the product category.\n\n"
    "Review: Works perfectly and arrived early.\nSentiment: positive\n\n"
    "Review: Broke after two days of use.\nSentiment: negative\n\n"
    "Review: The fabric is soft and the stitching is neat; I ordered a second one.\n"
    "Sentiment: positive\n\n"
    "Review: The handle came loose and the seller refused to replace it.\n"
    "Sentiment: negative\n\n"
    "Review: Took a while to arrive, but the quality made it worth the wait.\n"
    "Sentiment: positive\n\n"
    "Review: Looks nice in the pictures, but in person it feels cheap and wobbly.\n"
    "Sentiment: negative\n\n"
    "Review: My whole family uses it daily and nobody has complained once.\n"
    "Sentiment: positive\n\n"
    "Review: The battery swelled up and the case cracked open after a month.\n"
    "Sentiment: negative\n\n"
    "Review: Simple, reliable and quiet. Exactly what I needed for the office.\n"
    "Sentiment: positive\n\n"
    "Review: Do not buy this. It overheated and tripped the breaker twice.\n"
    "Sentiment: negative\n\n"
)


def classify_prompt(review: str, *, long_prefix: bool = False) -> str:
    """The few-shot prompt for one review; the label follows after a space."""
    header = CLASSIFY_HEADER_LONG if long_prefix else CLASSIFY_HEADER_SHORT
    return f"{header}Review: {review}\nSentiment:"


def resolve_model(model: str | None) -> Path:
    """The model file: `model`, $LLAMBA_MODEL, or llamba's embedded Gemma 3 270M."""
    from llamba_cli.job.models import resolve_model_path

    return resolve_model_path(model)


def default_threads() -> int:
    return os.cpu_count() or 1


# -- llama.cpp's own tools ----------------------------------------------------------


@dataclass
class Tools:
    """Where llama.cpp's binaries are, or why they are not available."""

    bin_dir: Path | None
    note: str = ""

    def path(self, name: str) -> Path:
        assert self.bin_dir is not None
        return self.bin_dir / name


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _has_tools(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in LLAMA_CPP_TOOLS)


def find_tools(tools_bin: str | None) -> Tools:
    """llama.cpp's binaries from `tools_bin`, else built (once, cached) by the shared
    build script for the installed llama-cpp-python version."""
    if tools_bin:
        bin_dir = Path(tools_bin).expanduser()
        if _has_tools(bin_dir):
            return Tools(bin_dir)
        return Tools(None, f"{bin_dir} lacks {' or '.join(LLAMA_CPP_TOOLS)}")
    if not BUILD_SCRIPT.is_file():
        return Tools(None, f"build script {BUILD_SCRIPT} not found; pass --tools-bin DIR")
    with tempfile.NamedTemporaryFile(
        "w+", prefix="llama-cpp-tools-build-", suffix=".log", delete=False
    ) as log:
        print(f"locating llama.cpp tools (build log: {log.name}) ...", file=sys.stderr)
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), llama_cpp_python_version()],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            check=False,
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return Tools(
            None, f"building llama.cpp tools failed (exit {proc.returncode}, see {log.name})"
        )
    Path(log.name).unlink(missing_ok=True)
    bin_dir = Path(lines[-1])
    if not _has_tools(bin_dir):
        return Tools(None, f"build script printed {bin_dir}, which lacks the tools")
    return Tools(bin_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- measurements -------------------------------------------------------------------


@dataclass
class Series:
    """Repeated measurements of one contender (a rate per repeat, higher is better)."""

    name: str
    rates: list[float] = field(default_factory=list)
    work: list[int] = field(default_factory=list)  # tokens or rows done per repeat
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def spread(self, digits: int = 1) -> str:
        """'min-max' of the rates."""
        if not self.rates:
            return "-"
        return f"{min(self.rates):,.{digits}f}-{max(self.rates):,.{digits}f}"


def set_up(
    name: str,
    make: Callable[[], Callable[[], tuple[float, int]]],
    series: list[Series],
    runners: list[tuple[Series, Callable[[], tuple[float, int]]]],
) -> None:
    """Build a contender's runner with `make()`; a contender whose setup fails is
    kept in `series` with its error, so the report says so, and never run."""
    s = Series(name)
    series.append(s)
    print(f"setting up {name} ...", file=sys.stderr)
    try:
        runners.append((s, make()))
    except Exception as e:
        s.error = f"setup failed: {type(e).__name__}: {e}"
        print(f"  {s.error}", file=sys.stderr)


def interleave(
    runners: Sequence[tuple[Series, Callable[[], tuple[float, int]]]], repeats: int
) -> None:
    """Run every contender once per round, rounds repeated (A B C A B C ...), so slow
    drifts of a shared machine spread over all contenders.  Each runner returns
    (rate, work done); one that raises is reported and not run again."""
    for r in range(repeats):
        for series, run in runners:
            if series.error:
                continue
            try:
                rate, work = run()
            except Exception as e:  # a failed contender must not hide the others
                series.error = f"{type(e).__name__}: {e}"
                print(f"  {series.name}: FAILED ({series.error})", file=sys.stderr)
                continue
            series.rates.append(rate)
            series.work.append(work)
            print(f"  round {r + 1}/{repeats}  {series.name}: {rate:,.1f}", file=sys.stderr)


def ratio(a: float, b: float) -> str:
    """a / b as '1.23x', or '-' when either is missing."""
    if not (a > 0 and b > 0):
        return "-"
    return f"{a / b:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


# -- machine facts and output -------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_cores(interval: float = 1.0) -> float | None:
    """How many cores other work keeps busy right now (from /proc/stat over
    `interval` seconds), or None where /proc/stat is not available."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already in user

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def busy_warning(threads: int, busy: float | None) -> str | None:
    """A warning when other work already occupies cores the benchmark's threads need.

    llama.cpp's worker threads meet at a barrier after every operation, so one
    preempted thread stalls all of them: on an oversubscribed machine throughput can
    drop by an order of magnitude and the numbers stop meaning anything."""
    cores = os.cpu_count() or 1
    if busy is None or busy + threads <= cores + 0.5:
        return None
    return (
        f"**warning**: other work kept {busy:.1f} of {cores} cores busy before the run; "
        f"with --threads {threads} the machine is oversubscribed and the numbers are "
        "unreliable (run on an idle machine, or lower --threads)"
    )


def machine_facts(threads: int, model_path: Path) -> list[str]:
    """Markdown bullet lines describing where and how the benchmark ran."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    repack = repack_supported()
    cores_busy = busy_cores()
    busy = busy_warning(threads, cores_busy)
    if busy:
        print(busy.replace("**", ""), file=sys.stderr)
    in_use = "?" if cores_busy is None else f"{cores_busy:.1f}"
    return [
        *([f"- {busy}"] if busy else []),
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; before the run: load average "
        f"{load}, {in_use} cores busy",
        f"- OS: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- llama-cpp-python {llama_cpp_python_version()} (same llama.cpp for every contender)",
        f"- model: {model_path.name} ({model_path.stat().st_size / 2**20:,.0f} MiB)",
        f"- threads: {threads}; flash attention: on; greedy decoding",
        "- weight repacking / extra buffer types: "
        + ("enabled" if repack else "disabled for every contender (AMX CPU, see README)"),
    ]


def command_line() -> str:
    """How this script was invoked, relative to the repository root when possible."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_report(text: str, out: Path) -> None:
    """Print the report and write it to `out` (creating its folder)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {out}", file=sys.stderr)
