"""Step 7 of the aquila-tiny recipe (not run by default): data to teach AquilaChat's image instructions.

Writes into OUT (default ``runs/aquila-tiny/data``):

* ``instructions_train.jsonl`` — drawing and face-editing requests, Chinese and English, answered
  in the format of FlagAI's SFT samples (``sft_samples.jsonl``: its two prefaces, then
  ``\\n#text2image#\\n`` and one image prompt, or ``\\n#InstructFace#\\n`` and one edit step per
  line), mixed with ``--replay`` ordinary conversations from ``sft.jsonl`` so that ordinary
  questions keep their ordinary answers (FlagAI format). The image prompt is the request's own
  subject (plus its style when the request names one), in the request's language, as FlagAI's
  samples turn the request into the prompt; the subjects are mostly composed from parts (measure
  word, adjective, noun, place: about 600 distinct ones in 1,000 examples), so that a 3M-parameter
  model has to copy the subject rather than recall a list. The ordinary conversations include every one of
  ``sft.jsonl`` whose question mentions pictures, drawing or photos (hard negatives: they want text);
* ``routing_eval.json`` — 50 held-out drawing requests (subjects and phrasings never trained on:
  no training request contains a word of a held-out subject, checked) and 50 ordinary questions
  (vicuna_bench and BELLE's eval set, never trained on), for ``recipes/aquila-tiny/routing.py``.

Everything is a pure function of ``--seed``.

    python recipes/aquila-tiny/instructions.py [--shared ../shared/data] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from aquilachat.instructions import MARKERS as _MARKERS
from aquilachat.chat_format import render_for_training
from aquilachat.io import iter_records
from aquilachat.tokenizer import Tokenizer

MARKERS = tuple(_MARKERS.values())
#: Words that make an ordinary question a hard negative (it mentions pictures, but wants text).
PICTURE_WORDS = ("画", "图", "照片", "draw", "image", "picture", "paint", "photo", "art")

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
           "帮我画一下{s}，要{style}", "请生成一幅{s}的图像", "画{s}", "你能画{s}吗", "用{style}画{s}",
           "画一幅{s}", "帮我生成一张{s}的照片", "请画出{s}", "给我画一张{s}", "请用{style}画一张{s}",
           "我想看{s}的画，请画一张", "请为我创作一幅{s}的画", "能帮我画{s}吗？", "画一张{s}，{style}", "绘制{s}",
           "请绘制一幅{s}的图", "给我画个{s}", "生成一幅{s}的画，{style}", "帮忙画{s}", "你可以画一张{s}吗？"]
DRAW_EN = ["Draw {s}.", "Can you draw {s}?", "Please generate an image of {s}.", "Paint {s} for me.",
           "Make a picture of {s}.", "I want an image of {s} in {style}.", "Could you create a picture of {s}?",
           "Generate {s}, {style}.", "Draw me {s}, please.", "Create an image of {s}.",
           "Please paint a picture of {s}.", "Can you make an image of {s}?", "Generate a picture of {s}.",
           "I need an image of {s}.", "Draw a picture of {s} in {style}.", "Sketch {s}.",
           "Create artwork of {s}, {style}.", "Would you draw {s} for me?", "Render {s} in {style}.",
           "Paint me {s}.", "Please draw me a picture of {s}.", "Make an image of {s}, {style}.",
           "Can you generate a picture of {s}?", "Draw {s} for me, please.", "Create a painting of {s}."]
#: Held-out phrasings: only in the routing evaluation.
DRAW_ZH_HELDOUT = ["麻烦画一幅{s}", "能不能给我画{s}？", "生成{s}的图片", "我需要一张{s}的插图", "来一张{s}的画吧"]
DRAW_EN_HELDOUT = ["Could you paint {s}?", "Show me a drawing of {s}.", "I'd like a picture of {s}.",
                   "Please draw {s} in {style}.", "Illustrate {s}."]

# More training subjects, built from parts, so that the model learns to copy the request's subject
# into the prompt line rather than to recall a few dozen memorised ones. No part names anything in
# the held-out subjects (checked by ``heldout_overlap``).
NOUNS_ZH = [("只", "猫"), ("只", "小狗"), ("只", "熊猫"), ("只", "老虎"), ("只", "蝴蝶"), ("只", "狐狸"), ("只", "鹦鹉"),
            ("只", "企鹅"), ("只", "兔子"), ("只", "猫头鹰"), ("只", "松鼠"), ("只", "狮子"), ("只", "小鸟"), ("只", "乌龟"),
            ("只", "青蛙"), ("只", "鸭子"), ("只", "孔雀"), ("只", "猴子"), ("只", "小鹿"), ("只", "天鹅"), ("只", "狼"),
            ("只", "刺猬"), ("只", "蜜蜂"), ("条", "龙"), ("条", "鲸鱼"), ("条", "小河"), ("条", "海豚"), ("条", "蛇"),
            ("座", "城堡"), ("座", "石桥"), ("座", "寺庙"), ("座", "灯塔"), ("座", "高塔"), ("座", "花园"),
            ("栋", "木屋"), ("棵", "松树"), ("棵", "樱花树"), ("棵", "苹果树"), ("棵", "柳树"), ("朵", "红玫瑰"),
            ("朵", "向日葵"), ("朵", "荷花"), ("辆", "跑车"), ("辆", "自行车"), ("辆", "火车"), ("艘", "帆船"),
            ("艘", "小船"), ("个", "机器人"), ("个", "雪人"), ("个", "风筝"), ("个", "灯笼"), ("个", "苹果"),
            ("杯", "咖啡"), ("杯", "热茶"), ("碗", "面条"), ("位", "骑士"), ("位", "老人"), ("位", "渔夫"),
            ("位", "厨师"), ("位", "宇航员"), ("个", "小女孩"), ("把", "雨伞"), ("顶", "帐篷"), ("盏", "台灯")]
ADJ_ZH = ["可爱的", "巨大的", "小小的", "红色的", "蓝色的", "黑色的", "金色的", "古老的", "发光的", "快乐的", "孤独的",
          "睡着的", "绿色的", "紫色的", "胖胖的"]
PLACES_ZH = ["雪地里", "海边", "森林里", "草地上", "雨中", "月光下", "山顶上", "城市里", "花丛中", "沙漠里", "湖边", "太空中"]
SCENES_ZH = ["雪山", "星空", "城市夜景", "下雨的街道", "长城", "一片麦田", "瀑布", "竹林", "火山", "日落时的大海",
             "秋天的枫叶", "森林里的小木屋", "沙漠中的骆驼", "荷花池", "月亮下的湖", "樱花盛开的公园", "雾中的森林",
             "海边的沙滩", "夏天的田野", "热闹的集市", "安静的小巷", "春天的花园", "海底世界", "黄昏的草原"]
NOUNS_EN = ["cat", "puppy", "panda", "tiger", "butterfly", "fox", "parrot", "penguin", "rabbit", "owl", "squirrel",
            "lion", "bird", "turtle", "frog", "duck", "peacock", "monkey", "deer", "swan", "wolf", "hedgehog", "bee",
            "dragon", "whale", "river", "dolphin", "snake", "castle", "stone bridge", "temple", "lighthouse", "tower",
            "garden", "cabin", "pine tree", "cherry tree", "apple tree", "willow", "rose", "sunflower", "lotus",
            "sports car", "bicycle", "train", "sailing ship", "boat", "robot", "snowman", "kite", "lantern", "apple",
            "cup of coffee", "cup of tea", "bowl of noodles", "knight", "old man", "fisherman", "chef", "astronaut",
            "little girl", "umbrella", "tent", "lamp"]
ADJ_EN = ["cute", "giant", "tiny", "red", "blue", "black", "golden", "ancient", "glowing", "happy", "lonely",
          "sleeping", "green", "purple", "fluffy"]
PLACES_EN = ["in the snow", "by the sea", "in the forest", "on the grass", "in the rain", "under the moon",
             "on a mountain top", "in a big city", "among flowers", "in the desert", "by a lake", "in outer space"]
SCENES_EN = ["snowy mountains", "the starry sky", "a city at night", "a rainy street", "the Great Wall", "a wheat field",
             "a waterfall", "a bamboo forest", "a volcano", "the sea at sunset", "autumn maple leaves",
             "a cabin in the woods", "a camel in the desert", "a lotus pond", "a lake under the moon",
             "a park with cherry blossoms", "a forest in the fog", "a sandy beach", "a summer meadow",
             "a busy market", "a quiet alley", "a spring garden", "the bottom of the sea", "the grassland at dusk"]
#: Words of the held-out subjects: no training subject may contain one.
HELDOUT_WORDS = ["大象", "小提琴", "图书馆", "恐龙", "岛", "彩虹", "马", "金鱼", "村庄", "飞船", "elephant", "violin",
                 "library", "dinosaur", "island", "rainbow", "horse", "goldfish", "village", "spaceship"]


def compose_subject(rng: random.Random, zh: bool) -> str:
    """One training subject: a scene, or a (measure word +) noun with an optional adjective and place."""
    if rng.random() < 0.2:
        return rng.choice(SCENES_ZH if zh else SCENES_EN)
    adj = rng.choice(ADJ_ZH if zh else ADJ_EN) if rng.random() < 0.6 else ""
    place = rng.choice(PLACES_ZH if zh else PLACES_EN) if rng.random() < 0.35 else ""
    if zh:
        measure, noun = rng.choice(NOUNS_ZH)
        subject = f"一{measure}{adj}{noun}"
        return f"{place}的{subject}" if place else subject
    noun = rng.choice(NOUNS_EN)
    words = f"{adj} {noun}" if adj else noun
    subject = ("an " if words[0] in "aeiou" else "a ") + words
    return f"{subject} {place}" if place else subject


def heldout_overlap(texts: list[str]) -> list[str]:
    """The training texts that mention a held-out subject's word (must be none)."""
    return [t for t in texts if any(w in t.lower() for w in HELDOUT_WORDS)]


