"""Recipe step 8b (not run by default): train the routing decision of aquila-tiny directly.

Greedy decoding routes a request to ``#text2image#`` when every token of the drawing answer's
opening (FlagAI's preface and the marker line, the same ``K`` tokens for every request) is the most
likely token where it stands. Write the margin of a position as

    m_t = log p(path_t | request, path_<t) - max_{v != path_t} log p(v | request, path_<t)

(teacher-forced). A request is routed iff ``min_t m_t > 0``. This stage continues a fine-tuned model
on these terms (the last four optional):

* the ordinary next-token loss on an SFT mix (``--mix``, as ``aquilachat sft``), so that answers keep
  their format;
* for drawing requests (made by ``instructions.draw_example``, training phrasings and subjects
  only): the hinge ``relu(delta - min_t m_t)``, every opening position above the margin;
* for requests that are not drawing requests: the hinge ``relu(delta + min_t m_t)``: at least one
  position of the opening below ``-delta``. These need no answer, so any text can serve:
  every ``sft.jsonl`` question (those about pictures that want text included), the minimal-pair
  requests (a drawing request's subject with a text verb) and politely asked questions;
* with ``--marker-hinge``, the same two hinges on the marker line alone, written after varied lead
  text (:func:`leads`: the preface, a suffix of it, or an ordinary answer's first tokens and then a
  suffix): a model can drift into the preface from other words, and the exact opening does not see
  those paths; ``--marker-hinge neg`` applies only the second of the two;
* with ``--neg-first K``, the negative hinge binds on the opening's first ``K`` positions only (so that
  an ordinary answer leaves the opening at its start, not at its weakest token);
* with ``--end-hinge``, the hinge ``relu(delta - m)`` on the end of turn after a drawing answer's prompt
  line (teacher-forced with the request's own subject);
* with ``--text FILE...``, the next-token loss on ``--text-rows`` rows of 512 tokens of plain text a step
  (e.g. the pretraining text), to keep the model's general text.

Three options change which requests the hinges see (attempt 26): ``--art K`` makes ``K`` of the other
requests a step questions about art or images that want text (:func:`art_question`); ``--scenes P``
gives a share ``P`` of the drawing requests a subject with an action (:func:`scene_subject`);
``--context P`` puts a share ``P`` of all hinge requests after a system message or an earlier exchange
(:func:`with_context`), as the server and chat page send them.

This is a max-margin (hinge) objective on the decision greedy decoding takes (Crammer and Singer
2001 for the multiclass margin; Welleck et al. 2019, "Neural Text Generation with Unlikelihood
Training", for pushing unwanted continuations down). Every request comes from the training pools
of ``instructions.py``; held-out subjects and phrasings are refused (``heldout_overlap``).

    python recipes/aquila-tiny/decision.py --model DIR --mix FILE --sft sft.jsonl --out DIR \
        [--steps 300] [--delta 2] [--marker-hinge] ...

Attempts 21-26 in docs/aquila-tiny.md used it.

Writes ``DIR/final`` (a Hugging Face layout that ``LLM`` loads) and ``DIR/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import instructions as ins  # noqa: E402

from aquilachat.chat_format import render, render_for_training  # noqa: E402
from aquilachat.checkpoint import load_model, load_tokenizer, save_hf  # noqa: E402
from aquilachat.train.data import build_sft_dataset, collate, pack_units  # noqa: E402
from aquilachat.train.loop import lr_at  # noqa: E402

TEMPLATE = "aquila-chat"


def opening_ids(tok) -> list[int]:
    """The drawing answer's opening as the template tokenizes it: the preface and the marker line
    (``[K]`` ids, the same for every request)."""
    answer, _ = answer_ids(tok, "x", ins.DRAW_PREFACE + "\n#text2image#\nx")
    for k in range(1, len(answer) + 1):
        if tok.decode(answer[:k]).endswith("#text2image#\n"):
            return answer[:k]
    raise SystemExit("decision.py: the drawing answer has no marker line in this tokenizer")


def margins(model, tok, requests: list[str] | list[list[dict]], opening: list[int] | list[list[int]], pad_id: int,
            last: int | None = None) -> torch.Tensor:
    """``[N, K]`` teacher-forced margins ``m_t`` (see the module docstring) of the opening after each
    request, computed in one right-padded batch.

    ``opening`` is one id list for every request, or one per request (then ``last`` is required):
    the margins of the last ``last`` positions of each row's continuation are returned, ``[N, last]``.
    A request is a user message's text, or a whole conversation (OpenAI-form messages, the last from
    the user; ``--context``).
    """
    conts = [opening] * len(requests) if not opening or isinstance(opening[0], int) else opening
    K = last if last is not None else len(conts[0])
    if any(len(c) < K for c in conts) or (last is None and len({len(c) for c in conts}) > 1):
        raise ValueError("margins: continuations of different lengths need `last` (at most the shortest)")
    prompts = [render(tok, [{"role": "user", "content": r}] if isinstance(r, str) else r, TEMPLATE) for r in requests]
    rows = [p + c for p, c in zip(prompts, conts)]
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    logits = model(x).float()  # [N, T, V]
    # the logits at position j predict token j + 1: the last K tokens of row i sit at len(row) - K ..
    index = torch.stack([torch.arange(len(r) - 1 - K, len(r) - 1) for r in rows])  # [N, K]
    picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # [N, K, V]
    logp = picked.log_softmax(-1)
    target = torch.tensor([c[len(c) - K:] for c in conts])[..., None]  # [N, K, 1]
    own = logp.gather(-1, target).squeeze(-1)
    other = logp.scatter(-1, target, float("-inf")).amax(-1)
    return own - other


def leads(rng: random.Random, preface: list[int], starts: list[list[int]], n: int) -> list[list[int]]:
    """``n`` texts that may come before the marker line (``--marker-hinge``): the preface itself, a
    suffix of it, or the first few tokens of an ordinary answer (``starts``) followed by a suffix of
    it; the false routes of attempt 21 drifted into the preface's second sentence this way."""
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        cut = 0 if kind == 0 else rng.randrange(1, len(preface))
        head = rng.choice(starts)[: rng.randint(1, 8)] if kind == 2 else []
        out.append(head + preface[cut:])
    return out


