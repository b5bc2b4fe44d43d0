"""A second routing evaluation pool for the aquila-tiny recipe (attempt 23 in docs/aquila-tiny.md).

Held-out drawing requests and ordinary questions never used before.
Subjects and phrasings below were written before attempt 23 was scored and appear in no training
request; ordinary questions: 25 MT-Bench first turns (never used in this project's training or
evaluation) and 25 BELLE eval questions in none of the earlier evaluation sets given as arguments.

    python recipes/aquila-tiny/pool2.py OUT.json EARLIER_routing_eval.json ...
"""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import instructions as ins
import decision as D
from aquilachat.io import iter_records
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SUBJ_ZH = ["一只章鱼", "一座风车", "一只考拉", "一只火烈鸟", "一个热气球", "一座金字塔", "一个南瓜", "一支冰淇淋", "一座摩天轮", "一只长颈鹿"]
SUBJ_EN = ["an octopus", "a windmill", "a koala", "a flamingo", "a hot air balloon", "a pyramid", "a pumpkin",
           "an ice cream cone", "a Ferris wheel", "a giraffe"]
PHR_ZH = ["我想看看{s}的图片", "能给我一幅{s}的画吗", "你来画{s}吧", "画幅{s}给我看看", "用画笔描绘{s}，{style}"]
PHR_EN = ["Can I see a painting of {s}?", "I want you to draw {s}.", "Paint a scene with {s}.",
          "Could I have an image of {s}?", "Do a {style} painting of {s}."]
WORDS = ["章鱼", "风车", "考拉", "火烈鸟", "热气球", "金字塔", "南瓜", "冰淇淋", "摩天轮", "长颈鹿", "octopus", "windmill",
         "koala", "flamingo", "balloon", "pyramid", "pumpkin", "ice cream", "ferris", "giraffe"]
# no training drawing request (every pool instructions.py and decision.py draw from) holds a pool-2 word or phrasing
rng = random.Random(0)
train = [D.positive(rng, 0.5, True) for _ in range(20000)]
train += [t for t in ins.DRAW_ZH + ins.DRAW_EN + D.MORE_DRAW_ZH + D.MORE_DRAW_EN]
assert not [t for t in train if any(w in t.lower() for w in WORDS)], "pool-2 subject in training"
assert not set(PHR_ZH + PHR_EN) & set(ins.DRAW_ZH + ins.DRAW_EN + D.MORE_DRAW_ZH + D.MORE_DRAW_EN + ins.DRAW_ZH_HELDOUT + ins.DRAW_EN_HELDOUT)
rng = random.Random(2026)
drawing = []
for subjects, phrasings, styles in ((SUBJ_ZH, PHR_ZH, ins.STYLES_ZH), (SUBJ_EN, PHR_EN, ins.STYLES_EN)):
    pairs = rng.sample([(s, t) for s in subjects for t in phrasings], 25)
    drawing += [t.format(s=s, style=rng.choice(styles)) for s, t in pairs]
seen = set()
for f in sys.argv[2:]:
    seen |= set(json.load(open(f))["ordinary"])
en = ins.no_picture([r["turns"][0] for _, r in iter_records(SHARED / "eval_writing" / "mt_bench" / "question.jsonl")
                     if len(r["turns"][0]) < 400])
zh = [q for q in ins.belle_questions(SHARED) if q not in seen]
ordinary = rng.sample(en, 25) + rng.sample(zh, 25)
json.dump({"drawing": drawing, "ordinary": ordinary}, open(sys.argv[1], "w", encoding="utf-8"), ensure_ascii=False, indent=1)
print(len(drawing), len(ordinary), len(en), len(zh))