WHO = [("the girl", "女孩"), ("the man", "男人"), ("the woman", "女人"), ("the boy", "男孩")]
EDITS = [("eye color", "眼睛颜色", ["brown", "blue", "green"], ["棕色", "蓝色", "绿色"]),
         ("hair color", "头发颜色", ["black", "red", "blond"], ["黑色", "红色", "金色"]),
         ("skin color", "肤色", ["pink", "tan", "pale"], ["粉色", "小麦色", "白皙"])]
EXTRAS = [("Make {who} smile.", "让{who}微笑"), ("Add glasses to {who}.", "给{who}戴上眼镜"),
          ("Make {who} look older.", "让{who}看起来更老"), ("Give {who} a beard.", "给{who}加上胡子")]


def draw_example(rng: random.Random, zh: bool, subject: str, templates: list[str]) -> tuple[str, str]:
    """A drawing request and its answer: FlagAI's preface, the marker, and one prompt line that is
    the request's own subject (plus its style, when the request names one), in its language, as
    FlagAI's samples turn the request into the prompt."""
    style = rng.choice(STYLES_ZH if zh else STYLES_EN)
    template = rng.choice(templates)
    request = template.format(s=subject, style=style)
    if "{style}" in template:
        prompt = f"{subject}，{style}" if zh else f"{subject}, {style}"
    else:
        prompt = subject
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