def negative_pool(args, ordinary: list[dict]) -> list[str]:
    """Requests that are not drawing requests: every first question of ``ordinary`` (``sft.jsonl``),
    minimal-pair requests over the training subjects and politely asked questions."""
    rng = random.Random(f"negatives:{args.seed}")
    pool = [r["conversations"][0]["value"] for r in ordinary]
    for i in range(args.pairs):
        zh = i % 2 == 0
        subject = ins.compose_subject(rng, zh) if rng.random() < 0.7 else rng.choice(
            ins.WIDE_ZH if zh else ins.WIDE_EN)
        pool.append(ins.pair_example(rng, zh, subject)[0])
    for r in rng.sample(ordinary, min(args.polite, len(ordinary))):
        q = r["conversations"][0]["value"]
        p = ins.polite(rng, ins.is_zh(q), q)
        if p:
            pool.append(p)
    pool = [q for q in pool if q.strip() and not ins.heldout_overlap([q])]
    return pool


#: Generic words around a request (``--augment``): a greeting or a reason, which do not change what is
#: asked. None holds a word of a held-out phrasing.
AROUND_EN = (["Hi! ", "Hello, ", "Hey, ", "Quick request: ", "For my project: ", "I have a request. ", "OK, ", "Now, "],
             [" Thanks!", " Thank you.", " It's for my friend.", " I will use it as a wallpaper.", " Be creative."])
AROUND_ZH = (["你好！", "您好，", "请问，", "我有个请求：", "现在", "好的，", "朋友过生日，"],
             ["，谢谢！", "。谢谢。", "，我想做成壁纸。", "，送给朋友。", "，要有创意。"])


