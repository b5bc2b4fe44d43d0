"""Step 7 of the aquila-tiny recipe: teach the model AquilaChat's image instructions.

Writes into OUT (default ``runs/aquila-tiny/data``):

* ``instructions_train.jsonl`` — drawing and face-editing requests, Chinese and English, answered
  in the format of FlagAI's SFT samples (``sft_samples.jsonl``: its two prefaces, then
  ``\\n#text2image#\\n`` and one image prompt, or ``\\n#InstructFace#\\n`` and one edit step per
  line), mixed with ``--replay`` ordinary conversations from ``sft.jsonl`` so that ordinary
  questions keep their ordinary answers (FlagAI format);
* ``routing_eval.json`` — 50 held-out drawing requests (subjects and phrasings never trained on)
  and 50 ordinary questions (vicuna_bench and BELLE's eval set, never trained on), for
  ``recipes/aquila-tiny/routing.py``.

Everything is a pure function of ``--seed``.

    python recipes/aquila-tiny/instructions.py [--shared ../shared/data] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from aquilachat.io import iter_records

# FlagAI's two prefaces (sft_samples.jsonl, ids sft_v0.8.9_val.jsonl_12 and _39), word for word
DRAW_PREFACE = "作为一款文本生成模型，我并不具备图像生成能力。但我可以尝试为您调用文生图模型进行图像生成。"
EDIT_PREFACE = "作为一款文本生成模型，我并不具备图像编辑能力。但我可以尝试为您调用多步图像编辑模型进行图像编辑。"

SUBJECTS_ZH = [
    "一只猫", "一只小狗", "雪山", "日落时的大海", "一座古老的城堡", "一朵红玫瑰", "森林里的小木屋", "一条龙", "星空",
    "一只熊猫", "城市夜景", "一艘帆船", "樱花树", "一只老虎", "秋天的枫叶", "一杯咖啡", "宇航员", "一座桥",
    "下雨的街道", "一只蝴蝶", "长城", "一片麦田", "一只狐狸", "海边的灯塔", "一辆红色跑车", "一只鹦鹉", "荷花池",
    "一个机器人", "一座寺庙", "沙漠中的骆驼", "一只企鹅", "瀑布", "一碗面条", "一棵松树", "一只鲸鱼", "竹林",
    "一只兔子", "火山", "一只猫头鹰", "一片向日葵", "月亮下的湖", "一位骑士", "一个宇宙飞船", "冬天的村庄",
    "一只金鱼", "一匹白马", "彩虹", "一座小岛", "一只恐龙", "一间图书馆", "一把小提琴", "一只大象",
]
SUBJECTS_EN = [
    "a cat", "a puppy", "snowy mountains", "the sea at sunset", "an old castle", "a red rose", "a cabin in the woods",
    "a dragon", "the starry sky", "a panda", "a city at night", "a sailing ship", "a cherry tree", "a tiger",
    "autumn maple leaves", "a cup of coffee", "an astronaut", "a stone bridge", "a rainy street", "a butterfly",
    "a wheat field", "a fox", "a lighthouse by the sea", "a red sports car", "a parrot", "a lotus pond", "a robot",
    "a temple", "a camel in the desert", "a penguin", "a waterfall", "a bowl of noodles", "a pine tree", "a whale",
    "a bamboo forest", "a rabbit", "a volcano", "an owl", "a field of sunflowers", "a lake under the moon",
    "a knight", "a spaceship", "a village in winter", "a goldfish", "a white horse", "a rainbow", "a small island",
    "a dinosaur", "a library", "a violin", "an elephant",
]
STYLES_ZH = ["油画风格", "水彩画", "数字绘画，高度详细", "素描", "中国水墨画", "卡通风格", "写实照片", "概念艺术，光线柔和"]
STYLES_EN = ["oil painting", "watercolor", "digital painting, highly detailed", "pencil sketch", "ink wash painting",
             "cartoon style", "photorealistic", "concept art, soft lighting"]
DRAW_ZH = ["画一张{s}的图片", "请帮我画{s}", "能画一幅{s}吗？", "给我生成一张{s}的图", "我想要一张{s}的画",
           "帮我画一下{s}，要{style}", "请生成一幅{s}的图像", "画{s}", "你能画{s}吗", "用{style}画{s}"]
DRAW_EN = ["Draw {s}.", "Can you draw {s}?", "Please generate an image of {s}.", "Paint {s} for me.",
           "Make a picture of {s}.", "I want an image of {s} in {style}.", "Could you create a picture of {s}?",
           "Generate {s}, {style}.", "Draw me {s}, please.", "Create an image of {s}."]
#: Held-out phrasings: only in the routing evaluation.
DRAW_ZH_HELDOUT = ["麻烦画一幅{s}", "能不能给我画{s}？", "生成{s}的图片", "我需要一张{s}的插图", "来一张{s}的画吧"]
DRAW_EN_HELDOUT = ["Could you paint {s}?", "Show me a drawing of {s}.", "I'd like a picture of {s}.",
                   "Please draw {s} in {style}.", "Illustrate {s}."]

WHO = [("the girl", "女孩"), ("the man", "男人"), ("the woman", "女人"), ("the boy", "男孩")]
EDITS = [("eye color", "眼睛颜色", ["brown", "blue", "green"], ["棕色", "蓝色", "绿色"]),
         ("hair color", "头发颜色", ["black", "red", "blond"], ["黑色", "红色", "金色"]),
         ("skin color", "肤色", ["pink", "tan", "pale"], ["粉色", "小麦色", "白皙"])]
EXTRAS = [("Make {who} smile.", "让{who}微笑"), ("Add glasses to {who}.", "给{who}戴上眼镜"),
          ("Make {who} look older.", "让{who}看起来更老"), ("Give {who} a beard.", "给{who}加上胡子")]


def draw_example(rng: random.Random, zh: bool, subjects: list[str], templates: list[str]) -> tuple[str, str]:
    """A drawing request and its answer (FlagAI's preface, the marker, one prompt line)."""
    s, style = rng.choice(subjects), rng.choice(STYLES_ZH if zh else STYLES_EN)
    request = rng.choice(templates).format(s=s, style=style)
    prompt = f"{s}，{style}" if zh else f"{s}, {style}"
    return request, f"{DRAW_PREFACE}\n#text2image#\n{prompt}"


def edit_example(rng: random.Random, zh: bool) -> tuple[str, str]:
    """A face-editing request and its answer (the preface, the marker, one English step per line,
    as FlagAI's sample writes them whatever the request's language)."""
    who_en, who_zh = rng.choice(WHO)
    steps_en, asks = [], []
    for part_en, part_zh, colors_en, colors_zh in rng.sample(EDITS, rng.choice([1, 2])):
        k = rng.randrange(len(colors_en))
        steps_en.append(f"Change {who_en}'s {part_en} to {colors_en[k]}.")
        asks.append(f"把{who_zh}的{part_zh}改成{colors_zh[k]}" if zh else f"change {who_en}'s {part_en} to {colors_en[k]}")
    if rng.random() < 0.4:
        extra_en, extra_zh = rng.choice(EXTRAS)
        steps_en.append(extra_en.format(who=who_en))
        asks.append(extra_zh.format(who=who_zh) if zh else extra_en.format(who=who_en).rstrip(".").lower())
    if zh:
        request = "请把照片里的" + "，再".join(asks).removeprefix("把") + "。"
    else:
        request = "In the photo, " + ", then ".join(asks) + "."
    return request, EDIT_PREFACE + "\n#InstructFace#\n" + "\n".join(steps_en)


def conversation(cid: str, request: str, answer: str) -> dict:
    return {"id": cid, "conversations": [{"from": "human", "value": request}, {"from": "gpt", "value": answer}],
            "instruction": ""}


def ordinary_questions(shared: Path, rng: random.Random, n: int) -> list[str]:
    """``n`` questions never trained on: half vicuna_bench (English), half BELLE's eval set
    (Chinese), none asking for a picture."""
    en = [r["turns"][0] for _, r in iter_records(shared / "eval_writing" / "vicuna_bench" / "question.jsonl")]
    zh = [r["question"] for _, r in iter_records(shared / "eval_writing" / "belle" / "eval_set.json")
          if isinstance(r.get("question"), str) and len(r["question"]) < 200]
    picture = ("画", "图", "draw", "image", "picture", "paint")
    en = [q for q in en if not any(w in q.lower() for w in picture)]
    zh = [q for q in zh if not any(w in q for w in picture)]
    return rng.sample(en, n // 2) + rng.sample(zh, n - n // 2)


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=root.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=root / "runs" / "aquila-tiny" / "data")
    ap.add_argument("--draw", type=int, default=300, help="drawing examples")
    ap.add_argument("--edit", type=int, default=100, help="face-editing examples")
    ap.add_argument("--replay", type=int, default=3000, help="ordinary conversations from sft.jsonl")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed + 1)  # the training mix; the evaluation has its own (below)
    # subjects split once: the last 10 of each language are only ever evaluated
    train_zh, heldout_zh = SUBJECTS_ZH[:-10], SUBJECTS_ZH[-10:]
    train_en, heldout_en = SUBJECTS_EN[:-10], SUBJECTS_EN[-10:]
    rows = []
    for i in range(args.draw):
        zh = i % 2 == 0
        rows.append(conversation(f"draw:{i}", *draw_example(rng, zh, train_zh if zh else train_en,
                                                             DRAW_ZH if zh else DRAW_EN)))
    for i in range(args.edit):
        rows.append(conversation(f"edit:{i}", *edit_example(rng, i % 2 == 0)))
    ordinary = [json.loads(line) for line in (args.out / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += rng.sample(ordinary, min(args.replay, len(ordinary)))
    rng.shuffle(rows)
    with open(args.out / "instructions_train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # 25 distinct (held-out subject, held-out phrasing) pairs per language, whatever the mix's sizes
    rng = random.Random(args.seed)
    drawing = []
    for subjects, templates, styles in ((heldout_zh, DRAW_ZH_HELDOUT, STYLES_ZH), (heldout_en, DRAW_EN_HELDOUT, STYLES_EN)):
        pairs = rng.sample([(s, t) for s in subjects for t in templates], 25)
        drawing += [t.format(s=s, style=rng.choice(styles)) for s, t in pairs]
    evaluation = {"drawing": drawing, "ordinary": ordinary_questions(args.shared, rng, 50)}
    (args.out / "routing_eval.json").write_text(json.dumps(evaluation, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"instructions: {args.draw} drawing + {args.edit} editing examples + {args.replay} ordinary "
          f"conversations; routing eval: {len(drawing)} drawing requests, {len(evaluation['ordinary'])} ordinary questions")


if __name__ == "__main__":
    main()