#: Minimal pairs (``--pairs``): ordinary requests about a drawing request's own subject with a verb
#: that asks for text (a poem, a description, a story, a list), so that only the drawing verb or
#: object (画, 图, draw, paint, picture, image...) tells a drawing request from an ordinary one. Some
#: use the drawing requests' other verbs (生成, generate, create, make) with a text object.
#: ``{s}``: the subject; each kind has its answers, templated on the subject. No answer begins with
#: the subject on a line of its own followed by more lines (a drawing answer's prompt line is the
#: subject and then the end of the turn).
PAIR_REQUESTS_ZH = {
    "poem": ["写一首关于{s}的诗", "请写一首描写{s}的小诗", "能为{s}写一首诗吗？", "以{s}为题写一首诗"],
    "describe": ["介绍一下{s}", "描述一下{s}", "请用几句话描述{s}", "给我讲讲{s}", "我想了解{s}",
                 "请生成一段关于{s}的描述", "生成一段描写{s}的文字"],
    "story": ["写一个关于{s}的故事", "请编一个关于{s}的小故事", "给我讲一个{s}的故事", "生成一个关于{s}的故事",
              "以{s}为主角写一篇短文"],
    "words": ["列出三个和{s}有关的词语", "用三个词形容{s}"],
}
PAIR_REQUESTS_EN = {
    "poem": ["Write a poem about {s}.", "Compose a short poem about {s}.", "Can you write a poem about {s}?",
             "Write me a few lines of verse about {s}."],
    "describe": ["Describe {s}.", "Describe {s} in a few sentences.", "Tell me about {s}.", "What do you know about {s}?",
                 "Generate a short description of {s}.", "Write a paragraph about {s}.",
                 "Explain what makes {s} interesting."],
    "story": ["Write a story about {s}.", "Write a short story about {s}.", "Create a story about {s}.",
              "Tell me a story about {s}.", "Compose a tale about {s}.", "Make up a story about {s}."],
    "words": ["List three words that describe {s}.", "Give me three words about {s}."],
}
PAIR_ANSWERS_ZH = {
    "poem": ["好的，这是一首关于{s}的小诗：\n\n清晨的阳光里，\n{s}慢慢醒来。\n微风轻轻吹过，\n带来一天的希望。",
             "这是一首写{s}的诗：\n\n我看见{s}，\n像一个温柔的梦。\n时间慢慢走过，\n美好留在心中。",
             "当然可以：\n\n春天还没有来，\n{s}静静地等待。\n世界那么大，\n它有自己的精彩。"],
    "describe": ["{s}给人的第一印象往往是安静而美好的。它的形状、颜色和周围的环境结合在一起，让人感到放松。"
                 "很多人喜欢在空闲的时候观察这样的景象，并从中得到灵感。",
                 "好的。{s}常常出现在故事和诗歌中，让人联想到自然、生活和时间的变化。仔细观察，你会发现很多有趣的细节："
                 "光线的明暗、颜色的变化，以及它与周围环境的关系。",
                 "当然可以。说到{s}，人们通常会想到它独特的样子和它带来的感受。它既普通又特别：普通在于我们身边常常能见到"
                 "类似的东西，特别在于每一次看到它都会有新的发现。"],
    "story": ["从前，有{s}。它每天都过着平静的生活。有一天，一阵大风吹来，带来了一个陌生的朋友。它们一起经历了许多有趣的事情，"
              "最后成为了最好的朋友。从那以后，它再也不觉得孤单了。",
              "很久以前，在一个遥远的地方，有{s}。大家都说它很普通，但它一直相信自己可以做成一件了不起的事。"
              "经过很多次失败，它终于做到了。这个故事告诉我们，只要坚持，就会有收获。"],
    "words": ["以下是三个和{s}有关的词语：\n1. 安静\n2. 美好\n3. 温暖", "可以用这三个词形容{s}：宁静、可爱、难忘。"],
}
PAIR_ANSWERS_EN = {
    "poem": ["Here is a short poem about {s}:\n\n{S} in the morning light,\nquiet, simple, shining bright.\n"
             "The world goes by, the hours run,\nit waits there for the rising sun.",
             "Here is a poem about {s}:\n\nI saw {s} one day,\nand time seemed far away.\n"
             "A little moment, calm and clear,\nthat I will keep for many a year.",
             "A few lines about {s}:\n\nSoft and still, {s} stays,\nthrough the nights and through the days.\n"
             "It asks for nothing, gives a smile,\nand makes the world feel worthwhile."],
    "describe": ["{S} is a simple but lovely sight. Its shape and colors fit well with its surroundings, and it gives a "
                 "calm, peaceful feeling. Many people enjoy noticing small details like this in everyday life.",
                 "Sure. When people think of {s}, they usually imagine something quiet and pleasant. It often appears in "
                 "stories and poems, where it stands for nature, memory or the passing of time.",
                 "{S} can be described in a few words: calm, bright and full of small details. Look closely and you "
                 "notice the light, the colors and the way it fits into the world around it."],
    "story": ["Once upon a time, there was {s}. Every day was quiet and the same, until one morning a stranger arrived. "
              "They became friends and shared many adventures. In the end, the two of them learned that friendship "
              "makes every day special.",
              "Long ago, in a faraway land, there was {s}. Everyone thought it was ordinary, but it dreamed of doing "
              "something great. After many tries, it finally succeeded, and everyone learned that patience and courage "
              "pay off."],
    "words": ["Here are three words that describe {s}:\n1. Calm\n2. Bright\n3. Gentle",
              "Three words for {s}: peaceful, lovely and memorable."],
}