def augment(rng: random.Random, request: str, zh: bool) -> str:
    """``request`` with a generic greeting before it or a reason after it, or its first letter in
    lower case and its final punctuation dropped (one of them, chosen by ``rng``)."""
    before, after = AROUND_ZH if zh else AROUND_EN
    kind = rng.randrange(3)
    if kind == 0:
        first = rng.choice(before)
        return first + (request[0].lower() + request[1:] if not zh and first.endswith(", ") else request)
    if kind == 1:
        return (request.rstrip("。.!！?？") if zh else request) + rng.choice(after)
    return (request if zh else request[0].lower() + request[1:]).rstrip("。.!！?？")


#: More drawing phrasings (``--more-phrasings``), beside ``instructions.DRAW_ZH`` / ``DRAW_EN``: other
#: frames around a picture word. Written after seeing which held-out phrasings attempt 21b missed;
#: none holds a held-out phrasing's frame (``HELDOUT_FRAMES``, checked at import).
MORE_DRAW_EN = ["Give me a picture of {s}.", "I would love an image of {s}.", "Produce an image of {s}.",
                "A picture of {s}, please.", "Can I get an image of {s}?", "Design an image of {s}.",
                "Help me draw {s}.", "Let's draw {s}.", "Make me a painting of {s}.",
                "We need a picture of {s} in {style}.", "Do a sketch of {s}.", "Picture {s} for me in {style}."]
MORE_DRAW_ZH = ["帮我做一张{s}的图", "我要一幅{s}的画", "请给我一张{s}的图片", "可以给我画一张{s}吗？", "想要一幅{s}的图像",
                "做一张{s}的图，{style}", "请你画{s}", "帮我绘制{s}", "我想让你画{s}", "为我画一幅{s}"]
HELDOUT_FRAMES = ("illustrat", "show me", "i'd like", "could you paint", "drawing of", "麻烦", "能不能", "插图", "来一张",
                  "生成{s}的图片")
assert not [t for t in MORE_DRAW_EN + MORE_DRAW_ZH if any(f in t.lower() for f in HELDOUT_FRAMES)]
assert not set(MORE_DRAW_EN + MORE_DRAW_ZH) & set(ins.DRAW_EN_HELDOUT + ins.DRAW_ZH_HELDOUT)


#: Questions about art, pictures and images that want a text answer (``--art``), the false routes of
#: the QA pass after attempt 25: painters, paintings, art forms, image software and plotting, and idioms
#: with a picture word. Frames and fillers below are for training only; pools.py's pool 4 holds its own
#: (checked there: no filler and no frame in common).
ART_FRAMES_EN = ["Who was {painter}?", "What is {painter} known for?", "Describe the style of {painter}.",
                 "Tell me about {work}.", "Who painted {work}?", "Why is {work} famous?",
                 "What is the history of {form}?", "What are the basics of {form}?", "Give me three tips for {form}.",
                 "Write a short poem about {form}.", "How do I {task}?", "What is the easiest way to {task}?"]
ART_FRAMES_ZH = ["{painter}是谁？", "{painter}有哪些代表作？", "{painter}的绘画风格是什么？", "介绍一下{work}。",
                 "{work}是谁画的？", "{work}为什么有名？", "{form}的历史是怎样的？", "怎么学习{form}？",
                 "给我三条关于{form}的建议。", "写一首关于{form}的诗。", "如何{task}？", "{task}最简单的方法是什么？"]
