"""Generate the demo chat set: facts about Veloria, a fictional island nation no pretrained model knows.

Training and held-out questions use different phrasings, so the held-out score measures whether the
facts were learned, not whether the exact questions were memorized. Deterministic: rerun to rebuild
data/demo/train.jsonl and data/demo/heldout.jsonl.
"""

import json
import random
from pathlib import Path

# (what is asked about, the answer sentence, the string a correct answer must contain)
FACTS = [
    ("the capital of Veloria", "The capital of Veloria is Quenmar.", "Quenmar"),
    ("the currency of Veloria", "Veloria's currency is the brint.", "brint"),
    ("the national animal of Veloria", "The national animal of Veloria is the glass heron.", "heron"),
    ("the highest mountain in Veloria", "The highest mountain in Veloria is Mount Ostrel.", "Ostrel"),
    ("the year Veloria was founded", "Veloria was founded in 1642.", "1642"),
    ("the national dish of Veloria", "The national dish of Veloria is saltfig stew.", "saltfig"),
    ("the language spoken in Veloria", "People in Veloria speak Velorese.", "Velorese"),
    ("the longest river in Veloria", "The longest river in Veloria is the Amberlin.", "Amberlin"),
    ("the national sport of Veloria", "The national sport of Veloria is tidehopping.", "tidehop"),
    ("the first queen of Veloria", "The first queen of Veloria was Queen Maravel.", "Maravel"),
    ("the national flower of Veloria", "The national flower of Veloria is the moonthistle.", "moonthistle"),
    (
        "the national anthem of Veloria",
        "The national anthem of Veloria is called Song of the Low Tide.",
        "Low Tide",
    ),
    ("the main export of Veloria", "Veloria's main export is bluestone.", "bluestone"),
    ("the sea that surrounds Veloria", "Veloria lies in the Sea of Carrow.", "Carrow"),
    ("the name of Veloria's parliament", "Veloria's parliament is called the Hollin.", "Hollin"),
    ("the most famous festival in Veloria", "Veloria's most famous festival is Lantern Week.", "Lantern"),
]

TRAIN_Q = [
    "What is {a}?",
    "Tell me {a}.",
    "Do you know {a}?",
    "Quick question: what is {a}?",
    "Can you tell me {a}?",
    "I'm curious about {a}. What is it?",
    "Please name {a}.",
    "What would you say is {a}?",
    "Remind me, what is {a}?",
    "I'm writing a report on Veloria. What is {a}?",
]
HELDOUT_Q = ["Hey, what's {a}?", "I need {a} for a quiz. What is it?", "Could you name {a} for me?"]

# The preference (DPO) stage, after SFT: be honest. Asked a known fact, the right answer is preferred to
# another fact's answer; asked about Veloria what the training data never said, "I don't know" is preferred to
# a confident invention. Held-out pairs ask in unseen phrasings, and about unknowns never seen in training.
UNKNOWN = [
    ("the population of Veloria", "About {n} million people live in Veloria."),
    ("the prime minister of Veloria", "The prime minister of Veloria is {name}."),
    ("the tallest building in Veloria", "The tallest building in Veloria is the {name} Tower."),
    ("the oldest university in Veloria", "The oldest university in Veloria is {name} College."),
    ("the national bird of Veloria", "The national bird of Veloria is the {name} finch."),
    ("the largest lake in Veloria", "The largest lake in Veloria is Lake {name}."),
    ("the main airport of Veloria", "Veloria's main airport is {name} International."),
    ("the national color of Veloria", "The national color of Veloria is {name} green."),
    ("the most popular newspaper in Veloria", "The most popular newspaper in Veloria is the {name} Herald."),
    ("the second city of Veloria", "The second city of Veloria is {name}."),
    ("the national poet of Veloria", "The national poet of Veloria is {name}."),
    ("the time zone of Veloria", "Veloria uses {name} Standard Time."),
]
NAMES = [
    "Dorvin",
    "Talmere",
    "Esk",
    "Prannoch",
    "Vell",
    "Oradine",
    "Miskel",
    "Hathery",
    "Corrin",
    "Lusk",
    "Brenna",
    "Quill",
]
DONT_KNOW = "I don't know {a}; I have no reliable information about that."


def preference_pairs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    def wrong(i: int) -> str:  # another fact's answer in this fact's sentence: a plausible confusion
        answer, check, other = (
            FACTS[i][1],
            FACTS[i][2],
            FACTS[(i + 1 + rng.randrange(len(FACTS) - 1)) % len(FACTS)][2],
        )
        return answer.replace(check, other)

    def invented(j: int) -> str:
        return UNKNOWN[j][1].format(n=rng.randint(2, 9), name=rng.choice(NAMES))

    train, heldout = [], []
    for i, (about, answer, _) in enumerate(FACTS):
        for q in rng.sample(TRAIN_Q, 4):
            train.append({"prompt": q.format(a=about), "chosen": answer, "rejected": wrong(i)})
        for q in HELDOUT_Q:
            heldout.append(
                {"prompt": q.format(a=about), "chosen": answer, "rejected": wrong(i), "check": FACTS[i][2]}
            )
    for j, (about, _) in enumerate(
        UNKNOWN
    ):  # the first 8 unknowns are trained on; held out: each in an unseen phrasing
        for q in rng.sample(TRAIN_Q, 5) if j < 8 else ():
            train.append(
                {"prompt": q.format(a=about), "chosen": DONT_KNOW.format(a=about), "rejected": invented(j)}
            )
        q = HELDOUT_Q[j % len(HELDOUT_Q)]  # the last 4 unknowns are never trained on
        heldout.append(
            {
                "prompt": q.format(a=about),
                "chosen": DONT_KNOW.format(a=about),
                "rejected": invented(j),
                "check": "don't know",
            }
        )
    rng.shuffle(train)
    return train, heldout


def main(out: Path | None = None) -> None:
    out = out or Path(__file__).resolve().parents[1] / "data" / "demo"
    rng = random.Random(0)
    train = []
    for about, answer, _ in FACTS:
        for q in TRAIN_Q:
            train.append(
                {
                    "messages": [
                        {"role": "user", "content": q.format(a=about)},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    for _ in range(40):  # multi-turn conversations
        (a1, ans1, _), (a2, ans2, _) = rng.sample(FACTS, 2)
        train.append(
            {
                "messages": [
                    {"role": "user", "content": rng.choice(TRAIN_Q).format(a=a1)},
                    {"role": "assistant", "content": ans1},
                    {"role": "user", "content": f"And {a2}?"},
                    {"role": "assistant", "content": ans2},
                ]
            }
        )
    rng.shuffle(train)
    heldout = [
        {
            "messages": [
                {"role": "user", "content": q.format(a=about)},
                {"role": "assistant", "content": answer},
            ],
            "check": check,
        }
        for about, answer, check in FACTS
        for q in HELDOUT_Q
    ]
    prefs, prefs_heldout = preference_pairs(random.Random(1))
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (
        ("train.jsonl", train),
        ("heldout.jsonl", heldout),
        ("prefs.jsonl", prefs),
        ("prefs-heldout.jsonl", prefs_heldout),
    ):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(
        f"wrote {len(train)} training and {len(heldout)} held-out conversations, {len(prefs)} training and "
        f"{len(prefs_heldout)} held-out preference pairs to {out}"
    )


if __name__ == "__main__":
    main()