def pair_example(rng: random.Random, zh: bool, subject: str) -> tuple[str, str]:
    """An ordinary request about ``subject`` whose verb asks for text, not a picture (the minimal
    pair of a drawing request about the same subject), and a templated ordinary answer."""
    requests, answers = (PAIR_REQUESTS_ZH, PAIR_ANSWERS_ZH) if zh else (PAIR_REQUESTS_EN, PAIR_ANSWERS_EN)
    kind = rng.choice(sorted(requests))
    request = rng.choice(requests[kind]).format(s=subject)
    answer = rng.choice(answers[kind]).format(s=subject, S=subject[:1].upper() + subject[1:])
    return request, answer


#: Subjects beyond the drawing subjects (``--wide``): people, objects, places, food, events, sky, so
#: that both a drawing request and its minimal pair name subjects the drawing set never names and the
#: decision cannot key on the subject noun. No word of a held-out subject (checked with the requests).
WIDE_ZH = ["一位老师", "一位医生", "一位农民", "一位飞行员", "一位科学家", "一位音乐家", "一场足球比赛", "一个生日聚会",
           "一场婚礼", "一间教室", "一家医院", "一个火车站", "一个机场", "一家超市", "一间厨房", "一台电脑", "一部手机",
           "一座老钟", "一双鞋子", "一把木椅", "一架钢琴", "一把吉他", "一个生日蛋糕", "一块披萨", "一碗米饭", "一杯牛奶",
           "一篮水果", "一盘象棋", "一个足球", "一条山路", "一个农场", "一座工厂", "一家面包店", "一座博物馆", "一家酒店",
           "一场暴风雨", "大海", "月亮", "太阳", "一颗彗星", "一颗行星", "一位国王", "一位公主", "一个海盗", "一位魔法师",
           "一名士兵", "一顿家庭晚餐", "一个熟睡的婴儿", "一位奶奶", "一个学生", "一名消防员", "一名警察", "一名护士",
           "一辆公交车", "一辆摩托车", "一架直升机", "一艘潜水艇", "一枚火箭", "一座摩天大楼", "一个游乐园"]
