"""Routing evaluation pools for the aquila-tiny recipe beyond ``instructions.py``'s seeds (attempts 23-24
in docs/aquila-tiny.md).

Held-out drawing requests and ordinary questions never used before each pool was made. A pool's
subjects and phrasings were written before any model was scored on it and appear in no training
request (checked below: a subject's words, and a phrasing's whole template string, so a near-paraphrase
of a training phrasing can pass); its ordinary questions are MT-Bench first turns (never used in this
project's training) and BELLE eval questions, none of them in an earlier evaluation set given as an
argument. Pool 2 was written before attempt 23 was scored, pool 3 before attempt 24 was trained.

Pool 4 (written before attempt 26 was trained) is harder on both sides: half its drawing subjects are
scenes (who and an action), and half its ordinary questions are about art or images but want text
(painters, paintings, art forms, image software, idioms with a picture word), from frames and fillers
that share nothing with ``decision.py``'s ``--art`` pool (checked below); the other half are MT-Bench,
vicuna_bench and BELLE questions unused by earlier sets.

Pool 5 (written after attempt 26 had been scored, to decide between 25f and 26i) adds conversation
contexts (``routing.py --context``): three system messages, none in ``decision.py``'s ``SYSTEMS``,
and three earlier exchanges, none in ``sft.jsonl``. Its English ordinary questions are MBPP task texts, as
no MT-Bench or vicuna_bench question is left unused.

    python recipes/aquila-tiny/pools.py [--pool 5] [--sft sft.jsonl] OUT.json EARLIER_routing_eval.json ...
"""
import argparse, json, os, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import instructions as ins
import decision as D
from aquilachat.io import iter_records
SHARED = Path(os.environ.get("AQUILACHAT_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
#: per pool: Chinese and English subjects, Chinese and English phrasings, the subjects' words
POOLS = {
    2: (["一只章鱼", "一座风车", "一只考拉", "一只火烈鸟", "一个热气球", "一座金字塔", "一个南瓜", "一支冰淇淋", "一座摩天轮", "一只长颈鹿"],
        ["an octopus", "a windmill", "a koala", "a flamingo", "a hot air balloon", "a pyramid", "a pumpkin",
         "an ice cream cone", "a Ferris wheel", "a giraffe"],
        ["我想看看{s}的图片", "能给我一幅{s}的画吗", "你来画{s}吧", "画幅{s}给我看看", "用画笔描绘{s}，{style}"],
        ["Can I see a painting of {s}?", "I want you to draw {s}.", "Paint a scene with {s}.",
         "Could I have an image of {s}?", "Do a {style} painting of {s}."],
        ["章鱼", "风车", "考拉", "火烈鸟", "热气球", "金字塔", "南瓜", "冰淇淋", "摩天轮", "长颈鹿", "octopus", "windmill",
         "koala", "flamingo", "balloon", "pyramid", "pumpkin", "ice cream", "ferris", "giraffe"]),
    3: (["一只蜗牛", "一只水母", "一座树屋", "一只啄木鸟", "一棵仙人掌", "一群萤火虫", "一只海马", "一朵蘑菇", "一只蜻蜓", "一棵棕榈树"],
        ["a snail", "a jellyfish", "a treehouse", "a woodpecker", "a cactus", "a swarm of fireflies", "a seahorse",
         "a mushroom", "a dragonfly", "a palm tree"],
        ["把{s}画出来", "请作一幅{s}的画，{style}", "想请你画一下{s}", "能不能帮忙画个{s}", "给{s}画一张像"],
        ["Please sketch {s} for me.", "Can you paint a picture of {s} in {style}?", "I'd love a drawing of {s}.",
         "Create a {style} image of {s}.", "Draw what {s} looks like."],
        ["蜗牛", "水母", "树屋", "啄木鸟", "仙人掌", "萤火虫", "海马", "蘑菇", "蜻蜓", "棕榈树", "snail", "jellyfish",
         "treehouse", "woodpecker", "cactus", "firefl", "seahorse", "mushroom", "dragonfly", "palm"]),
    4: (["一只北极熊", "一座钟楼", "一个沙漏", "一只甲虫", "一辆拖拉机", "一群老人在院子里打太极拳", "几个小朋友在操场上跳绳",
         "一位妈妈在窗边织毛衣", "一只浣熊在垃圾桶旁找吃的", "一位邮递员骑车穿过小镇"],
        ["a polar bear", "a clock tower", "an hourglass", "a beetle", "a tractor", "old people doing tai chi in a courtyard",
         "kids jumping rope in a schoolyard", "a mother knitting by the window", "a raccoon digging through a trash can",
         "a mail carrier cycling through a small town"],
        ["替我画{s}", "我想看一幅描绘{s}的画", "你能用图画表现{s}吗？", "请以{style}的方式画{s}", "给我来幅{s}"],
        ["I'd be grateful for a painting of {s}.", "I need an image showing {s}.", "Make a quick sketch of {s}.",
         "Can you depict {s} in {style}?", "Doodle {s} for me."],
        ["北极熊", "钟楼", "沙漏", "甲虫", "拖拉机", "太极", "跳绳", "毛衣", "浣熊", "邮递员", "polar", "clock tower",
         "hourglass", "beetle", "tractor", "tai chi", "jumping rope", "knitting", "raccoon", "mail carrier"]),
    5: (["一只犰狳", "一把小提琴", "一只鹈鹕", "一台缝纫机", "一个稻草人", "一位厨师在餐馆里颠勺", "两个小孩在池塘边捉蝌蚪",
         "一位老爷爷在树下拉二胡", "一只水獭在河里抓鱼", "一群学生在图书馆里自习"],
        ["an armadillo", "a violin", "a pelican", "a sewing machine", "a scarecrow", "a chef tossing noodles in a wok",
         "two children catching tadpoles by a pond", "a grandfather playing the erhu under a tree",
         "an otter catching fish in a river", "students studying in a library"],
        ["帮我画出{s}", "能否绘制一张{s}的图？", "我需要一张{s}的插画", "用{style}画{s}好吗", "麻烦画一下{s}"],
        ["Could you sketch {s}?", "Please produce an illustration of {s}.", "I want a {style} drawing of {s}.",
         "Show me a picture of {s}.", "Would you paint {s} for me?"],
        ["犰狳", "小提琴", "鹈鹕", "缝纫机", "稻草人", "颠勺", "蝌蚪", "二胡", "水獭", "图书馆", "armadillo", "violin", "pelican",
         "sewing machine", "scarecrow", "wok", "tadpole", "erhu", "otter", "library"]),
}
#: pool 5's conversation contexts (routing.py --context): system messages that are not in decision.py's
#: SYSTEMS (asserted below) and earlier exchanges that are not in sft.jsonl (checked against --sft)
CONTEXT5 = {"systems": ["You are a concise assistant who answers clearly.", "你是一位知识渊博的中文助手。",
                        "Be polite and helpful."],
            "exchanges": [["Hi, how are you today?", "I'm doing well, thank you! How can I help you?"],
                          ["今天天气怎么样？", "抱歉，我无法获取实时天气信息，你可以查看当地的天气预报。"],
                          ["What is 12 times 12?", "12 times 12 is 144."]]}
assert not set(CONTEXT5["systems"]) & set(D.SYSTEMS)
#: pool 4's ordinary questions about art or images that want text: frames, fillers, idioms
ART4_FRAMES_EN = ["Can you explain what makes {work} special?", "I want to learn about the life of {painter}.",
                  "What materials do I need for {form}?", "Is it hard to {task}?",
                  "Summarize who {painter} was in three sentences."]
ART4_FRAMES_ZH = ["{work}有什么艺术价值？", "请讲讲{painter}的生平。", "学{form}需要准备哪些工具？", "{task}难不难？",
                  "用三句话介绍{painter}。"]
ART4_FILL_EN = {"painter": ["Raphael", "Paul Cezanne", "Gustav Klimt", "Georgia O'Keeffe", "Jackson Pollock"],
                "work": ["The Birth of Venus", "American Gothic", "Guernica", "The Great Wave off Kanagawa",
                         "The Starry Night"],
                "form": ["mural painting", "pop art", "animation", "landscape photography", "charcoal drawing"],
                "task": ["draw a pie chart in Excel", "rotate an image with Pillow", "add text to a photo in Canva",
                         "resize a picture on a Mac", "draw a histogram with seaborn"]}
ART4_FILL_ZH = {"painter": ["顾恺之", "黄公望", "郑板桥", "塞尚", "拉斐尔"],
                "work": ["《韩熙载夜宴图》", "《星月夜》", "《洛神赋图》", "《虢国夫人游春图》", "《格尔尼卡》"],
                "form": ["壁画", "动画", "年画", "剪纸", "风景摄影"],
                "task": ["用Excel画饼图", "用PIL旋转图片", "给图片加水印", "用seaborn画直方图", "在手机上修图"]}
ART4_IDIOMS = ["What does 'the big picture' mean?", "“胸有成竹”这个成语和画竹子有什么关系？"]
_train_art = set(D.ART_FRAMES_EN + D.ART_FRAMES_ZH + D.ART_IDIOMS) | {
    v for fill in (D.ART_FILL_EN, D.ART_FILL_ZH) for vs in fill.values() for v in vs}
_pool_art = set(ART4_FRAMES_EN + ART4_FRAMES_ZH + ART4_IDIOMS) | {
    v for fill in (ART4_FILL_EN, ART4_FILL_ZH) for vs in fill.values() for v in vs}
assert not _train_art & _pool_art, f"pool 4 art question parts in training: {_train_art & _pool_art}"


def art4(rng: random.Random, frames: list[str], fill: dict, n: int) -> list[str]:
    """``n`` distinct pool-4 art questions: each frame with one of its fillers."""
    every = [f.format(**{k: v}) for f in frames for k in [f[f.index("{") + 1: f.index("}")]] for v in fill[k]]
    return rng.sample(every, n)


ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--pool", type=int, default=2, choices=sorted(POOLS))
ap.add_argument("out")
ap.add_argument("earlier", nargs="*", help="earlier routing_eval.json files whose questions are left out")
ap.add_argument("--sft", help="pool 5: sft.jsonl, checked to hold none of the pool's earlier exchanges")
args = ap.parse_args()
if args.pool == 5 and not args.sft:
    ap.error("--pool 5 needs --sft runs/aquila-tiny/data/sft.jsonl (its exchanges are checked against it)")
SUBJ_ZH, SUBJ_EN, PHR_ZH, PHR_EN, WORDS = POOLS[args.pool]
# no training drawing request (every pool instructions.py and decision.py draw from) holds a word or phrasing of the pool
rng = random.Random(0)
train = [D.positive(rng, 0.5, True) for _ in range(20000)]
train += [t for t in ins.DRAW_ZH + ins.DRAW_EN + D.MORE_DRAW_ZH + D.MORE_DRAW_EN]
clash = sorted({w for t in train for w in WORDS if w in t.lower()})
assert not clash, f"pool subject in training: {clash}"
assert not set(PHR_ZH + PHR_EN) & set(ins.DRAW_ZH + ins.DRAW_EN + D.MORE_DRAW_ZH + D.MORE_DRAW_EN + ins.DRAW_ZH_HELDOUT + ins.DRAW_EN_HELDOUT)
rng = random.Random(2026 if args.pool == 2 else 2026 + args.pool)
drawing = []
for subjects, phrasings, styles in ((SUBJ_ZH, PHR_ZH, ins.STYLES_ZH), (SUBJ_EN, PHR_EN, ins.STYLES_EN)):
    pairs = rng.sample([(s, t) for s in subjects for t in phrasings], 25)
    drawing += [t.format(s=s, style=rng.choice(styles)) for s, t in pairs]
seen = set()
for f in args.earlier:
    seen |= set(json.load(open(f))["ordinary"])
en = ins.no_picture([r["turns"][0] for _, r in iter_records(SHARED / "eval_writing" / "mt_bench" / "question.jsonl")
                     if len(r["turns"][0]) < 400 and (args.pool == 2 or r["turns"][0] not in seen)])
# (pool 2 did not check its MT-Bench questions against the earlier sets; kept so that it regenerates byte for byte)
zh = [q for q in ins.belle_questions(SHARED) if q not in seen]
extra = {}
if args.pool == 5:  # no unused MT-Bench or vicuna_bench question is left: MBPP's task texts (never trained on)
    mbpp = ins.no_picture([r["text"] for _, r in iter_records(SHARED / "code_eval" / "mbpp.jsonl") if r["text"] not in seen])
    ordinary = rng.sample(mbpp, 25) + rng.sample(zh, 25)
    sft = {turn.get("value") for _, r in iter_records(Path(args.sft)) for turn in r.get("conversations", [])}
    clash = sorted(sft & {s for e in CONTEXT5["exchanges"] for s in e})
    if clash:
        sys.exit(f"pools.py: {args.sft} holds pool 5's exchange text {clash}: pool 5 exchange in sft.jsonl")
    extra = CONTEXT5
elif args.pool == 4:  # MT-Bench has too few unused questions left: vicuna_bench's unused ones join them
    en += ins.no_picture([r["turns"][0] for _, r in iter_records(SHARED / "eval_writing" / "vicuna_bench" / "question.jsonl")
                          if r["turns"][0] not in seen])
    ordinary = (art4(rng, ART4_FRAMES_EN, ART4_FILL_EN, 12) + art4(rng, ART4_FRAMES_ZH, ART4_FILL_ZH, 11) + ART4_IDIOMS
                + rng.sample(en, 13) + rng.sample(zh, 12))
else:
    ordinary = rng.sample(en, 25) + rng.sample(zh, 25)
json.dump({"drawing": drawing, "ordinary": ordinary, **extra}, open(args.out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
print(len(drawing), len(ordinary), len(en), len(zh))