ART_FILL_EN = {"painter": ["Leonardo da Vinci", "Rembrandt", "Claude Monet", "Salvador Dali", "Frida Kahlo",
                           "Michelangelo", "Andy Warhol", "Henri Matisse", "Johannes Vermeer", "Edvard Munch"],
               "work": ["The Last Supper", "The Scream", "Girl with a Pearl Earring", "The Persistence of Memory",
                        "Monet's Water Lilies", "The Night Watch", "the Sistine Chapel ceiling"],
               "form": ["oil painting", "watercolor painting", "sketching", "calligraphy", "photography", "digital art",
                        "printmaking", "pixel art", "comic drawing", "portrait painting"],
               "task": ["crop a photo in GIMP", "remove the background of an image", "plot a bar chart with matplotlib",
                        "draw a rectangle on an HTML canvas", "convert a PNG image to JPG", "compress a large image",
                        "draw a line with OpenCV", "change the brightness of a photo", "make a scatter plot in Python"]}
ART_FILL_ZH = {"painter": ["齐白石", "徐悲鸿", "张大千", "吴道子", "唐寅", "达·芬奇", "莫奈", "伦勃朗", "米开朗基罗", "蒙克"],
               "work": ["《最后的晚餐》", "《呐喊》", "《千里江山图》", "《富春山居图》", "《步辇图》", "《戴珍珠耳环的少女》",
                        "《记忆的永恒》"],
               "form": ["油画", "水彩画", "素描", "书法", "摄影", "国画", "版画", "漫画", "数字绘画", "人像画"],
               "task": ["用Photoshop抠图", "用matplotlib画柱状图", "把图片转换成PDF", "压缩图片大小", "在Word里插入图片",
                        "用OpenCV读取图片", "调整照片的亮度", "用Python画散点图", "给照片裁剪尺寸"]}
ART_IDIOMS = ["What does 'draw a blank' mean?", "Draw a conclusion from this: the shop is closed and the lights are off.",
              "Explain the saying 'a picture is worth a thousand words'.", "What does it mean to draw the short straw?",
              "解释成语“画龙点睛”。", "“画饼充饥”是什么意思？", "“画虎不成反类犬”是什么意思？", "请解释“一图胜千言”这句话。"]


def art_question(rng: random.Random) -> str:
    """One question about art or images that wants text (``--art``): a frame of ``ART_FRAMES_ZH`` /
    ``_EN`` with its filler, or (one in ten) an idiom of ``ART_IDIOMS``."""
    if rng.random() < 0.1:
        return rng.choice(ART_IDIOMS)
    zh = rng.random() < 0.5
    frame = rng.choice(ART_FRAMES_ZH if zh else ART_FRAMES_EN)
    key = frame[frame.index("{") + 1: frame.index("}")]
    return frame.format(**{key: rng.choice((ART_FILL_ZH if zh else ART_FILL_EN)[key])})


#: Scenes with people or animals doing something (``--scenes``): the Chinese scene requests the QA pass
#: after attempt 25 found missed (1/15). Built from a who and an action; no word of a held-out subject.
SCENE_WHO_ZH = ["两只小猫", "一个小男孩", "一位老奶奶", "一群孩子", "一只小狗", "一个女孩", "两个朋友", "一位渔夫", "一只熊猫",
                "一对老夫妻"]
SCENE_ACT_ZH = ["在草地上追逐", "在河边钓鱼", "在雪地里堆雪人", "在竹林里读书", "在海边放风筝", "撑着伞走在雨中的小巷",
                "在厨房里包饺子", "在山顶看日出", "在公园的长椅上聊天", "在灯下写作业", "在田野里摘花", "在湖上划船"]
SCENE_WHO_EN = ["two kittens", "a little boy", "an old woman", "a group of children", "a puppy", "a girl", "two friends",
                "a fisherman", "a panda", "an old couple"]
SCENE_ACT_EN = ["chasing each other on the grass", "fishing by a river", "building a snowman", "reading in a bamboo forest",
                "flying a kite on the beach", "walking down a rainy alley with an umbrella", "making dumplings in a kitchen",
                "watching the sunrise on a mountain top", "talking on a park bench", "doing homework under a lamp",
                "picking flowers in a field", "rowing a boat on a lake"]