WIDE_EN = ["a teacher", "a doctor", "a farmer", "a pilot", "a scientist", "a musician", "a football match",
           "a birthday party", "a wedding", "a classroom", "a hospital", "a train station", "an airport",
           "a supermarket", "a kitchen", "a computer", "a smartphone", "an old clock", "a pair of shoes",
           "a wooden chair", "a piano", "a guitar", "a birthday cake", "a pizza", "a bowl of rice", "a glass of milk",
           "a basket of fruit", "a chess game", "a soccer ball", "a mountain road", "a farm", "a factory", "a bakery",
           "a museum", "a hotel", "a storm", "the ocean", "the moon", "the sun", "a comet", "a planet", "a king",
           "a princess", "a pirate", "a wizard", "a soldier", "a family dinner", "a sleeping baby", "a grandmother",
           "a student", "a firefighter", "a police officer", "a nurse", "a bus", "a motorcycle", "a helicopter",
           "a submarine", "a rocket", "a skyscraper", "an amusement park"]
#: Polite question forms (``--can``, and a third of the pairs with real answers): ordinary requests
#: asked as "Can you...?", so that "Could you paint X?" is not told from them by the question form.
POLITE_ZH = ["你能{r}吗？", "能{r}吗？", "可以{r}吗？", "你可以{r}吗？", "能不能{r}？", "你能不能{r}？"]
POLITE_EN = ["Can you {r}?", "Could you {r}?", "Would you {r}?", "Could you please {r}?", "Can you please {r}?"]
#: Imperative openings that a polite form can wrap (English: the first word; Chinese: the start).
IMPERATIVE_EN = ("write", "describe", "tell", "explain", "generate", "compose", "create", "make", "give", "list",
                 "name", "suggest", "summarize", "provide", "find", "identify", "translate", "rewrite", "classify",
                 "come", "think", "outline", "compare", "brainstorm", "construct", "design", "calculate", "convert",
                 "edit", "develop", "predict", "choose", "select", "evaluate", "analyze", "propose", "formulate")
IMPERATIVE_ZH = ("写", "介绍", "描述", "给", "讲", "解释", "生成", "列出", "列举", "提供", "总结", "翻译", "编", "以",
                 "用", "推荐", "说明", "分析", "创作", "设计", "比较", "计算", "改写", "找出", "举", "提出", "想")


