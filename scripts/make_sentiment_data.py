"""Generate the sentiment example set: short product reviews labelled positive / negative (the classic
GPT-2 sequence-classification example, made here so it ships with the repo). Held-out reviews use products
and phrasings never seen in training, so the held-out accuracy measures the learned sentiment, not
memorized sentences. Deterministic: rerun to rebuild data/sentiment/{train,heldout}.jsonl."""

import json
import random
from pathlib import Path

PRODUCTS = [
    "blender",
    "backpack",
    "kettle",
    "desk lamp",
    "phone case",
    "water bottle",
    "keyboard",
    "umbrella",
    "toaster",
    "headphones",
    "office chair",
    "frying pan",
    "alarm clock",
    "hiking boots",
    "coffee grinder",
    "yoga mat",
]
HELDOUT_PRODUCTS = ["vacuum cleaner", "rain jacket", "bike lock", "wall clock", "tea pot", "power bank"]
POSITIVE = [
    "works perfectly",
    "is excellent value",
    "exceeded my expectations",
    "feels really solid",
    "is a joy to use",
    "was worth every penny",
    "arrived quickly and works great",
    "is the best I have owned",
    "does exactly what it promises",
]
NEGATIVE = [
    "broke after a week",
    "is a waste of money",
    "stopped working on day two",
    "feels cheap and flimsy",
    "was a big disappointment",
    "arrived damaged",
    "is the worst I have owned",
    "does not do what it promises",
]
HELDOUT_POSITIVE = [
    "makes my mornings so much easier",
    "is one I would happily buy again",
    "is sturdy and well made",
]
HELDOUT_NEGATIVE = [
    "fell apart within a month",
    "is something I regret buying",
    "is poorly made and unreliable",
]
FRAMES = [
    "This {p} {s}.",
    "The {p} {s}!",
    "Honestly, the {p} {s}.",
    "My new {p} {s}.",
    "I think this {p} {s}.",
]


def reviews(rng, products, positive, negative, n):
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        text = rng.choice(FRAMES).format(
            p=rng.choice(products), s=rng.choice(positive if label == "positive" else negative)
        )
        out.append({"text": text, "label": label})
    rng.shuffle(out)
    return out


def main(out: Path | None = None) -> None:
    out = out or Path(__file__).resolve().parents[1] / "data" / "sentiment"
    rng = random.Random(0)
    train = reviews(rng, PRODUCTS, POSITIVE, NEGATIVE, 320)
    heldout = reviews(rng, HELDOUT_PRODUCTS, HELDOUT_POSITIVE, HELDOUT_NEGATIVE, 60)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(train)} training and {len(heldout)} held-out reviews to {out}")


if __name__ == "__main__":
    main()