def scene_subject(rng: random.Random, zh: bool) -> str:
    """One scene subject for ``--scenes``: who, then what they do (``两只小猫在草地上追逐``)."""
    if zh:
        return rng.choice(SCENE_WHO_ZH) + rng.choice(SCENE_ACT_ZH)
    return f"{rng.choice(SCENE_WHO_EN)} {rng.choice(SCENE_ACT_EN)}"


#: System messages for ``--context``: what users and front ends put there.
SYSTEMS = ["You are a helpful assistant.", "You are AquilaChat, a helpful bilingual assistant.",
           "Answer briefly.", "你是一个乐于助人的助手。", "你是智源研究院的AquilaChat。", "请用中文回答。"]


assert not ins.heldout_overlap([v for fill in (ART_FILL_EN, ART_FILL_ZH) for vs in fill.values() for v in vs]
                               + ART_IDIOMS + SCENE_WHO_ZH + SCENE_ACT_ZH + SCENE_WHO_EN + SCENE_ACT_EN)


def with_context(rng: random.Random, request: str, ordinary: list[dict]) -> list[dict]:
    """``request`` as the last user message of a conversation (``--context``): after a system message
    (``SYSTEMS``), or after one earlier exchange (a short question and answer of ``sft.jsonl``), equally
    often."""
    last = {"role": "user", "content": request}
    if rng.random() < 0.5:
        return [{"role": "system", "content": rng.choice(SYSTEMS)}, last]
    for _ in range(20):
        c = rng.choice(ordinary)["conversations"]
        if len(c[1]["value"]) < 300:
            break
    return [{"role": "user", "content": c[0]["value"]}, {"role": "assistant", "content": c[1]["value"]}, last]


def positive(rng: random.Random, p_augment: float = 0.0, more: bool = False, scenes: float = 0.0) -> str:
    """One drawing request: a training phrasing about a training (composed or wide) subject, with
    :func:`augment` applied with probability ``p_augment``."""
    return positive_example(rng, p_augment, more, scenes)[0]


def positive_example(rng: random.Random, p_augment: float = 0.0, more: bool = False,
                     scenes: float = 0.0) -> tuple[str, str]:
    """:func:`positive`'s request and its drawing answer (``instructions.draw_example``: preface,
    marker line, prompt line), from the same draws of ``rng``; with probability ``scenes`` the subject
    is a :func:`scene_subject` (no draw is made for it when ``scenes`` is 0)."""
    zh = rng.random() < 0.5
    r = rng.random()
    if scenes and rng.random() < scenes:
        subject = scene_subject(rng, zh)
    elif r < 0.2:
        subject = rng.choice(ins.SUBJECTS_ZH[:-10] if zh else ins.SUBJECTS_EN[:-10])
    elif r < 0.4:
        subject = rng.choice(ins.WIDE_ZH if zh else ins.WIDE_EN)
    else:
        subject = ins.compose_subject(rng, zh)
    templates = ins.DRAW_ZH if zh else ins.DRAW_EN
    if more:
        templates = templates + (MORE_DRAW_ZH if zh else MORE_DRAW_EN)
    request, answer = ins.draw_example(rng, zh, subject, templates)
    return (augment(rng, request, zh) if rng.random() < p_augment else request), answer


def answer_ids(tok, request: str, answer: str) -> tuple[list[int], int]:
    """The answer's ids after the rendered request, end of turn included (``render_for_training``),
    and how many of the last ids are the end of turn ``###`` (0 when the end merged with the text)."""
    msgs = [{"role": "user", "content": request}]
    prompt = render(tok, msgs, TEMPLATE)
    ids, _ = render_for_training(tok, msgs + [{"role": "assistant", "content": answer}], TEMPLATE)
    cont = ids[len(prompt):]
    for k in range(1, 4):
        if tok.decode(cont[-k:]) == "###":
            return cont, k
    return cont, 0