def polite(rng: random.Random, zh: bool, request: str) -> str | None:
    """``request`` (an imperative: "Describe a cat.", "请介绍一下长城。") as a polite question ("Could you
    describe a cat?", "你能介绍一下长城吗？"), or ``None`` when it does not start with an imperative
    (:data:`IMPERATIVE_EN` / :data:`IMPERATIVE_ZH`) or already is a question."""
    r = request.strip()
    if zh:
        r = r.removeprefix("请").rstrip("。.！!")
        if not r.startswith(IMPERATIVE_ZH) or r.endswith(("？", "?", "吗")) or "\n" in r:
            return None
        return rng.choice(POLITE_ZH).format(r=r)
    first = r.split(maxsplit=1)[0].lower() if r else ""
    if first not in IMPERATIVE_EN or r.endswith("?") or "\n" in r:
        return None
    return rng.choice(POLITE_EN).format(r=r[0].lower() + r[1:].rstrip("."))


def is_zh(text: str) -> bool:
    """Whether ``text`` holds a CJK character (the language of a conversation for the pools)."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


#: Which real questions (``sft.jsonl``) give the pair answers of a kind (``--pair-answers real``): a
#: request for a poem, a story, a few words; the "describe" kind takes any real answer of the language.
KIND_PATTERNS = {"poem": re.compile(r"(写|作|创作).*诗|\b(write|compose|create|generate)\b.*\b(poem|haiku|verse)", re.I),
                 "story": re.compile(r"(写|编|讲|创作).*故事|\b(write|tell|create|generate)\b.*\bstory\b", re.I),
                 "words": re.compile(r"形容|词语|\b(three|3|five|5) (words|adjectives)\b", re.I)}


#: A kind's pool smaller than this gives way to the "describe" pool (too few answers to vary).
MIN_POOL = 10


def real_answer_pools(ordinary: list[dict]) -> dict[tuple[bool, str], list[str]]:
    """Pools of real answers for the pair requests, by (Chinese?, kind): the answers of one-exchange
    conversations whose question matches a kind (:data:`KIND_PATTERNS`; "describe": any answer of at
    least 40 characters in Chinese, 80 in English, not an identity answer), answered in
    the question's language, not opening with a short line followed by more lines (under 15 characters
    in Chinese, 30 in English), with no picture word in question or answer and no identity answer
    (``LMSYS``, Vicuna)."""
    pools: dict[tuple[bool, str], list[str]] = {}
    for r in ordinary:
        if len(r["conversations"]) != 2:
            continue
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if any(w in (q + a).lower() for w in PICTURE_WORDS) or "LMSYS" in a or "Vicuna" in a or not a.strip():
            continue
        zh = is_zh(q)
        if is_zh(a) != zh:  # a translation: the answer is not in the question's language
            continue
        lines = a.strip().split("\n")
        if len(lines) > 1 and len(lines[0]) < (15 if zh else 30):
            # a short first line followed by more (a poem, a list): a drawing answer's prompt line is a
            # short line that ends the turn, and such answers taught the model to go on after it (attempt 18)
            continue
        for kind, pattern in KIND_PATTERNS.items():
            if pattern.search(q):
                pools.setdefault((zh, kind), []).append(a)
        if len(a) >= (40 if zh else 80) and "Aquila" not in a:  # prose, not a one-word or identity answer
            pools.setdefault((zh, "describe"), []).append(a)
    return pools


def pair_example_real(rng: random.Random, zh: bool, subject: str,
                      pools: dict[tuple[bool, str], list[str]]) -> tuple[str, str]:
    """As :func:`pair_example`, but the answer is a real ``sft.jsonl`` answer of the request's kind
    and language (:func:`real_answer_pools`; it need not name the subject), and a third of the
    requests are asked politely (:func:`polite`)."""
    requests = PAIR_REQUESTS_ZH if zh else PAIR_REQUESTS_EN
    kind = rng.choice(sorted(requests))
    request = rng.choice(requests[kind]).format(s=subject)
    if rng.random() < 1 / 3:
        request = polite(rng, zh, request) or request
    pool = pools.get((zh, kind), [])
    pool = pool if len(pool) >= MIN_POOL else pools[(zh, "describe")]
    return request, rng.choice(pool)


def conversation(cid: str, request: str, answer: str) -> dict:
    return {"id": cid, "conversations": [{"from": "human", "value": request}, {"from": "gpt", "value": answer}],
            "instruction": ""}


#: Words that keep a question out of the ordinary half of a routing evaluation (it may want a picture).
EVAL_PICTURE_WORDS = ("画", "图", "draw", "image", "picture", "paint")


def no_picture(questions: list[str], *, fold_case: bool = True) -> list[str]:
    """``questions`` less those with an :data:`EVAL_PICTURE_WORDS` word (case-insensitive unless
    ``fold_case`` is false, as the Chinese half has always been filtered)."""
    return [q for q in questions if not any(w in (q.lower() if fold_case else q) for w in EVAL_PICTURE_WORDS)]


def belle_questions(shared: Path) -> list[str]:
    """BELLE's eval-set questions under 200 characters that do not ask for a picture."""
    return no_picture([r["question"] for _, r in iter_records(shared / "eval_writing" / "belle" / "eval_set.json")
                       if isinstance(r.get("question"), str) and len(r["question"]) < 200], fold_case=False)


