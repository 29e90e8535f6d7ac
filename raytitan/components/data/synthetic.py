"""Seeded generator of C4-format shards: json.gz, one {"text", "timestamp", "url"} object per line.

The text is English-like (a small grammar over common words) so that a model can learn it
quickly, and it is a pure function of (seed, shard index): the same files on every machine.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile

NOUNS = (
    "time year people way day man woman child world life hand part place case week company "
    "system program question work government number night point home water room mother area "
    "money story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door "
    "health person art war history party result change morning reason research girl guy moment "
    "air teacher force education river garden market village engine letter window road music"
).split()
VERBS = (
    "finds makes takes sees knows gets gives uses tells asks needs feels leaves keeps begins "
    "shows hears plays runs moves likes holds brings writes provides stands loses pays meets "
    "includes continues learns changes leads understands watches follows stops creates reads "
    "builds opens carries wins offers remembers considers buys expects serves sends reaches"
).split()
ADJECTIVES = (
    "good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able local sure free better true whole "
    "clear recent certain strong special easy human late hard major best simple open quiet"
).split()
ADVERBS = "often always never quickly slowly really usually finally carefully almost".split()
CONNECTIVES = ("and", "but", "because", "so", "while", "although", "when", "after")
OPENERS = ("In the morning,", "Last year,", "According to the report,", "For example,",
           "At the same time,", "In the end,", "Meanwhile,", "Today,")
DOMAINS = ("example.com", "news.example.org", "blog.example.net", "shop.example.io", "wiki.example.edu")


def _noun_phrase(rng: random.Random) -> str:
    det = rng.choice(("the", "a", "this", "every", "our", "their"))
    adj = f"{rng.choice(ADJECTIVES)} " if rng.random() < 0.5 else ""
    # Zipf-like choice: early words are more common, as in real text.
    noun = NOUNS[min(int(rng.paretovariate(1.2)) - 1, len(NOUNS) - 1)] if rng.random() < 0.6 else rng.choice(NOUNS)
    return f"{det} {adj}{noun}"


def _clause(rng: random.Random) -> str:
    adverb = f"{rng.choice(ADVERBS)} " if rng.random() < 0.25 else ""
    return f"{_noun_phrase(rng)} {adverb}{rng.choice(VERBS)} {_noun_phrase(rng)}"


def _sentence(rng: random.Random) -> str:
    text = _clause(rng)
    if rng.random() < 0.35:
        text += f" {rng.choice(CONNECTIVES)} {_clause(rng)}"
    if rng.random() < 0.2:
        text = f"{rng.choice(OPENERS)} {text}"
    text = text[0].upper() + text[1:]
    return text + rng.choice((".", ".", ".", "!", "?"))


def _document(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        paragraphs.append(" ".join(_sentence(rng) for _ in range(rng.randint(2, 8))))
    return "\n".join(paragraphs)


def shard_name(index: int, total: int) -> str:
    return f"c4-train.{index:05d}-of-{total:05d}.json.gz"


def write_shard(path: str, seed: int, index: int, docs: int) -> None:
    """Write one shard atomically (temp file + rename), so a crash never leaves half a shard."""
    rng = random.Random(f"{seed}:{index}")
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for i in range(docs):
            record = {
                "text": _document(rng),
                "timestamp": f"2019-04-{1 + (index + i) % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
                "url": f"https://{rng.choice(DOMAINS)}/{index}/{i}",
            }
            f.write((json.dumps(record) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def ensure_synthetic_shards(folder: str, seed: int, num_shards: int = 8, docs_per_shard: int = 2000) -> list[str]:
    """Generate the shards once into ``folder``; later calls reuse them."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, shard_name(i, num_shards)) for i in range(num_shards)]
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            write_shard(path, seed, i, docs_per_shard)
    return paths


def default_cache_folder(seed: int) -> str:
    root = os.environ.get("RAYTITAN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "raytitan"))
    return os.path.join(root, f"synthetic-c4-seed{seed}")