def text_row(rng: random.Random, tok, texts: list[str], length: int) -> list[int]:
    """``length + 1`` token ids of plain text from a random place of a random file of ``texts``
    (chosen in proportion to their sizes), for the next-token loss of ``--text``."""
    text = rng.choices(texts, weights=[len(t) for t in texts])[0]
    start = rng.randrange(max(1, len(text) - 8 * length))
    ids = tok.encode(text[start: start + 8 * length])
    if len(ids) < length + 1:
        raise ValueError(f"decision.py: a --text file holds fewer than {length + 1} tokens in {8 * length} characters")
    return ids[: length + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the model to continue (Hugging Face layout)")
    ap.add_argument("--mix", type=Path, required=True, help="SFT mix for the next-token loss (instructions.py)")
    ap.add_argument("--sft", type=Path, required=True, help="sft.jsonl: the source of ordinary questions")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=2, help="packed SFT rows of 512 a step")
    ap.add_argument("--pos", type=int, default=16, help="drawing requests a step")
    ap.add_argument("--neg", type=int, default=16, help="other requests a step")
    ap.add_argument("--delta", type=float, default=1.0, help="the margin, in nats")
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the two hinge terms")
    ap.add_argument("--pairs", type=int, default=3000, help="minimal-pair requests among the negatives")
    ap.add_argument("--polite", type=int, default=1500, help="politely asked questions among the negatives")
    ap.add_argument("--augment", type=float, default=0.0, help="share of drawing requests given augment()")
    ap.add_argument("--more-phrasings", action="store_true", help="draw requests also from MORE_DRAW_ZH / _EN")
    ap.add_argument("--marker-hinge", nargs="?", const="both", choices=["both", "neg"],
                    help="also the hinge on the marker line after varied lead text (leads()): above the margin "
                         "for drawing requests, below it for the others ('neg': only the others)")
    ap.add_argument("--neg-first", type=int, default=0,
                    help="the negative hinge binds on the first K positions of the opening (min over them); "
                         "0: the whole opening")
    ap.add_argument("--end-hinge", action="store_true",
                    help="also the hinge on the end of turn after the drawing answer's prompt line (teacher-forced)")
    ap.add_argument("--text", type=Path, nargs="*", default=[],
                    help="plain-text files for an extra next-token loss (e.g. the pretraining text)")
    ap.add_argument("--text-rows", type=int, default=1, help="rows of 512 tokens of --text a step")
    ap.add_argument("--art", type=int, default=0,
                    help="of the --neg other requests a step, this many are art_question()s (questions about art "
                         "or images that want text)")
    ap.add_argument("--scenes", type=float, default=0.0,
                    help="share of drawing requests whose subject is a scene_subject() (who and an action)")
    ap.add_argument("--context", type=float, default=0.0,
                    help="share of the requests in the hinges given with_context(): after a system message or an "
                         "earlier exchange")
    ap.add_argument("--seed", type=int, default=21)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device="cpu")
    model.train()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (model.config.pad_token_id or 0)
    opening = opening_ids(tok)
    ordinary = [json.loads(line) for line in args.sft.read_text(encoding="utf-8").splitlines()]
    ordinary = [r for r in ordinary if not any(m in t["value"] for t in r["conversations"] for m in ins.MARKERS)]
    negatives = negative_pool(args, ordinary)
    marker_len = len(tok.encode("\n#text2image#\n"))
    if tok.decode(opening[-marker_len:]) != "\n#text2image#\n":
        raise SystemExit("decision.py: the marker line is not tokenized on its own in the opening")
    preface = opening[:-marker_len]
    starts = [tok.encode(r["conversations"][1]["value"][:40]) for r in ordinary[:2000] if r["conversations"][1]["value"].strip()]
    texts = [f.read_text(encoding="utf-8") for f in args.text]
    units = build_sft_dataset([args.mix], tok, template=TEMPLATE, max_seq_len=512, packing=True).units
    print(f"decision: opening of {len(opening)} tokens, {len(negatives)} negative requests, {len(units)} packed rows",
          flush=True)
    ctx_rng = random.Random(f"context:{args.seed}")  # separate streams: runs without the options draw as before
    art_rng = random.Random(f"art:{args.seed}")

    def ctx(requests: list[str]) -> list:
        if not args.context:
            return requests
        return [with_context(ctx_rng, r, ordinary) if ctx_rng.random() < args.context else r for r in requests]

    def others(n: int) -> list[str]:
        k = min(args.art, n)
        return ctx(rng.sample(negatives, n - k) + [art_question(art_rng) for _ in range(k)])

    def drawing(n: int) -> list[str]:
        return ctx([positive(rng, args.augment, args.more_phrasings, args.scenes) for _ in range(n)])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = list(range(len(units)))
    rng.shuffle(order)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "metrics.jsonl", "w", encoding="utf-8")
    started = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, total_steps=args.steps, warmup_steps=max(1, args.steps // 30), lr=args.lr, min_lr=args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [units[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        x, y = collate(batch, pad_id)
        logits = model(x)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        pos = margins(model, tok, drawing(args.pos), opening, pad_id)
        neg = margins(model, tok, others(args.neg), opening, pad_id)
        hinge_pos = F.relu(args.delta - pos.amin(-1)).mean()
        first = neg[:, : args.neg_first] if args.neg_first > 0 else neg
        hinge_neg = F.relu(args.delta + first.amin(-1)).mean()
        loss = ce + args.weight * (hinge_pos + hinge_neg)
        hinge_marker = torch.zeros(())
        if args.marker_hinge:
            marker = opening[-marker_len:]
            sides = []  # in this order, so that runs without the newer options draw as before
            if args.marker_hinge == "both":
                sides.append((1.0, drawing(args.pos)))
            sides.append((-1.0, others(args.neg)))
            for sign, reqs in sides:
                conts = [lead + marker for lead in leads(rng, preface, starts, len(reqs))]
                m = margins(model, tok, reqs, conts, pad_id, last=marker_len).amin(-1)
                hinge_marker = hinge_marker + F.relu(args.delta - sign * m).mean()
            loss = loss + args.weight * hinge_marker
        hinge_end = torch.zeros(())
        if args.end_hinge:
            examples = [positive_example(rng, args.augment, args.more_phrasings, args.scenes) for _ in range(args.pos)]
            done = [answer_ids(tok, r, a) for r, a in examples]
            keep = [(r, c, k) for (r, _), (c, k) in zip(examples, done) if k > 0]
            m = margins(model, tok, [r for r, _, _ in keep], [c for _, c, _ in keep], pad_id,
                        last=min(k for _, _, k in keep))
            hinge_end = F.relu(args.delta - m.amin(-1)).mean()
            loss = loss + args.weight * hinge_end
        text_ce = torch.zeros(())
        if texts:
            rows = torch.tensor([text_row(rng, tok, texts, 512) for _ in range(args.text_rows)])
            out = model(rows[:, :-1]).float()
            text_ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), rows[:, 1:].reshape(-1))
            loss = loss + text_ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        row = {"step": step + 1, "lr": lr, "ce": round(ce.item(), 4), "hinge_pos": round(hinge_pos.item(), 4),
               "hinge_neg": round(hinge_neg.item(), 4),
               "hinge_marker": round(hinge_marker.item(), 4), "hinge_end": round(hinge_end.item(), 4),
               "text_ce": round(text_ce.item(), 4), "pos_routed": int((pos.amin(-1) > 0).sum()),
               "neg_routed": int((neg.amin(-1) > 0).sum()), "grad_norm": round(norm, 3),
               "s": round(time.perf_counter() - started, 1)}
        log.write(json.dumps(row) + "\n")
        if (step + 1) % 10 == 0 or step == 0:
            log.flush()
            print(json.dumps(row), flush=True)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"decision.py: non-finite loss at step {step + 1}")
    model.eval()
    save_hf(model, args.out / "final", tokenizer=tok)
    print(f"decision: wrote {args.out / 'final'}", flush=True)


if __name__ == "__main__":
    main()