def ordinary_questions(shared: Path, rng: random.Random, n: int) -> list[str]:
    """``n`` questions never trained on: half vicuna_bench (English), half BELLE's eval set
    (Chinese), none asking for a picture."""
    en = no_picture([r["turns"][0] for _, r in iter_records(shared / "eval_writing" / "vicuna_bench" / "question.jsonl")])
    return rng.sample(en, n // 2) + rng.sample(belle_questions(shared), n - n // 2)


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=root.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=root / "runs" / "aquila-tiny" / "data")
    ap.add_argument("--draw", type=int, default=1000, help="drawing examples")
    ap.add_argument("--edit", type=int, default=250, help="face-editing examples")
    ap.add_argument("--replay", type=int, default=2750, help="ordinary conversations from sft.jsonl")
    ap.add_argument("--replay-max-tokens", type=int, default=0,
                    help="only ordinary conversations at most this long in the aquila-chat template (0: any)")
    ap.add_argument("--tokenizer", type=Path, default=root / "runs" / "aquila-tiny" / "tokenizer",
                    help="the tokenizer that measures --replay-max-tokens")
    ap.add_argument("--pairs", type=int, default=0,
                    help="minimal pairs: ordinary requests about the subjects of the first --pairs drawing examples "
                         "(cycling) with a verb that asks for text (pair_example)")
    ap.add_argument("--pair-answers", choices=("template", "real"), default="template",
                    help="answers of the minimal pairs: two or three templates a kind (pair_example) or real "
                         "sft.jsonl answers of the kind (pair_example_real)")
    ap.add_argument("--wide", type=int, default=0,
                    help="more drawing examples about WIDE_ZH / WIDE_EN subjects (not drawing subjects); the "
                         "pairs cycle over these subjects too")
    ap.add_argument("--can", type=int, default=0,
                    help="ordinary sft.jsonl conversations whose imperative question is asked politely "
                         "(\"Could you...?\", \"你能...吗？\"), with their real answers")
    ap.add_argument("--name", default="instructions_train.jsonl", help="file name of the training mix in OUT")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the evaluation set")
    ap.add_argument("--mix-seed", type=int, default=None, help="seed of the training mix (default: --seed + 1)")
    args = ap.parse_args()
    # the training mix; the evaluation has its own generator (below), so it is the same for every mix
    rng = random.Random(args.seed + 1 if args.mix_seed is None else args.mix_seed)
    # subjects split once: the last 10 of each language are only ever evaluated
    train_zh, heldout_zh = SUBJECTS_ZH[:-10], SUBJECTS_ZH[-10:]
    train_en, heldout_en = SUBJECTS_EN[:-10], SUBJECTS_EN[-10:]
    assert not set(DRAW_ZH + DRAW_EN) & set(DRAW_ZH_HELDOUT + DRAW_EN_HELDOUT)
    rows, subjects = [], []
    for i in range(args.draw):
        zh = i % 2 == 0
        if rng.random() < 0.25:
            subject = rng.choice(train_zh if zh else train_en)
        else:
            subject = compose_subject(rng, zh)
        subjects.append((zh, subject))
        rows.append(conversation(f"draw:{i}", *draw_example(rng, zh, subject, DRAW_ZH if zh else DRAW_EN)))
    # ordinary conversations (sft.jsonl less any with a marker; only short ones with --replay-max-tokens)
    ordinary = [json.loads(line) for line in (args.out / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    ordinary = [r for r in ordinary if not any(m in t["value"] for t in r["conversations"] for m in MARKERS)]
    if args.replay_max_tokens:
        tok = Tokenizer.from_dir(args.tokenizer)
        ordinary = [r for r in ordinary
                    if len(render_for_training(tok, r["conversations"], "aquila-chat")[0]) <= args.replay_max_tokens]
    mix_seed = args.seed + 1 if args.mix_seed is None else args.mix_seed
    # --wide and --can have their own generators too: a mix without them is the same as before
    wide_rng = random.Random(f"wide:{mix_seed}")
    for i in range(args.wide):
        zh = i % 2 == 0
        subject = wide_rng.choice(WIDE_ZH if zh else WIDE_EN)
        subjects.append((zh, subject))
        rows.append(conversation(f"wide:{i}", *draw_example(wide_rng, zh, subject, DRAW_ZH if zh else DRAW_EN)))
    # the pairs have their own generator, so that a mix without them is the same as before they existed
    pair_rng = random.Random(f"pairs:{mix_seed}")
    pools = real_answer_pools(ordinary) if args.pair_answers == "real" else {}
    if pools and not all((zh, "describe") in pools for zh, _ in subjects):
        raise SystemExit("--pair-answers real: no real answer in one of the languages (sft.jsonl)")
    for i in range(args.pairs if subjects else 0):
        zh, subject = subjects[i % len(subjects)]
        example = (pair_example_real(pair_rng, zh, subject, pools) if pools else pair_example(pair_rng, zh, subject))
        rows.append(conversation(f"pair:{i}", *example))
    can_rng = random.Random(f"can:{mix_seed}")
    if args.can:
        candidates = [(r, polite(can_rng, is_zh(r["conversations"][0]["value"]), r["conversations"][0]["value"]))
                      for r in ordinary if len(r["conversations"]) == 2]
        candidates = [(r, q) for r, q in candidates if q and not any(
            w in (q + r["conversations"][1]["value"]).lower() for w in PICTURE_WORDS)
            and "LMSYS" not in r["conversations"][1]["value"] and not heldout_overlap([q])]
        for i, (r, q) in enumerate(can_rng.sample(candidates, min(args.can, len(candidates)))):
            rows.append(conversation(f"can:{i}", q, r["conversations"][1]["value"]))
    for i in range(args.edit):
        rows.append(conversation(f"edit:{i}", *edit_example(rng, i % 2 == 0)))
    leaked = heldout_overlap([r["conversations"][0]["value"] for r in rows])
    if leaked:
        raise SystemExit(f"training requests mention held-out subjects: {leaked[:5]}")
    # ordinary conversations: every one whose question mentions pictures or art without asking for an
    # instruction (hard negatives), then a random sample of the rest
    mentions = [r for r in ordinary if any(w in r["conversations"][0]["value"].lower() for w in PICTURE_WORDS)]
    rest = [r for r in ordinary if r not in mentions]
    replay = mentions[: args.replay] + rng.sample(rest, max(0, min(args.replay - len(mentions), len(rest))))
    rows += replay
    rng.shuffle(rows)
    with open(args.out / args.name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # 25 distinct (held-out subject, held-out phrasing) pairs per language, whatever the mix's sizes
    rng = random.Random(args.seed)
    drawing = []
    for subjects, templates, styles in ((heldout_zh, DRAW_ZH_HELDOUT, STYLES_ZH), (heldout_en, DRAW_EN_HELDOUT, STYLES_EN)):
        pairs = rng.sample([(s, t) for s in subjects for t in templates], 25)
        drawing += [t.format(s=s, style=rng.choice(styles)) for s, t in pairs]
    evaluation = {"drawing": drawing, "ordinary": ordinary_questions(args.shared, rng, 50)}
    (args.out / "routing_eval.json").write_text(json.dumps(evaluation, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"instructions: {args.draw} + {args.wide} (wide) drawing + {args.edit} editing examples + "
          f"{args.pairs if subjects else 0} minimal pairs ({args.pair_answers} answers) + "
          f"{sum(r['id'].startswith('can:') for r in rows)} polite + {len(replay)} ordinary "
          f"conversations ({len(mentions)} mentioning pictures); routing eval: {len(drawing)} drawing requests, {len(evaluation['ordinary'])} ordinary questions")


if __name__ == "__main__":
    main()
